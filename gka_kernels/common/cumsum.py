"""Cumulative sums of per-head, per-token scalars: the chunk-local cumsum of log-decays (the ``G`` of
every chunked kernel) and the reverse cumsum over whole sequences that turns per-token decay
gradients into gradients of the raw decays."""

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


@triton.jit
def sequence_reverse_cumsum_kernel(
    x, parts, final, out, cu_seqlens, T, n_tokens,
    H: tl.constexpr, NP: tl.constexpr, BS: tl.constexpr, HAS_FINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """out[t] = final[n] + sum_{s >= t, s in sequence n of t} (x[s] + sum_p parts[p, s])
    (float64 sums).

    Grid (sequences, H); one program walks its sequence of one head backwards in blocks of BS
    tokens (a [BS] vector strided by H), carrying the sum of the later blocks."""
    i_n = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n * T
        eos = bos + T
    carry = tl.zeros([], tl.float64)
    if HAS_FINAL:
        carry += tl.load(final + i_n * H + i_h).to(tl.float64)
    for i in range(tl.cdiv(eos - bos, BS)):
        o_t = eos - (i + 1) * BS + tl.arange(0, BS)
        m_t = o_t >= bos
        b = tl.load(x + o_t * H + i_h, mask=m_t, other=0).to(tl.float64)
        for p in tl.static_range(NP):
            b += tl.load(parts + (p * n_tokens + o_t) * H + i_h, mask=m_t, other=0).to(tl.float64)
        c = tl.cumsum(b, axis=0)
        total = tl.sum(b, axis=0)
        tl.store(out + o_t * H + i_h, (carry + total - c + b).to(out.dtype.element_ty), mask=m_t)
        carry += total


def sequence_reverse_cumsum(
    x: torch.Tensor,
    parts: torch.Tensor | None = None,
    final: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse cumulative sum of ``x [B, T, H]`` (plus ``parts [P, B, T, H]`` summed over ``P``) over
    each sequence (each batch row, or each ``cu_seqlens`` segment with ``B == 1``), plus
    ``final [N, H]`` per sequence: ``out[t] = final[n] + sum_{s >= t in n} x[s] (+ parts[:, s])``.
    Sums in float64; returns ``x``'s dtype."""
    B, T, H = x.shape
    out = torch.empty_like(x)
    if T == 0:
        return out
    N = cu_seqlens.numel() - 1 if cu_seqlens is not None else B
    sequence_reverse_cumsum_kernel[(N, H)](
        x, parts, final, out, cu_seqlens, T, B * T,
        H=H, NP=parts.shape[0] if parts is not None else 0, BS=1024, HAS_FINAL=final is not None,
        IS_VARLEN=cu_seqlens is not None,
    )
    return out


register_aot(AotSpec(
    name="chunk_local_cumsum[varlen,bt64]",
    kernel=chunk_local_cumsum_kernel,
    types={"g": "*fp32", "out": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32"},
    constexprs={"H": 32, "BT": 64, "IS_VARLEN": True, "REVERSE": False, "ACC": tl.float32},
))
register_aot(AotSpec(
    name="sequence_reverse_cumsum[varlen,np8,final]",
    kernel=sequence_reverse_cumsum_kernel,
    types={"x": "*fp32", "parts": "*fp32", "final": "*fp32", "out": "*fp32", "cu_seqlens": "*i32",
           "n_tokens": "i64"},
    constexprs={"H": 32, "NP": 8, "BS": 1024, "HAS_FINAL": True, "IS_VARLEN": True},
))
