"""Small pieces the references share."""

from __future__ import annotations

import torch


def spans(B: int, T: int, cu_seqlens: torch.Tensor | None) -> list[tuple[int, int, int]]:
    """``(batch row, start, end)`` of every sequence: the ``B`` rows of ``[B, T, ...]`` inputs, or the
    sequences packed along ``T`` by ``cu_seqlens [N + 1]`` (``B == 1``)."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    bounds = cu_seqlens.tolist()
    return [(0, bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 when any given tensor is float64, else float32 (``None`` entries are skipped)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32
