"""Hybrid (attention + SSM) models built from Transformers, priming and alignment (SPEC 7).

- ``HybridConfig`` / ``HybridForCausalLM`` / ``HybridCache``: the model (the source family's own
  decoder layers, with SSM mixers in the layers named by ``hybrid_override_pattern``), its config
  and its cache (KV for attention layers, fixed-size states for SSM layers)
- ``convert_to_hybrid``: priming stage 0, weight transfer from a source Transformer
- ``score_layers_swa`` / ``select_layers``: which attention layers to replace
- ``Aligner`` / ``AlignConfig``: priming stage 1, distillation of the SSM layers (resumable)
- ``gka-prime`` / ``python -m gka_kernels.hybrid.prime``: the command line
- ``ByteTokenizer`` and ``embedded.load_embedded_model``: the small model shipped in ``assets/``
"""

from .align import AlignConfig, Aligner
from .cache import HybridCache, SSMStateLayer
from .configuration import HybridConfig
from .modeling import HybridForCausalLM, SSMAttention, cache_bytes_per_token
from .pattern import format_pattern, parse_pattern, uniform_layers
from .selection import score_layers_swa, select_layers
from .tokenizer import ByteTokenizer
from .transfer import convert_to_hybrid

__all__ = [
    "AlignConfig", "Aligner", "ByteTokenizer", "HybridCache", "HybridConfig", "HybridForCausalLM",
    "SSMAttention", "SSMStateLayer", "cache_bytes_per_token", "convert_to_hybrid", "format_pattern",
    "parse_pattern", "score_layers_swa", "select_layers", "uniform_layers",
]
