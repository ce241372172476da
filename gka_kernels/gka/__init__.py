"""Gated KalmaNet (SPEC 5): ``chunk_gka`` (chunked, differentiable) and ``fused_recurrent_gka``
(token loop, forward only, for decode and short sequences)."""

from gka_kernels.gka.chunk import chunk_gka
from gka_kernels.gka.fused_recurrent import fused_recurrent_gka

__all__ = ["chunk_gka", "fused_recurrent_gka"]
