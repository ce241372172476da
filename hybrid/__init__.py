"""Hybrid (attention + SSM) models built from Transformers, priming and alignment (SPEC 7).

- ``HybridConfig`` / ``HybridForCausalLM`` / ``HybridCache``: the model, its config and its cache
- ``convert_to_hybrid``: weight transfer from a source Transformer (priming, stage 0)
- ``select_layers_swa`` / ``uniform_layers``: which attention layers to replace
- ``align``: distillation of the SSM layers against the source (stage 1)
- ``gka-prime`` / ``python -m gka_kernels.hybrid.prime``: the command line
"""

from .cache import HybridCache, SSMStateLayer
from .configuration import HybridConfig
from .modeling import HybridForCausalLM, SSMAttention, cache_bytes_per_token
from .pattern import format_pattern, parse_pattern, uniform_layers
from .tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer", "HybridCache", "HybridConfig", "HybridForCausalLM", "SSMAttention", "SSMStateLayer",
    "cache_bytes_per_token", "format_pattern", "parse_pattern", "uniform_layers",
]
