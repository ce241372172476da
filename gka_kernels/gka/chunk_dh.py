"""Reverse pass over chunks carrying the adjoint of the key covariance ``H`` (backward).

With the per-token direct gradient (implicit differentiation, ``c_t`` from the solve backward)

    dH_t = -dqs_t x_t^T - c_t H_t

the adjoint of ``H_t`` through its recurrence is ``D_t = sum_{s >= t} exp(Gc_s - Gc_t) dH_s``.
Chunk-wise, with ``D_c`` the part coming from tokens after chunk ``c`` (taken at its last token)
and the chunk-local cumsum ``G``:

    D_{c-1} = exp(G_last) D_c + sum_{s in c} exp(G_s) dH_s
            = exp(G_last) D_c - (exp(G) * dQs)^T X - b0 H_c - (beta * K)^T K

where ``sum_s exp(G_s) c_s H_s = b0 H_c + sum_j beta_j k_j k_j^T`` with
``b0 = sum_s c_s exp(2 G_s)`` and ``beta`` from the solve backward. ``dh[slot(c)]`` stores ``D_c``
(float32); the pass starts from the gradient of the final state and ends with the gradient of
the initial state. Like a linear-attention backward state pass with "v = k" plus the lambda path.

Precision: the dots take ``solve_dot_dtype`` operands (float16 for 16-bit inputs; bf16 operands
put 1.6e-2 of error into ``dgk``): ``x`` rows of the column block at unit norm, their norms folded
into the ``exp(G) dQs`` tile, which is divided by its largest magnitude and multiplied back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype
from gka_kernels.gka._common import (
    CHUNK, dot_precision, row_norms, sequence_coords, solve_dot_dtype, split_hi_lo, tile_scale,
)


# Wider tiles read x and dqs fewer times (each is read K / BKI and K / BKJ times over the grid:
# 1.6 GB of the ~2.8 GB this pass moves at train-4k with 32 x 64 tiles) but leave fewer programs
# to hide the sequential chunk loop; 128 x 128 (one program per head) spills ~630 B per thread
# when compiled for sm_90 here. The autotuner measures.
@autotune(
    configs=[
        triton.Config({"BKI": bki, "BKJ": bkj}, num_warps=w, num_stages=s)
        for bki, bkj, w in ((64, 64, 8), (32, 64, 8), (32, 32, 4), (32, 32, 8), (128, 64, 8),
                            (128, 128, 16))
        for s in (2, 3)
    ],
    key=["K", "H", "IS_VARLEN"],
)
@triton.jit
def chunk_gka_bwd_dh_kernel(
    k, x, dqs, gcum, lam_c, beta, h, dh, dht, dh0, cu_seqlens, chunk_offsets, T, NT,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
    BKI: tl.constexpr, BKJ: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DX: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (cdiv(K, BKI), cdiv(K, BKJ), N*H): a [BKI, BKJ] tile of one head's adjoint, walking
    the chunks backwards; per chunk two [BKI, BT] x [BT, BKJ] dots."""
    i_i = tl.program_id(0)
    i_j = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, n_chunks, boh = sequence_coords(i_n, cu_seqlens, chunk_offsets, T, NT, BT, IS_VARLEN)

    o_i = i_i * BKI + tl.arange(0, BKI)
    o_j = i_j * BKJ + tl.arange(0, BKJ)
    m_i = o_i < K
    m_j = o_j < K
    m_ij = m_i[:, None] & m_j[None, :]
    o_ij = o_i[:, None] * K + o_j[None, :]
    o_t = tl.arange(0, BT)

    b_d = tl.zeros([BKI, BKJ], dtype=ACC)
    if USE_DHT:
        b_d += tl.load(dht + i_nh.to(tl.int64) * K * K + o_ij, mask=m_ij, other=0).to(ACC)
    for i_r in range(n_chunks):
        i_t = n_chunks - 1 - i_r
        p_state = ((boh + i_t) * H + i_h) * K * K + o_ij
        tl.store(dh + p_state, b_d.to(dh.dtype.element_ty), mask=m_ij)
        rows = tl.minimum(seq_len - i_t * BT, BT)
        m_t = o_t < rows
        tok = bos + i_t * BT + o_t
        b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
        g_last = tl.load(gcum + (bos + i_t * BT + rows - 1) * H + i_h).to(ACC)
        b_c = tl.load(lam_c + tok * H + i_h, mask=m_t, other=0).to(ACC)
        b_beta = tl.load(beta + tok * H + i_h, mask=m_t, other=0).to(ACC)
        b0 = tl.sum(b_c * tl.exp(2.0 * b_g), axis=0)
        p_row = (tok * H + i_h) * K
        p_k = (tok * HKV + i_hk) * K
        b_dq = tl.load(dqs + p_row[:, None] + o_i[None, :], mask=m_t[:, None] & m_i[None, :], other=0).to(ACC)
        b_x = tl.load(x + p_row[:, None] + o_j[None, :], mask=m_t[:, None] & m_j[None, :], other=0)
        b_ki = tl.load(k + p_k[:, None] + o_i[None, :], mask=m_t[:, None] & m_i[None, :], other=0).to(ACC)
        b_kj = tl.load(k + p_k[:, None] + o_j[None, :], mask=m_t[:, None] & m_j[None, :], other=0)
        b_hc = tl.load(h + p_state, mask=m_ij, other=0).to(ACC)
        # x rows (this column block) to unit norm, the norms folded into the tile-scaled dqs side.
        b_xn, b_xr = row_norms(b_x.to(ACC))
        b_dq = b_dq * (tl.exp(b_g) * b_xn)[:, None]
        s_dq = tile_scale(b_dq)
        b_ki = (b_ki * b_beta[:, None]).to(DX)
        b_d = b_d * tl.exp(g_last) - b0 * b_hc
        # (D + D^T) k later projects both x and dqs onto keys: for 16-bit DX both enter as
        # hi + lo (split_hi_lo; the lo x lo term is below fp32 rounding).
        b_xhi, b_xlo = split_hi_lo(b_x.to(ACC) * b_xr[:, None], DX)
        b_dqhi, b_dqlo = split_hi_lo(b_dq / s_dq, DX)
        b_dx = tl.dot(tl.trans(b_dqhi), b_xhi, input_precision=PREC, out_dtype=ACC)
        if DX.primitive_bitwidth == 16:
            b_dx = tl.dot(tl.trans(b_dqhi), b_xlo, b_dx, input_precision=PREC, out_dtype=ACC)
            b_dx = tl.dot(tl.trans(b_dqlo), b_xhi, b_dx, input_precision=PREC, out_dtype=ACC)
        b_d -= s_dq * b_dx
        b_d -= tl.dot(tl.trans(b_ki), b_kj.to(ACC).to(DX), input_precision=PREC, out_dtype=ACC)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * K + o_ij, b_d.to(dh0.dtype.element_ty), mask=m_ij)


