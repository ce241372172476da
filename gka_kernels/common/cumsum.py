"""Chunk-local cumulative sum of per-head log-decays (the ``G`` of every chunked kernel)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import compute_dtype
from gka_kernels.common.varlen import prepare_chunk_indices


@triton.jit
def chunk_local_cumsum_kernel(
    g, out, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, BT: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[t] = sum_{s in chunk(t), s <= t} g[s]   (REVERSE: s >= t).

    Grid (chunks, B*H); one program loads one chunk of one head, a [BT] vector strided by H.
    """
    i_t = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_t * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_t * 2 + 1)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_b.to(tl.int64) * T
        seq_len = T
    o_t = i_t.to(tl.int64) * BT + tl.arange(0, BT)
    mask = o_t < seq_len
    ptrs = (bos + o_t) * H + i_h
    b = tl.load(g + ptrs, mask=mask, other=0).to(ACC)
    c = tl.cumsum(b, axis=0)
    if REVERSE:
        c = tl.sum(b, axis=0) - c + b
    tl.store(out + ptrs, c.to(out.dtype.element_ty), mask=mask)


def chunk_local_cumsum(
    g: torch.Tensor,
    chunk_size: int,
    *,
    reverse: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cumulative sum of ``g [B, T, H]`` restarted at every chunk of ``chunk_size`` tokens (and at
    every sequence start when ``cu_seqlens`` is given). Returns float32 (float64 for float64 ``g``)."""
    B, T, H = g.shape
    out_dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    out = torch.empty(B, T, H, device=g.device, dtype=out_dtype)
    if T == 0:
        return out
    if cu_seqlens is not None:
        if chunk_indices is None:
            chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
        grid = (chunk_indices.shape[0], H)
    else:
        grid = (triton.cdiv(T, chunk_size), B * H)
    chunk_local_cumsum_kernel[grid](
        g.contiguous(), out, cu_seqlens, chunk_indices, T,
        H=H, BT=chunk_size, IS_VARLEN=cu_seqlens is not None, REVERSE=reverse,
        ACC=compute_dtype(g.dtype),
    )
    return out


register_aot(AotSpec(
    name="chunk_local_cumsum[varlen,bt64]",
    kernel=chunk_local_cumsum_kernel,
    types={"g": "*fp32", "out": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32"},
    constexprs={"H": 32, "BT": 64, "IS_VARLEN": True, "REVERSE": False, "ACC": tl.float32},
))
