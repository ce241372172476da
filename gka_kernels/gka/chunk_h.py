"""Chunk-start states of the key covariance ``H`` (forward), one sequential pass over chunks.

    H_t = exp(gk_t) H_{t-1} + k_t k_t^T          per query head, k read from head h // (H // HKV)

With ``G`` the chunk-local cumulative sum of ``gk`` and ``G_last`` its value at the chunk's last
valid token, the state after a chunk is

    H_next = exp(G_last) H_c + sum_j exp(G_last - G_j) k_j k_j^T

``H_c`` (the state *before* chunk ``c``) is stored as ``h[slot(c)] = H_c / s_c`` with one scale
per chunk and head, ``scale[slot(c)] = s_c``; these are the only ``K x K`` matrices ever written.
The recurrence accumulates in float32 registers (float64 for float64 inputs). The stored copy is
in the dot dtype of its consumers (``solve_dot_dtype``: float16 for 16-bit inputs, float32 /
float64 otherwise), which read it straight into their ``tl.dot`` operands: the solve used to
round ``H_c / ||H_c||`` to float16 anyway, so storing one float16 rounding of ``H_c / s_c`` costs
no precision there and halves the bytes every kernel moves.

``s_c`` bounds every entry of ``H_c`` so that ``H_c / s_c`` stays in float16 range (``|.| <= 1``,
no overflow on long undecayed sequences, no loss of relative precision on tiny states):

    s_next = exp(G_last) s_c + m_c,    m_c = sum_j exp(G_last - G_j) ||k_j||^2,    s_0 = max |h0|

(the key part of ``H_c`` is positive semidefinite, so its entries are bounded by its trace, which
this recurrence follows; the initial state's part by its largest entry, a host reduction). The
chunks' key mass ``m_c`` comes from a chunk-parallel kernel (:func:`chunk_gka_key_mass_kernel`), so the
sequential pass adds one loaded scalar per chunk. Forming it there instead cost registers (full key
rows: 173 instead of 124 on sm_90, half the resident programs) or a cross-warp reduction in the
sequential loop, and forming the squared norms with torch ops cost 0.24 ms at train-4k on an H200
(run 101). ``s_c = 0`` is stored as 1.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype, next_power_of_2
from gka_kernels.gka._common import (
    CHUNK, chunk_program, dot_precision, sequence_coords, solve_dot_dtype, state_dtype,
)


@triton.jit
def chunk_gka_key_mass_kernel(k, gcum, mass, cu_seqlens, chunk_indices, T, NT,
                              H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                              BK: tl.constexpr, IS_VARLEN: tl.constexpr, ACC: tl.constexpr):
    """Grid (chunks, B*HKV): for each of the H/HKV query heads h reading this key head,
    ``mass[slot, h] = sum_j exp(G_last - G_j) ||k_j||^2`` over the chunk's rows ([BT, BK] keys
    read once, [BT] decays per query head)."""
    i_hk, _, i_s, tok, m_t = chunk_program(cu_seqlens, chunk_indices, T, NT, HKV, HKV, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    b_k = tl.load(k + ((tok * HKV + i_hk) * K)[:, None] + o_k[None, :],
                  mask=m_t[:, None] & (o_k < K)[None, :], other=0).to(ACC)
    b_kn = tl.sum(b_k * b_k, axis=1)
    last = tl.arange(0, BT) == tl.sum(m_t.to(tl.int32), axis=0) - 1
    for i_g in range(H // HKV):
        i_h = i_hk * (H // HKV) + i_g
        b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
        g_last = tl.sum(tl.where(last, b_g, 0.0), axis=0)
        b_e = tl.where(m_t, tl.exp(g_last - b_g), 0.0)
        tl.store(mass + i_s * H + i_h, tl.sum(b_e * b_kn, axis=0).to(mass.dtype.element_ty))


@autotune(
    configs=[
        triton.Config({"BKI": bki, "BKJ": bkj}, num_warps=w, num_stages=s)
        for bki, bkj in ((64, 64), (32, 64), (32, 32))
        for w in (4, 8)
        for s in (2, 3)
    ],
    key=["K", "H", "IS_VARLEN"],
)
@triton.jit
def chunk_gka_fwd_h_kernel(
    k, mass, gcum, h, h_scale, h0, h0_scale, ht, cu_seqlens, chunk_offsets, T, NT,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
    BKI: tl.constexpr, BKJ: tl.constexpr,
    USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (cdiv(K, BKI), cdiv(K, BKJ), N*H): each program owns a [BKI, BKJ] tile of one head's
    state and walks the sequence chunk by chunk: per chunk it stores ``H_c / s_c``, then one
    [BKI, BT] x [BT, BKJ] dot advances the tile and the chunk's key mass advances ``s``."""
    i_i = tl.program_id(0)
    i_j = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, n_chunks, boh = sequence_coords(i_n, cu_seqlens, chunk_offsets, T, NT, BT, IS_VARLEN)

    o_i = i_i * BKI + tl.arange(0, BKI)
    o_j = i_j * BKJ + tl.arange(0, BKJ)
    m_ij = (o_i[:, None] < K) & (o_j[None, :] < K)
    o_ij = o_i[:, None] * K + o_j[None, :]
    o_t = tl.arange(0, BT)
    first_tile = (i_i == 0) & (i_j == 0)

    b_h = tl.zeros([BKI, BKJ], dtype=ACC)
    s = tl.zeros([], dtype=ACC)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * K + o_ij, mask=m_ij, other=0).to(ACC)
        s += tl.load(h0_scale + i_nh).to(ACC)
    for i_t in range(n_chunks):
        s_c = tl.where(s > 0, s, 1.0)
        slot = (boh + i_t) * H + i_h
        tl.store(h + slot * K * K + o_ij, (b_h * (1.0 / s_c)).to(h.dtype.element_ty), mask=m_ij)
        tl.store(h_scale + slot, s_c.to(h_scale.dtype.element_ty), mask=first_tile)
        rows = tl.minimum(seq_len - i_t * BT, BT)
        m_t = o_t < rows
        tok = bos + i_t * BT + o_t
        b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
        g_last = tl.load(gcum + (bos + i_t * BT + rows - 1) * H + i_h).to(ACC)
        p_k = k + (tok * HKV + i_hk) * K
        b_ki = tl.load(p_k[:, None] + o_i[None, :], mask=m_t[:, None] & (o_i[None, :] < K), other=0).to(ACC)
        b_kj = tl.load(p_k[:, None] + o_j[None, :], mask=m_t[:, None] & (o_j[None, :] < K), other=0).to(ACC)
        s = s * tl.exp(g_last) + tl.load(mass + slot).to(ACC)
        b_ki = b_ki * tl.exp(g_last - b_g)[:, None]
        b_h = b_h * tl.exp(g_last) + tl.dot(tl.trans(b_ki.to(DT)), b_kj.to(DT),
                                            input_precision=PREC, out_dtype=ACC)
    if STORE_FINAL:
        tl.store(ht + i_nh.to(tl.int64) * K * K + o_ij, b_h.to(ht.dtype.element_ty), mask=m_ij)