def chunk_gka_bwd_dh(
    k: torch.Tensor,
    x: torch.Tensor,
    dqs: torch.Tensor,
    gcum: torch.Tensor,
    lam_c: torch.Tensor,
    beta: torch.Tensor,
    h: torch.Tensor,
    dht: torch.Tensor | None,
    num_seqs: int,
    need_dh0: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Adjoint chunk states.

    Args:
        k: ``[B,T,HKV,K]``; x: ``[B,T,H,K]`` forward solution; dqs: ``[B,T,H,K]`` adjoint solution.
        gcum: chunk-local cumsum of ``gk`` ``[B,T,H]``; lam_c, beta: ``[B,T,H]`` from the solve backward.
        h: ``[n_slots, H, K, K]`` chunk-start states of ``H``.
        dht: gradient of the final ``h_kk`` ``[N,H,K,K]`` or None.

    Returns:
        ``dh [n_slots, H, K, K]`` (float32/64; the adjoint after each chunk) and the gradient of the
        initial ``h_kk`` ``[N,H,K,K]`` (or None).
    """
    B, T, HKV, K = k.shape
    H = x.shape[2]
    NT = triton.cdiv(T, CHUNK)
    acc_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    dh = k.new_empty(h.shape, dtype=acc_dtype)
    dh0 = k.new_empty(num_seqs, H, K, K, dtype=acc_dtype) if need_dh0 else None
    def grid(meta):
        return (triton.cdiv(K, meta["BKI"]), triton.cdiv(K, meta["BKJ"]), num_seqs * H)
    chunk_gka_bwd_dh_kernel[grid](
        k, x, dqs, gcum, lam_c, beta, h, dh, dht, dh0, cu_seqlens, chunk_offsets, T, NT,
        H=H, HKV=HKV, K=K, BT=CHUNK,
        USE_DHT=dht is not None, STORE_DH0=need_dh0, IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(k.dtype), DX=solve_dot_dtype(k.dtype), PREC=dot_precision(k.dtype),
    )
    return dh, dh0


for _bki, _bkj, _w in ((64, 64, 8), (32, 32, 4)):
    register_aot(AotSpec(
        name=f"gka.chunk_bwd_dh[bf16,k128,varlen,{_bki}x{_bkj},w{_w}]",
        kernel=chunk_gka_bwd_dh_kernel,
        types={"k": "*bf16", "x": "*fp32", "dqs": "*fp32", "gcum": "*fp32", "lam_c": "*fp32",
               "beta": "*fp32", "h": "*fp32", "dh": "*fp32", "dht": "*fp32", "dh0": "*fp32",
               "cu_seqlens": "*i32", "chunk_offsets": "*i64", "T": "i32", "NT": "i32"},
        constexprs={"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BKI": _bki, "BKJ": _bkj, "USE_DHT": True,
                    "STORE_DH0": True, "IS_VARLEN": True, "ACC": tl.float32, "DX": tl.float16,
                    "PREC": "ieee"},
        num_warps=_w, num_stages=2,
    ))
