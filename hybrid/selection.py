"""Which attention layers to replace (SPEC 7, layer selection).

``swa``: score each attention layer by the quality kept when that one layer alone uses
sliding-window attention (a causal mask limited to the last ``window`` keys), on the user's
text; the layers that keep the most quality are the ones least in need of full attention, so
they are replaced. Quality kept = ``baseline_ppl / swa_ppl`` (1.0 = nothing lost).
``uniform``: spread the replaced layers evenly over the depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .evaluate import perplexity
from .pattern import uniform_layers


def sliding_window_mask(q_len: int, kv_len: int, window: int, device: torch.device) -> torch.Tensor:
    """Bool ``[q_len, kv_len]`` for queries at the last ``q_len`` of ``kv_len`` positions:
    query ``i`` (position ``p = kv_len - q_len + i``) may attend key ``j`` iff ``p - window < j <= p``."""
    p = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    j = torch.arange(kv_len, device=device).unsqueeze(0)
    return (j <= p) & (j > p - window)


class SlidingWindowAttention(nn.Module):
    """Wraps a source attention module so that it attends only to the last ``window`` tokens.

    The window is imposed through the attention mask (combined with the model's own mask);
    the wrapped module computes everything else unchanged. With a cache, the keys of earlier
    calls are kept and masked (scoring needs correctness, not memory savings).
    """

    def __init__(self, attn: nn.Module, window: int) -> None:
        super().__init__()
        self.attn = attn
        self.window = window

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, **kwargs):
        T = hidden_states.shape[1]
        past = cache.get_seq_length(self.attn.layer_idx) if cache is not None else 0
        allowed = sliding_window_mask(T, past + T, self.window, hidden_states.device)[None, None]
        impl = self.attn.config._attn_implementation
        if impl not in ("sdpa", "eager"):
            raise ValueError(f"layer selection needs attn_implementation 'sdpa' or 'eager', got {impl!r}")
        if attention_mask is not None:
            given = attention_mask[..., -T:, -(past + T):]
            allowed = allowed & (given if given.dtype == torch.bool else given == 0)
        if impl == "eager":
            neg = torch.finfo(hidden_states.dtype).min
            mask = torch.zeros(allowed.shape, dtype=hidden_states.dtype, device=hidden_states.device)
            mask = mask.masked_fill(~allowed, neg)
        else:
            mask = allowed
        return self.attn(hidden_states=hidden_states, position_embeddings=position_embeddings,
                         attention_mask=mask, cache=cache, **kwargs)


@dataclass
class LayerScore:
    layer: int
    swa_perplexity: float
    quality_kept: float


@torch.no_grad()
def score_layers_swa(source: nn.Module, windows: torch.Tensor, window: int,
                     batch_size: int = 8) -> tuple[float, list[LayerScore]]:
    """Baseline perplexity of ``source`` on ``windows [N, T]`` and, per layer, the perplexity
    and quality kept when that layer alone uses a sliding window of ``window`` tokens."""
    if window < 1:
        raise ValueError(f"window: expected >= 1, got {window}")
    layers = source.model.layers
    base = perplexity(source, windows, batch_size)
    scores = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        layer.self_attn = SlidingWindowAttention(attn, window)
        try:
            ppl = perplexity(source, windows, batch_size)
        finally:
            layer.self_attn = attn
        scores.append(LayerScore(i, ppl, base / ppl))
    return base, scores


def select_layers_swa(scores: list[LayerScore], count: int) -> list[int]:
    """The ``count`` layers that keep the most quality under sliding-window attention
    (ties broken by the lower perplexity, then the lower index), sorted by index."""
    if not 0 <= count <= len(scores):
        raise ValueError(f"count: expected 0..{len(scores)} layers to replace, got {count}")
    ranked = sorted(scores, key=lambda s: (-s.quality_kept, s.swa_perplexity, s.layer))
    return sorted(s.layer for s in ranked[:count])


def select_layers(method: str, num_layers: int, count: int, scores: list[LayerScore] | None = None) -> list[int]:
    """Dispatch on ``method`` (``"swa"`` needs ``scores``, ``"uniform"`` does not)."""
    if method == "uniform":
        return uniform_layers(num_layers, count)
    if method == "swa":
        if scores is None:
            raise ValueError("select 'swa' needs per-layer scores (score_layers_swa)")
        return select_layers_swa(scores, count)
    raise ValueError(f"select: expected 'swa' or 'uniform', got {method!r}")
