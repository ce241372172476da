"""Mamba-2 SSD (SPEC 4), drop-in for ``mamba_ssm``'s names: ``mamba_chunk_scan_combined``
(chunked, differentiable, built on ``gka_kernels.gla``'s kernels) and ``selective_state_update``
(one-token step, in place on a state pool)."""

from gka_kernels.mamba2.chunk import mamba_chunk_scan_combined
from gka_kernels.mamba2.decode import selective_state_update

__all__ = ["mamba_chunk_scan_combined", "selective_state_update"]
