"""``HybridForCausalLM``: a source Transformer whose attention is replaced by SSM mixers in the
layers marked by ``hybrid_override_pattern``.

The model keeps the source family's own base model (``LlamaModel``, ``Qwen3MoeModel``, ...):
embeddings, decoder layers, MLPs/experts, norms, rotary embeddings and mask construction are the
source's code. In an SSM layer, ``decoder_layer.self_attn`` is an ``SSMAttention`` that adapts the
decoder layer's attention call to a ``gka_kernels.layers`` mixer (``GatedKalmaNet``,
``GatedDeltaNet``, ``Mamba2``): it ignores RoPE and the 4-D attention mask and uses the 2-D
padding mask and its fixed-size state in the ``HybridCache``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import HybridCache, SSMStateLayer
from .configuration import HybridConfig
from .families import get_family
from .pattern import ATTENTION

SSM_MASK_KWARG = "ssm_attention_mask"


def mixer_class(token: str) -> type[nn.Module]:
    """The ``gka_kernels.layers`` class of a pattern token."""
    from gka_kernels import layers

    return {"GKA": layers.GatedKalmaNet, "GDN": layers.GatedDeltaNet, "M2": layers.Mamba2}[token]


def build_mixer(token: str, config: HybridConfig, layer_idx: int, backend: str = "auto") -> nn.Module:
    """A fresh mixer for layer ``layer_idx`` with the source attention's head geometry
    (``H`` query heads, ``HKV`` key/value heads, ``head_dim``) and the options of ``ssm_config``."""
    cfg = config.text_config
    options = dict(config.ssm_config.get(token, {}))
    return mixer_class(token)(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                              config.head_dim, layer_idx=layer_idx, backend=backend, **options)


class SSMAttention(nn.Module):
    """Stands in for ``self_attn`` of a decoder layer and runs an SSM mixer instead.

    Called like the source attention (``hidden_states, position_embeddings, attention_mask,
    cache, **kwargs``); returns ``(output, None)``. The padding mask reaches it as the keyword
    ``ssm_attention_mask`` (the 2-D ``[B, S]`` mask given to the model).
    """

    def __init__(self, mixer: nn.Module, token: str, layer_idx: int) -> None:
        super().__init__()
        self.mixer = mixer
        self.token = token
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None,
                cache=None, **kwargs) -> tuple[torch.Tensor, None]:
        mask = kwargs.get(SSM_MASK_KWARG)
        slot = None
        if cache is not None:
            slot = cache.layers[self.layer_idx] if self.layer_idx < len(cache.layers) else None
            if not isinstance(slot, SSMStateLayer):
                raise TypeError(
                    f"layer {self.layer_idx} is an SSM layer ({self.token}) but the cache holds "
                    f"{type(slot).__name__} there; pass a HybridCache(model.config) or let the model create one")
        out, state = self.mixer(hidden_states, attention_mask=mask,
                                cache=slot.state if slot is not None else None, use_cache=slot is not None)
        if slot is not None:
            slot.store(state, hidden_states.shape[1])
        return out, None

    def extra_repr(self) -> str:
        return f"token={self.token}, layer_idx={self.layer_idx}"


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """Causal LM over the source family's base model with SSM mixers at the pattern's positions.

    ``forward`` accepts the usual ``input_ids, attention_mask, position_ids, cache, inputs_embeds,
    labels, use_cache, logits_to_keep``; ``generate()`` works with a ``HybridCache``.
    """

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig, mixer_backend: str = "auto") -> None:
        super().__init__(config)
        family = get_family(config.text_config.model_type)
        self.model = family.base_model_cls()(config.text_config)
        self._no_split_modules = list(getattr(self.model, "_no_split_modules", None) or [])
        for i, token in enumerate(config.layer_pattern):
            if token == ATTENTION:
                continue
            mixer = build_mixer(token, config, i, backend=mixer_backend)
            # Mixers keep their own initialization (convs, gates, A_log, dt_bias: SPEC 6/7):
            # the flag makes transformers' weight init skip them.
            for sub in mixer.modules():
                sub._is_hf_initialized = True
            self.model.layers[i].self_attn = SSMAttention(mixer, token, i)
        self.vocab_size = config.text_config.vocab_size
        self.lm_head = nn.Linear(config.text_config.hidden_size, self.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def mixers(self) -> dict[int, nn.Module]:
        """``{layer index: mixer}`` of the SSM layers."""
        return {i: self.model.layers[i].self_attn.mixer for i in self.config.ssm_layers}

    def new_cache(self) -> HybridCache:
        """An empty ``HybridCache`` for this model."""
        return HybridCache(self.config)

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache: HybridCache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **kwargs) -> CausalLMOutputWithPast:
        legacy_cache = kwargs.pop("past_key_values", None)
        cache = cache if cache is not None else legacy_cache
        if use_cache is None:
            use_cache = self.config.text_config.use_cache
        if use_cache and cache is None:
            cache = self.new_cache()
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"cache: expected a HybridCache (model.new_cache()), got {type(cache).__name__}")
        if attention_mask is not None and attention_mask.dim() == 2:
            kwargs[SSM_MASK_KWARG] = attention_mask
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden_states = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.vocab_size)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache if use_cache else None,
                                      hidden_states=outputs.hidden_states, attentions=outputs.attentions)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length) -> None:
        user_cache = model_kwargs.get("cache")
        if user_cache is not None:
            if not isinstance(user_cache, HybridCache):
                raise TypeError(f"cache: expected a HybridCache, got {type(user_cache).__name__}")
            user_cache._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by hybrid "
                "models; they use HybridCache (KV for attention layers, fixed-size states for SSM layers)")
        model_kwargs["cache"] = self.new_cache()


def cache_bytes_per_token(config: HybridConfig, dtype: torch.dtype) -> int:
    """Bytes the cache grows by per token per sequence: keys and values of the attention layers
    only (SSM layers hold a fixed-size state)."""
    cfg = config.text_config
    per_layer = 2 * cfg.num_key_value_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
    return per_layer * len(config.attention_layers)


AutoConfig.register(HybridConfig.model_type, HybridConfig, exist_ok=True)
AutoModelForCausalLM.register(HybridConfig, HybridForCausalLM, exist_ok=True)
