"""Reverse pass over chunks carrying the adjoint of the key covariance ``H`` (backward).

With the per-token direct gradient (implicit differentiation, ``c_t`` from the solve backward)

    dH_t = -dqs_t x_t^T - c_t H_t

the adjoint of ``H_t`` through its recurrence is ``D_t = sum_{s >= t} exp(Gc_s - Gc_t) dH_s``.
Chunk-wise, with ``D_c`` the part coming from tokens after chunk ``c`` (taken at its last token)
and the chunk-local cumsum ``G``:

    D_{c-1} = exp(G_last) D_c + sum_{s in c} exp(G_s) dH_s
            = exp(G_last) D_c - (exp(G) * dQs)^T X - b0 H_c - (beta * K)^T K

where ``sum_s exp(G_s) c_s H_s = b0 H_c + sum_j beta_j k_j k_j^T`` with
``b0 = sum_s c_s exp(2 G_s)`` and ``beta`` from the solve backward. Like a linear-attention
backward state pass with "v = k" plus the lambda path.

The key gradient needs only the symmetric part ``S = D + D^T`` (``dk_t`` contains
``(D_t + D_t^T) k_t``), so the pass carries ``S``:

    S_{c-1} = exp(G_last) S_c - P^T X - X^T P - 2 b0 H_c - 2 (beta * K)^T K,   P = exp(G) * dQs

and, walking chunk ``c``, emits the part of ``dk`` that needs the states,
``dks_t = exp(G_last - G_t) S_c k_t - 2 beta_t H_c k_t`` (``H`` is symmetric, below), which
:mod:`gka_kernels.gka.chunk_dk` completes with the chunk's own tokens. No ``[K, K]`` adjoint is
stored per chunk. The antisymmetric part ``W = D - D^T`` (``W_{c-1} = exp(G_last) W_c - P^T X +
X^T P``) is carried only when the gradient of the initial state ``D_0 = (S_0 + W_0) / 2`` is
needed.

``H_c`` enters as ``2 H_c`` (one load), not ``H_c + H_c^T``: ``H`` is symmetric by contract (the
initial ``h_kk`` is; the backward already treats ``A_t = H_t + lam_t I`` as symmetric, e.g.
``dqs = A^{-1} dqm``), and the stored ``h`` (:mod:`gka_kernels.gka.chunk_h`) differs from its
transpose only by rounding: entry ``(a, b)`` sums ``round(e_t k_ta) k_tb`` where ``(b, a)`` sums
``round(e_t k_tb) k_ta`` (``e_t = exp(G_last - G_t)``, rounding to the dot dtype ``u``: float16
``2^-11`` for 16-bit inputs, tf32x3 / float64 otherwise), so ``|H_ab - H_ba| <= 2u max|H_c|``,
the size of the error ``h`` already carries and of the float16 rounding of the state columns.

The cross-term operands (the unit rows of ``x``, and ``P`` times the row norms of ``x`` divided by
its largest magnitude ``s_p``) are formed once per chunk by a parallel kernel (``chunk_gka_bwd_dh_operands_kernel``) and stored in the dot dtype (as hi + lo for
16-bit inputs: the same bytes as ``x`` and ``dqs`` in float32), so that the sequential pass, which
re-reads them once per column block, loads them into its dot tiles without converting them.

Precision: the dots take ``solve_dot_dtype`` operands (float16 for 16-bit inputs; bf16 operands
put 1.6e-2 of error into ``dgk``). ``x`` rows at unit norm, their norms folded into the ``P``
tile, which is divided by its largest magnitude and multiplied back; both enter the cross terms as
hi + lo. ``S_c`` and ``H_c`` enter the key contraction as float16 columns divided by their largest
magnitude, multiplied back on the output columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype, grid_bucket, next_power_of_2
from gka_kernels.gka._common import (
    CHUNK, chunk_coords, column_scale, dot_precision, row_norms, sequence_coords, solve_dot_dtype,
    split_hi_lo, tile_scale,
)


@autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)],
    key=["K", "H", "IS_VARLEN"],
)
@triton.jit
def chunk_gka_bwd_dh_operands_kernel(
    x, dqs, gcum, xh, xl, ph, pl, sp, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DX: tl.constexpr,
):
    """Grid (chunks, B*H): the cross-term operands of one chunk in the dot dtype, so that the
    sequential pass loads them straight into its dot tiles:
        X = x / |x| (rows),  P = exp(G) |x| dqs / s_p,  s_p = max |exp(G) |x| dqs| over the chunk,
    each as hi + lo for a 16-bit DX (``split_hi_lo``; only hi otherwise). Tiles [BT, BK]."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    bos, i_t, rows, i_s = chunk_coords(i_c, i_b, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t = o_t < rows
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    tok = bos + i_t * BT + o_t
    p_tile = ((tok * H + i_h) * K)[:, None] + o_k[None, :]
    b_x = tl.load(x + p_tile, mask=m_tk, other=0).to(ACC)
    b_xn, b_xr = row_norms(b_x)
    b_xhi, b_xlo = split_hi_lo(b_x * b_xr[:, None], DX)
    tl.store(xh + p_tile, b_xhi, mask=m_tk)
    b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b_p = tl.load(dqs + p_tile, mask=m_tk, other=0).to(ACC) * (tl.exp(b_g) * b_xn)[:, None]
    s_p = tile_scale(b_p)
    b_phi, b_plo = split_hi_lo(b_p / s_p, DX)
    tl.store(ph + p_tile, b_phi, mask=m_tk)
    if DX.primitive_bitwidth == 16:
        tl.store(xl + p_tile, b_xlo, mask=m_tk)
        tl.store(pl + p_tile, b_plo, mask=m_tk)
    tl.store(sp + i_s * H + i_h, s_p.to(sp.dtype.element_ty))


