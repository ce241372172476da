"""``HybridConfig``: the configuration of a hybrid (attention + SSM) causal language model.

It nests the source model's own config as ``text_config`` (a Llama, Mistral, Qwen2, Qwen3 or
Qwen3-MoE config) and adds the layer pattern and the SSM settings. Saved as ``config.json`` with
``model_type = "gka_hybrid"``; ``import gka_kernels.hybrid`` registers it with ``AutoConfig``.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

from .families import get_family
from .pattern import ATTENTION, SSM_TOKENS, parse_pattern

# Constructor options accepted per mixer token (forwarded from ``ssm_config``).
SSM_OPTIONS = {
    "GKA": ("num_iter", "ridge_ratio", "conv_size", "norm_eps", "bp_lambda"),
    "GDN": ("conv_size", "norm_eps"),
    "M2": ("conv_size", "norm_eps", "chunk_size"),
}


@strict
class HybridConfig(PreTrainedConfig):
    """Config of ``HybridForCausalLM``.

    Args:
        text_config: the source model's config (dict with ``model_type`` or a config object).
        hybrid_override_pattern: one token per layer (``*``, ``GKA``, ``GDN``, ``M2``) joined by
            ``-`` (SPEC 7); ``None`` keeps attention everywhere.
        ssm_config: per-token mixer options, e.g. ``{"GKA": {"num_iter": 10}}``; allowed keys
            are listed in ``SSM_OPTIONS``.
        source_model: where the weights came from (free text, for provenance).
    """

    model_type = "gka_hybrid"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    hybrid_override_pattern: str | None = None
    ssm_config: dict | None = None
    source_model: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        get_family(self.text_config.model_type)
        n = self.text_config.num_hidden_layers
        if self.hybrid_override_pattern is None:
            self.hybrid_override_pattern = "-".join([ATTENTION] * n)
        parse_pattern(self.hybrid_override_pattern, n)
        self.ssm_config = dict(self.ssm_config or {})
        for token, options in self.ssm_config.items():
            if token not in SSM_TOKENS:
                raise ValueError(f"ssm_config: keys must be among {list(SSM_TOKENS)}, got {token!r}")
            unknown = sorted(set(options) - set(SSM_OPTIONS[token]))
            if unknown:
                raise ValueError(f"ssm_config[{token!r}]: unknown option(s) {unknown}; "
                                 f"allowed {list(SSM_OPTIONS[token])}")
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    @property
    def layer_pattern(self) -> list[str]:
        """The pattern as a list of tokens, one per layer."""
        return parse_pattern(self.hybrid_override_pattern, self.text_config.num_hidden_layers)

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_pattern) if t == ATTENTION]

    @property
    def ssm_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_pattern) if t != ATTENTION]

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
