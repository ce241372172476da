"""Chunk bookkeeping for variable-length (``cu_seqlens``) inputs, shared by all chunked kernels.

A chunked kernel over packed sequences launches one program per (sequence, chunk) pair. These
helpers build that list on the host once per call.
"""

from __future__ import annotations

import torch


def chunk_counts(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Number of chunks of each sequence, ``ceil(len_i / chunk_size)`` (0 for empty sequences)."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    return (lens + chunk_size - 1) // chunk_size


def prepare_chunk_indices(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[NT, 2]`` int32 tensor of (sequence index, chunk index within the sequence) for every chunk
    of every sequence, in order."""
    counts = chunk_counts(cu_seqlens, chunk_size).to(torch.int64)
    seq = torch.repeat_interleave(torch.arange(counts.numel(), device=cu_seqlens.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    local = torch.arange(seq.numel(), device=cu_seqlens.device) - starts[seq]
    return torch.stack([seq, local], 1).to(torch.int32).contiguous()


def prepare_chunk_offsets(cu_seqlens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[N+1]`` int64 prefix sum of the chunk counts: sequence i owns global chunks
    ``[offsets[i], offsets[i+1])``."""
    counts = chunk_counts(cu_seqlens, chunk_size).to(torch.int64)
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