# One program holds a [K, BKJ] column block of S for all K rows, so that it can contract the
# chunk's keys with it (the key-gradient part) without other programs' rows. Narrower blocks give
# more programs to hide the sequential chunk loop but re-read the chunk's full x, dqs and k rows
# (L2 hits while a head's programs advance together). The autotuner measures.
@autotune(
    configs=[
        triton.Config({"BKJ": bkj}, num_warps=w, num_stages=s)
        for bkj, w in ((32, 4), (32, 8), (64, 4), (64, 8))
        for s in (1, 2)
    ],
    key=["K", "H", "IS_VARLEN", "STORE_DH0", "nh_bucket"],
)
@triton.jit
def chunk_gka_bwd_dh_kernel(
    k, xh, xl, ph, pl, sp, gcum, lam_c, beta, h, dks, dht, dh0, cu_seqlens, chunk_offsets, T, NT,
    nh_bucket,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BKJ: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DX: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (cdiv(K, BKJ), N*H): columns [j0, j0 + BKJ) of one head's S = D + D^T ([BK, BKJ] tile,
    all rows), walking the chunks backwards. Per chunk: two [BT, BK] x [BK, BKJ] dots emit the
    key-gradient part, then [BK, BT] x [BT, BKJ] dots (three per cross term, one for the keys)
    update S (and W = D - D^T when the initial state's gradient is stored). ``nh_bucket``
    (``grid_bucket(N * H)``, an autotune key, not read here): few sequences want narrower blocks."""
    i_j = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, n_chunks, boh = sequence_coords(i_n, cu_seqlens, chunk_offsets, T, NT, BT, IS_VARLEN)

    o_i = tl.arange(0, BK)
    o_j = i_j * BKJ + tl.arange(0, BKJ)
    m_i = o_i < K
    m_j = o_j < K
    m_ij = m_i[:, None] & m_j[None, :]
    o_ij = o_i[:, None] * K + o_j[None, :]
    o_t = tl.arange(0, BT)

    b_s = tl.zeros([BK, BKJ], dtype=ACC)
    b_w = tl.zeros([BK, BKJ], dtype=ACC)
    if USE_DHT:
        p_dht = dht + i_nh.to(tl.int64) * K * K
        b_dt = tl.load(p_dht + o_ij, mask=m_ij, other=0).to(ACC)
        b_dtt = tl.load(p_dht + o_i[:, None] + o_j[None, :] * K, mask=m_ij, other=0).to(ACC)
        b_s = b_dt + b_dtt
        if STORE_DH0:
            b_w = b_dt - b_dtt
    for i_r in range(n_chunks):
        i_t = n_chunks - 1 - i_r
        rows = tl.minimum(seq_len - i_t * BT, BT)
        m_t = o_t < rows
        m_ti = m_t[:, None] & m_i[None, :]
        m_tj = m_t[:, None] & m_j[None, :]
        tok = bos + i_t * BT + o_t
        b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
        g_last = tl.load(gcum + (bos + i_t * BT + rows - 1) * H + i_h).to(ACC)
        b_c = tl.load(lam_c + tok * H + i_h, mask=m_t, other=0).to(ACC)
        b_beta = tl.load(beta + tok * H + i_h, mask=m_t, other=0).to(ACC)
        b0 = tl.sum(b_c * tl.exp(2.0 * b_g), axis=0)
        p_row = (tok * H + i_h) * K
        p_k = (tok * HKV + i_hk) * K
        # The keys reach their dot tiles through a float32 multiply by the row mask (an exact no-op)
        # for every input dtype. The versions that loaded float16 keys straight into the dot tiles
        # hit an illegal address twice in the float16 GPU tests (H200, Triton 3.6; bf16 passed); it
        # did not reproduce in isolation and the cause is unknown. This form passed.
        b_one = tl.where(m_t, 1.0, 0.0)[:, None]
        b_k = tl.load(k + p_k[:, None] + o_i[None, :], mask=m_ti, other=0).to(ACC)
        b_kd = (b_k * b_one).to(DX)
        b_hc = tl.load(h + ((boh + i_t) * H + i_h) * K * K + o_ij, mask=m_ij, other=0).to(ACC)
        # Key-gradient part with S_c (the adjoint after this chunk) and H_c:
        #   dks[t, j] = exp(G_last - G_t) (k_t S_c)[j] - 2 beta_t (k_t H_c)[j]
        # S_c and H_c enter as float16 columns divided by their largest magnitude (column_scale).
        s_sc = column_scale(b_s)
        s_hc = column_scale(b_hc)
        b_ks = tl.dot(b_kd, (b_s / s_sc[None, :]).to(DX), input_precision=PREC, out_dtype=ACC)
        b_kh = tl.dot(b_kd, (b_hc / s_hc[None, :]).to(DX), input_precision=PREC, out_dtype=ACC)
        b_el = tl.where(m_t, tl.exp(g_last - b_g), 0.0)
        b_dks = b_el[:, None] * (b_ks * s_sc[None, :]) - (2.0 * b_beta)[:, None] * (b_kh * s_hc[None, :])
        tl.store(dks + p_row[:, None] + o_j[None, :], b_dks.to(dks.dtype.element_ty), mask=m_tj)
        # S gets s_p (P^T X + X^T P) (operands from chunk_gka_bwd_dh_operands_kernel); both are
        # later projected onto keys: for 16-bit DX every operand enters as hi + lo (the lo x lo
        # term is below fp32 rounding).
        s_p = tl.load(sp + (boh + i_t) * H + i_h)
        b_phi = tl.load(ph + p_row[:, None] + o_i[None, :], mask=m_ti, other=0)
        b_xhi = tl.load(xh + p_row[:, None] + o_i[None, :], mask=m_ti, other=0)
        b_xjhi = tl.load(xh + p_row[:, None] + o_j[None, :], mask=m_tj, other=0)
        b_pjhi = tl.load(ph + p_row[:, None] + o_j[None, :], mask=m_tj, other=0)
        if DX.primitive_bitwidth == 16:
            b_plo = tl.load(pl + p_row[:, None] + o_i[None, :], mask=m_ti, other=0)
            b_xlo = tl.load(xl + p_row[:, None] + o_i[None, :], mask=m_ti, other=0)
            b_xjlo = tl.load(xl + p_row[:, None] + o_j[None, :], mask=m_tj, other=0)
            b_pjlo = tl.load(pl + p_row[:, None] + o_j[None, :], mask=m_tj, other=0)
        b_cr = tl.dot(tl.trans(b_phi), b_xjhi, input_precision=PREC, out_dtype=ACC)
        if DX.primitive_bitwidth == 16:
            b_cr = tl.dot(tl.trans(b_phi), b_xjlo, b_cr, input_precision=PREC, out_dtype=ACC)
            b_cr = tl.dot(tl.trans(b_plo), b_xjhi, b_cr, input_precision=PREC, out_dtype=ACC)
        if STORE_DH0:  # W gets -(P^T X - X^T P) = -2 P^T X + (P^T X + X^T P)
            b_w = b_w * tl.exp(g_last) - (2.0 * s_p) * b_cr
        b_cr = tl.dot(tl.trans(b_xhi), b_pjhi, b_cr, input_precision=PREC, out_dtype=ACC)
        if DX.primitive_bitwidth == 16:
            b_cr = tl.dot(tl.trans(b_xhi), b_pjlo, b_cr, input_precision=PREC, out_dtype=ACC)
            b_cr = tl.dot(tl.trans(b_xlo), b_pjhi, b_cr, input_precision=PREC, out_dtype=ACC)
        if STORE_DH0:
            b_w += s_p * b_cr
        b_s = b_s * tl.exp(g_last) - (2.0 * b0) * b_hc - s_p * b_cr
        # - 2 (beta K)^T K, accumulated into S (the sign on the operand).
        b_kj = (tl.load(k + p_k[:, None] + o_j[None, :], mask=m_tj, other=0).to(ACC) * b_one).to(DX)
        b_s = tl.dot(tl.trans((b_k * (-2.0 * b_beta)[:, None]).to(DX)), b_kj, b_s, input_precision=PREC,
                     out_dtype=ACC)
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * K + o_ij, (0.5 * (b_s + b_w)).to(dh0.dtype.element_ty),
                 mask=m_ij)


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
    chunk_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reverse pass: the key-gradient part of the later chunks and of ``H_c`` per token, and
    the gradient of the initial state.

    Args:
        k: ``[B,T,HKV,K]``; x: ``[B,T,H,K]`` forward solution; dqs: ``[B,T,H,K]`` adjoint solution.
        gcum: chunk-local cumsum of ``gk`` ``[B,T,H]``; lam_c, beta: ``[B,T,H]`` from the solve backward.
        h: ``[n_slots, H, K, K]`` chunk-start states of ``H``.
        dht: gradient of the final ``h_kk`` ``[N,H,K,K]`` or None.
        cu_seqlens, chunk_offsets, chunk_indices: varlen bookkeeping (``gla.chunk.ChunkPlan``) or None.

    Returns:
        ``dks [B,T,H,K]`` (float32/64: ``exp(G_last - G_t) (D_c + D_c^T) k_t - 2 beta_t H_c k_t``
        per query head, the part of ``dk`` that :func:`gka_kernels.gka.chunk_dk.chunk_gka_bwd_dk`
        completes) and the gradient of the initial ``h_kk`` ``[N,H,K,K]`` (or None).
    """
    B, T, HKV, K = k.shape
    H = x.shape[2]
    NT = triton.cdiv(T, CHUNK)
    acc_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    DX = solve_dot_dtype(k.dtype)
    operand_dtype = {tl.float16: torch.float16, tl.float32: torch.float32, tl.float64: torch.float64}[DX]
    xh, ph = (torch.empty(x.shape, dtype=operand_dtype, device=x.device) for _ in range(2))
    xl, pl = (torch.empty_like(xh) for _ in range(2)) if DX.primitive_bitwidth == 16 else (xh, ph)
    sp = torch.empty(h.shape[:2], dtype=acc_dtype, device=x.device)
    grid = (chunk_indices.shape[0], H) if chunk_indices is not None else (NT, B * H)
    chunk_gka_bwd_dh_operands_kernel[grid](
        x, dqs, gcum, xh, xl, ph, pl, sp, cu_seqlens, chunk_indices, T, NT,
        H=H, K=K, BT=CHUNK, BK=next_power_of_2(K), IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(k.dtype), DX=DX,
    )
    dks = x.new_empty(x.shape, dtype=acc_dtype)
    dh0 = k.new_empty(num_seqs, H, K, K, dtype=acc_dtype) if need_dh0 else None
    def grid(meta):
        return (triton.cdiv(K, meta["BKJ"]), num_seqs * H)
    chunk_gka_bwd_dh_kernel[grid](
        k, xh, xl, ph, pl, sp, gcum, lam_c, beta, h, dks, dht, dh0, cu_seqlens, chunk_offsets, T, NT,
        grid_bucket(num_seqs * H), H=H, HKV=HKV, K=K, BT=CHUNK, BK=next_power_of_2(K),
        USE_DHT=dht is not None, STORE_DH0=need_dh0, IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(k.dtype), DX=DX, PREC=dot_precision(k.dtype),
    )
    return dks, dh0


for _bkj, _w in ((64, 8), (32, 4)):
    register_aot(AotSpec(
        name=f"gka.chunk_bwd_dh[bf16,k128,varlen,{_bkj},w{_w}]",
        kernel=chunk_gka_bwd_dh_kernel,
        types={"k": "*bf16", "xh": "*fp16", "xl": "*fp16", "ph": "*fp16", "pl": "*fp16", "sp": "*fp32",
               "gcum": "*fp32", "lam_c": "*fp32", "beta": "*fp32", "h": "*fp32", "dks": "*fp32",
               "dht": "*fp32", "dh0": "*fp32",
               "cu_seqlens": "*i32", "chunk_offsets": "*i64", "T": "i32", "NT": "i32",
               "nh_bucket": "i32"},
        constexprs={"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BK": 128, "BKJ": _bkj, "USE_DHT": True,
                    "STORE_DH0": True, "IS_VARLEN": True, "ACC": tl.float32, "DX": tl.float16,
                    "PREC": "ieee"},
        num_warps=_w, num_stages=2,
    ))
register_aot(AotSpec(
    name="gka.chunk_bwd_dh_operands[bf16,k128]",
    kernel=chunk_gka_bwd_dh_operands_kernel,
    types={"x": "*fp32", "dqs": "*fp32", "gcum": "*fp32", "xh": "*fp16", "xl": "*fp16", "ph": "*fp16",
           "pl": "*fp16", "sp": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32", "T": "i32",
           "NT": "i32"},
    constexprs={"H": 32, "K": 128, "BT": CHUNK, "BK": 128, "IS_VARLEN": False, "ACC": tl.float32,
                "DX": tl.float16},
    num_warps=4, num_stages=1,
))
