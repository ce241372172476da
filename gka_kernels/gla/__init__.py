"""Chunked simple gated linear attention with grouped heads (the readout shared by GKA and the
chunked Mamba-2 op): ``chunk_simple_gla``."""

from gka_kernels.gla.chunk import chunk_simple_gla

__all__ = ["chunk_simple_gla"]
