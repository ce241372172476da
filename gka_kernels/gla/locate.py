"""Where a chunk lives: the device-side bookkeeping shared by the chunk-parallel GLA kernels."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def locate_chunk(i_c, cu_seqlens, chunk_indices, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Global chunk index ``i_c`` (``b * cdiv(T, BT) + t``, or a row of ``chunk_indices`` when
    varlen) -> (chunk index within its sequence, first token of the sequence as int64, sequence
    length)."""
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        NT = tl.cdiv(T, BT)
        i_t = i_c % NT
        bos = (i_c // NT).to(tl.int64) * T
        seq_len = T
    return i_t, bos, seq_len