class ChunkStates(NamedTuple):
    """The chunk-start states of ``H`` as stored: ``h [n_slots, H, K, K] = H_c / scale`` in the
    solve's dot dtype (float16 for 16-bit inputs) and ``scale [n_slots, H]`` (float32/64)."""

    h: torch.Tensor
    scale: torch.Tensor


def chunk_gka_fwd_h(
    k: torch.Tensor,
    gcum: torch.Tensor,
    num_heads: int,
    num_seqs: int,
    n_slots: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
) -> tuple[ChunkStates, torch.Tensor | None]:
    """Chunk-start states of ``H``.

    Args:
        k: ``[B, T, HKV, K]`` keys (contiguous); their dtype sets the storage dtype.
        gcum: ``[B, T, H]`` chunk-local cumulative sum of ``gk`` (float32/64).
        num_heads: ``H``; ``num_seqs``: ``N``; ``n_slots``: ``B * NT`` or the total chunk count.
        initial_state: ``[N, H, K, K]`` or None.
        cu_seqlens, chunk_indices, chunk_offsets: varlen bookkeeping (``gla.chunk.ChunkPlan``) or None.

    Returns:
        the states before each chunk (:class:`ChunkStates`) and the final state ``[N, H, K, K]``
        (float32, float64 for float64 inputs) or None.
    """
    B, T, HKV, K = k.shape
    H = num_heads
    NT = triton.cdiv(T, CHUNK)
    acc_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    states = ChunkStates(k.new_empty(n_slots, H, K, K, dtype=state_dtype(k.dtype)),
                         k.new_empty(n_slots, H, dtype=acc_dtype))
    ht = k.new_empty(num_seqs, H, K, K, dtype=acc_dtype) if output_final_state else None
    mass = k.new_empty(n_slots, H, dtype=acc_dtype)
    mass_grid = (chunk_indices.shape[0], HKV) if cu_seqlens is not None else (NT, B * HKV)
    chunk_gka_key_mass_kernel[mass_grid](
        k, gcum, mass, cu_seqlens, chunk_indices, T, NT, H=H, HKV=HKV, K=K, BT=CHUNK,
        BK=next_power_of_2(K), IS_VARLEN=cu_seqlens is not None, ACC=compute_dtype(k.dtype),
    )
    h0_scale = None
    if initial_state is not None:
        h0_scale = initial_state.abs().amax((-2, -1)).to(acc_dtype)
    def grid(meta):
        return (triton.cdiv(K, meta["BKI"]), triton.cdiv(K, meta["BKJ"]), num_seqs * H)
    chunk_gka_fwd_h_kernel[grid](
        k, mass, gcum, states.h, states.scale, initial_state, h0_scale, ht, cu_seqlens, chunk_offsets, T, NT,
        H=H, HKV=HKV, K=K, BT=CHUNK,
        USE_H0=initial_state is not None, STORE_FINAL=output_final_state,
        IS_VARLEN=cu_seqlens is not None, ACC=compute_dtype(k.dtype), DT=solve_dot_dtype(k.dtype),
        PREC=dot_precision(k.dtype),
    )
    return states, ht


register_aot(AotSpec(
    name="gka.chunk_fwd_h[bf16,k128,varlen]",
    kernel=chunk_gka_fwd_h_kernel,
    types={"k": "*bf16", "mass": "*fp32", "gcum": "*fp32", "h": "*fp16", "h_scale": "*fp32", "h0": "*fp32",
           "h0_scale": "*fp32", "ht": "*fp32", "cu_seqlens": "*i32", "chunk_offsets": "*i64",
           "T": "i32", "NT": "i32"},
    constexprs={"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BKI": 64, "BKJ": 64, "USE_H0": True,
                "STORE_FINAL": True, "IS_VARLEN": True, "ACC": tl.float32, "DT": tl.float16, "PREC": "ieee"},
    num_warps=4, num_stages=2,
))
register_aot(AotSpec(
    name="gka.chunk_key_mass[bf16,k128,varlen]",
    kernel=chunk_gka_key_mass_kernel,
    types={"k": "*bf16", "gcum": "*fp32", "mass": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32",
           "T": "i32", "NT": "i32"},
    constexprs={"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BK": 128, "IS_VARLEN": True, "ACC": tl.float32},
    num_warps=4, num_stages=1,
))
