"""``HybridCache``: a transformers ``DynamicCache`` holding KV for attention layers and the
fixed-size recurrent state of SSM layers.

Attention layers keep the source's cache layer type (``DynamicLayer``, or
``DynamicSlidingWindowLayer`` for sliding-window sources), so their keys and values grow with the
sequence. Each SSM layer gets an ``SSMStateLayer`` whose ``state`` is the mixer's own cache object
(``gka_kernels.layers``), created by the mixer on the first call and updated in place after:
its size does not depend on the sequence length.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    CacheLayerMixin,
    DynamicCache,
    LinearAttentionCacheLayerMixin,
    get_layer_types_and_kwargs,
)


def tensor_bytes(obj: object) -> int:
    """Bytes of all tensors reachable from ``obj`` (tensors, containers, dataclasses, attributes)."""
    seen: set[int] = set()

    def visit(x: object) -> int:
        if id(x) in seen:
            return 0
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(visit(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(visit(v) for v in x)
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return sum(visit(getattr(x, f.name)) for f in dataclasses.fields(x))
        if hasattr(x, "__dict__") and not isinstance(x, type):
            return sum(visit(v) for v in vars(x).values())
        return 0

    return visit(obj)


class SSMStateLayer(LinearAttentionCacheLayerMixin):
    """Cache slot of one SSM layer: ``state`` is the mixer's cache object (``None`` before the
    first forward). ``seen_tokens`` counts the tokens it has absorbed."""

    is_compileable = False
    is_croppable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(number_of_states=1)
        self.state: object | None = None
        self.seen_tokens = 0
        self.keys = None
        self.values = None

    def store(self, state: object, num_new_tokens: int) -> None:
        """Keep the mixer's updated cache object after a forward over ``num_new_tokens`` tokens."""
        self.state = state
        self.seen_tokens += num_new_tokens
        self.has_previous_state[0] = True

    # The mixer owns its tensors; these abstract hooks of the transformers base class are unused.
    def lazy_initialization(self, *args, **kwargs) -> None:
        raise NotImplementedError("SSM layer states are created by the gka_kernels mixer itself")

    def update_conv_state(self, *args, **kwargs):
        raise NotImplementedError("SSM layer states are updated by the gka_kernels mixer itself")

    def update_recurrent_state(self, *args, **kwargs):
        raise NotImplementedError("SSM layer states are updated by the gka_kernels mixer itself")

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.state = None
        self.seen_tokens = 0
        self.has_previous_state[0] = False

    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("an SSM layer state cannot be rolled back (crop); re-run the prefix instead")

    # Batch bookkeeping for beam search / contrastive search, through the mixer cache's own API
    # (``LayerCache.reorder``: row i becomes old row idx[i]).
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state.reorder(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.state is not None:
            rows = torch.arange(self.state.batch_size).repeat_interleave(repeats)
            self.state.reorder(rows)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.state is not None:
            self.state.select(indices)

    def nbytes(self) -> int:
        return tensor_bytes(self.state) if self.state is not None else 0


class HybridCache(DynamicCache):
    """Per-layer cache of a ``HybridForCausalLM``: attention layers as in the source model,
    ``SSMStateLayer`` at the SSM positions of ``config.hybrid_override_pattern``."""

    def __init__(self, config) -> None:
        text_config = config.text_config
        layer_types, per_layer_kwargs = get_layer_types_and_kwargs(text_config)
        layers: list = []
        for i, (token, kind, kwargs) in enumerate(zip(config.layer_pattern, layer_types, per_layer_kwargs)):
            if token == "*":
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs))
            else:
                layers.append(SSMStateLayer())
        Cache.__init__(self, layers=layers)

    def _attention_layer_indices(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, CacheLayerMixin)]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if not self._attention_layer_indices():
            return self.layers[0].seen_tokens if self.layers else 0
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        if not self._attention_layer_indices():
            return self.get_seq_length() + query_length, 0
        return super().get_mask_sizes(query_length, layer_idx)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held now: ``attention`` (keys and values, grows with the sequence), ``ssm``
        (recurrent and convolution states, fixed size) and their ``total``."""
        attn = sum(tensor_bytes((layer.keys, layer.values)) for layer in self.layers
                   if isinstance(layer, CacheLayerMixin))
        ssm = sum(layer.nbytes() for layer in self.layers if isinstance(layer, SSMStateLayer))
        return {"attention": attn, "ssm": ssm, "total": attn + ssm}
