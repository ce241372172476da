"""Source model families a hybrid can be built from (SPEC 7) and what they carry.

Each family names the ``transformers`` base-model class whose decoder layers the hybrid keeps,
and the attention features that an SSM replacement cannot carry (biases, q/k norms, RoPE).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """One supported source family."""

    model_type: str
    module: str
    base_model_class: str
    causal_lm_class: str
    has_qk_norm: bool
    may_have_attention_bias: bool

    def base_model_cls(self):
        return getattr(importlib.import_module(self.module), self.base_model_class)

    def causal_lm_cls(self):
        return getattr(importlib.import_module(self.module), self.causal_lm_class)


FAMILIES: dict[str, Family] = {
    f.model_type: f for f in (
        Family("llama", "transformers.models.llama.modeling_llama", "LlamaModel", "LlamaForCausalLM",
               has_qk_norm=False, may_have_attention_bias=True),
        Family("mistral", "transformers.models.mistral.modeling_mistral", "MistralModel",
               "MistralForCausalLM", has_qk_norm=False, may_have_attention_bias=False),
        Family("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2Model", "Qwen2ForCausalLM",
               has_qk_norm=False, may_have_attention_bias=True),
        Family("qwen3", "transformers.models.qwen3.modeling_qwen3", "Qwen3Model", "Qwen3ForCausalLM",
               has_qk_norm=True, may_have_attention_bias=True),
        Family("qwen3_moe", "transformers.models.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeModel",
               "Qwen3MoeForCausalLM", has_qk_norm=True, may_have_attention_bias=True),
    )
}


def get_family(model_type: str) -> Family:
    """The ``Family`` of a source ``model_type``; a clear error for anything unsupported."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ValueError(
            f"unsupported source model type {model_type!r}: gka-prime converts decoder-only "
            f"{sorted(FAMILIES)} models (transformers 5.x). Other architectures (encoder-decoder, "
            "multimodal, models that already contain linear-attention or SSM layers) are not supported.")
    return family
