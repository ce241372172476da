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
