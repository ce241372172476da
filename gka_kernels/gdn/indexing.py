"""Helpers shared by the GDN kernels: which tokens a program owns, and loop tile sizes.

Fixed-length inputs ``[B, T, ...]`` have ``NT = ceil(T / BT)`` chunks per sequence; variable-length
inputs (``cu_seqlens``, ``B == 1``) enumerate the chunks of all sequences in order with
``chunk_indices`` ``[NT_total, 2]`` = (sequence, chunk within the sequence). Per-chunk buffers
(chunk states ``h``/``dh``) are indexed by the global chunk number: ``i_b * NT + i_t`` for fixed
length, the position in ``chunk_indices`` for varlen. Token offsets are 64-bit.
"""

from __future__ import annotations

import triton
import triton.language as tl

from gka_kernels.common.triton_utils import is_interpreter, next_power_of_2

#: Largest tile along a looped head dimension: 64 on the GPU; 16 under the interpreter, so that
#: CPU tests with small head dims still run several blocks of every loop.
MAX_BLOCK = 16 if is_interpreter() else 64


def block_size(dim: int) -> int:
    """Tile size for looping over a head dimension of size ``dim`` (a power of two, >= 16)."""
    return min(MAX_BLOCK, next_power_of_2(dim))


@triton.jit
def chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For program chunk id ``i_c`` (and batch ``i_b`` when fixed-length) return
    ``(bos, seq_len, i_t, i_tg)``: first token of the sequence (int64), its length, the chunk index
    inside the sequence and the global chunk index (for per-chunk buffers)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        i_tg = i_c.to(tl.int64)
    else:
        i_t = i_c
        bos = i_b.to(tl.int64) * T
        seq_len = T
        i_tg = i_b.to(tl.int64) * tl.cdiv(T, BT) + i_c
    return bos, seq_len, i_t, i_tg


@triton.jit
def sequence_span(i_n, T, cu_seqlens, chunk_offsets, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For sequence ``i_n`` return ``(bos, seq_len, n_chunks, first_chunk)`` (64-bit token and chunk
    offsets); used by the sequential state passes."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        boc = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
        boc = i_n.to(tl.int64) * tl.cdiv(T, BT)
    return bos, seq_len, tl.cdiv(seq_len, BT), boc
