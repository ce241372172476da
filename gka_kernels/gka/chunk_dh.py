"""The adjoint of the key covariance ``H`` (backward): each chunk's contribution, then a reverse
scan over chunks.

With the per-token direct gradient (implicit differentiation, ``c_t`` from the solve backward)

    dH_t = -dqs_t x_t^T - c_t H_t

the adjoint of ``H_t`` through its recurrence is ``D_t = sum_{s >= t} exp(Gc_s - Gc_t) dH_s``.
The key gradient needs only the symmetric part ``S = D + D^T`` (``dk_t`` contains
``(D_t + D_t^T) k_t``). Chunk-wise, with ``S_c`` the part coming from tokens after chunk ``c``
(taken at its last token) and the chunk-local cumsum ``G``:

    S_{c-1} = exp(G_last) S_c + dS_c
    dS_c = -(P^T X + X^T P) - 2 b0 H_c - 2 (beta * K)^T K,        P = exp(G) * dQs

where ``sum_s exp(G_s) c_s H_s = b0 H_c + sum_j beta_j k_j k_j^T`` with
``b0 = sum_s c_s exp(2 G_s)`` and ``beta`` from the solve backward. The antisymmetric part
``W = D - D^T`` (``W_{c-1} = exp(G_last) W_c + dW_c``, ``dW_c = X^T P - P^T X``) is carried only
when the gradient of the initial state ``D_0 = (S_0 + W_0) / 2`` is needed.

``chunk_gka_bwd_ds_kernel`` forms every chunk's ``dS_c`` (and ``dW_c``) in parallel. The scan
(``chunk_gka_bwd_dh_kernel``) is then elementwise in ``S``: walking chunk ``c`` it adds the
later chunks' part of the key gradient, ``exp(G_last - G_t) S_c k_t``, to ``dk`` (which
:mod:`gka_kernels.gka.chunk_dk` wrote with the chunk's own tokens and start state) and
``-0.5 k_t .`` that to ``dGc`` (through per-column-block partial sums: no atomics).

``H_c`` enters as ``2 H_c`` (one load), not ``H_c + H_c^T``: ``H`` is symmetric by contract (the
initial ``h_kk`` is; the backward already treats ``A_t = H_t + lam_t I`` as symmetric, e.g.
``dqs = A^{-1} dqm``), and the stored ``h`` (:mod:`gka_kernels.gka.chunk_h`) differs from its
transpose only by rounding: entry ``(a, b)`` sums ``round(e_t k_ta) k_tb`` where ``(b, a)`` sums
``round(e_t k_tb) k_ta`` (``e_t = exp(G_last - G_t)``, rounding to the dot dtype ``u``: float16
``2^-11`` for 16-bit inputs, tf32x3 / float64 otherwise), so ``|H_ab - H_ba| <= 2u max|H_c|``,
the size of the error ``h`` already carries and of its storage (``H_c / s_c`` rounded to the dot
dtype, read here as ``s_c h``).

Precision: the dots take ``solve_dot_dtype`` operands (float16 for 16-bit inputs; bf16 operands
put 1.6e-2 of error into ``dgk``). In ``dS`` the rows of ``x`` enter at unit norm, their norms
folded into ``P``, which is divided by its largest magnitude ``s_p`` and multiplied back; both
enter the cross terms as hi + lo (each is later projected onto keys). In the scan ``S_c`` enters
the key contraction as float16 columns divided by their largest magnitude (``column_scale``),
multiplied back on the output columns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype, grid_bucket, next_power_of_2
from gka_kernels.gka._common import (
    CHUNK, chunk_program, column_scale, dot_precision, load_rows, row_norms, sequence_coords,
    solve_dot_dtype, split_hi_lo, tile_scale,
)
from gka_kernels.gka.chunk_h import ChunkStates

#: Narrowest column block of the scan (the partial sums of dGc have ``cdiv(K, BKJ_MIN)`` rows).
BKJ_MIN = 16


@triton.jit
def _split_block(p, o_c, m_t, b_rows, K: tl.constexpr, ACC: tl.constexpr, DX: tl.constexpr):
    """Columns ``o_c`` of the rows ``p[t]`` times the row factors ``b_rows`` (a [BT, BJ] block), as
    hi + lo in ``DX``."""
    return split_hi_lo(load_rows(p, o_c, m_t, K, ACC) * b_rows[:, None], DX)


@triton.jit
def _cross_block(b_ah, b_al, b_bh, b_bl, ACC: tl.constexpr, DX: tl.constexpr, PREC: tl.constexpr):
    """``A^T B`` for [BT, BJ] blocks given as hi + lo (``hi_a hi_b + hi_a lo_b + lo_a hi_b``)."""
    c = tl.dot(tl.trans(b_ah), b_bh, input_precision=PREC, out_dtype=ACC)
    if DX.primitive_bitwidth == 16:
        c = tl.dot(tl.trans(b_ah), b_bl, c, input_precision=PREC, out_dtype=ACC)
        c = tl.dot(tl.trans(b_al), b_bh, c, input_precision=PREC, out_dtype=ACC)
    return c


@autotune(
    configs=[triton.Config({"BJ": bj}, num_warps=w, num_stages=1) for bj, w in ((32, 4), (64, 4), (64, 8))],
    key=["K", "H", "IS_VARLEN", "STORE_DW"],
)
@triton.jit
def chunk_gka_bwd_ds_kernel(
    k, x, dqs, gcum, lam_c, beta, h, h_scale, ds, dw, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BJ: tl.constexpr, STORE_DW: tl.constexpr, IS_VARLEN: tl.constexpr, ACC: tl.constexpr,
    DX: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, B*H): one chunk's contribution to the scan,
        dS = -s_p (P^T X + X^T P) - 2 b0 H_c - 2 (beta K)^T K,   dW = s_p (X^T P - P^T X)
    with X the unit rows of x and P = exp(G) |x| dqs / s_p (s_p its largest magnitude). dS is
    symmetric (dW antisymmetric): only its [BJ, BJ] blocks (a, b) with a <= b are computed, from
    the [BT, BJ] column blocks a and b of X, P (hi + lo) and K, and block (b, a) is stored as the
    transpose (negated for dW). A first pass over the full [BT, BK] rows forms the row norms and
    s_p only."""
    i_h, i_hk, i_s, tok, m_t = chunk_program(cu_seqlens, chunk_indices, T, NT, H, HKV, BT, IS_VARLEN)
    o_k = tl.arange(0, BK)
    m_tk = m_t[:, None] & (o_k < K)[None, :]
    p_row = (tok * H + i_h) * K
    p_k = (tok * HKV + i_hk) * K
    p_state = (i_s * H + i_h) * K * K

    b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b_c = tl.load(lam_c + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b_kr = -2.0 * tl.load(beta + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b0 = tl.sum(b_c * tl.exp(2.0 * b_g), axis=0) * tl.load(h_scale + i_s * H + i_h).to(ACC)
    b_xn, b_xr = row_norms(tl.load(x + p_row[:, None] + o_k[None, :], mask=m_tk, other=0).to(ACC))
    b_pr = tl.exp(b_g) * b_xn
    s_p = tile_scale(tl.load(dqs + p_row[:, None] + o_k[None, :], mask=m_tk, other=0).to(ACC)
                     * b_pr[:, None])
    b_pr = b_pr / s_p
    for ja in range(0, K, BJ):
        o_a = ja + tl.arange(0, BJ)
        b_xah, b_xal = _split_block(x + p_row, o_a, m_t, b_xr, K, ACC, DX)
        b_pah, b_pal = _split_block(dqs + p_row, o_a, m_t, b_pr, K, ACC, DX)
        b_kah = (load_rows(k + p_k, o_a, m_t, K, ACC) * b_kr[:, None]).to(DX)
        for jb in range(ja, K, BJ):
            o_b = jb + tl.arange(0, BJ)
            m_ab = (o_a < K)[:, None] & (o_b < K)[None, :]
            b_xbh, b_xbl = _split_block(x + p_row, o_b, m_t, b_xr, K, ACC, DX)
            b_pbh, b_pbl = _split_block(dqs + p_row, o_b, m_t, b_pr, K, ACC, DX)
            b_px = _cross_block(b_pah, b_pal, b_xbh, b_xbl, ACC, DX, PREC)        # P_a^T X_b
            b_xp = _cross_block(b_xah, b_xal, b_pbh, b_pbl, ACC, DX, PREC)        # X_a^T P_b
            b_hc = tl.load(h + p_state + o_a[:, None] * K + o_b[None, :], mask=m_ab, other=0).to(ACC)
            b_kb = load_rows(k + p_k, o_b, m_t, K, ACC).to(DX)
            b_ds = tl.dot(tl.trans(b_kah), b_kb, -s_p * (b_px + b_xp) - (2.0 * b0) * b_hc,
                          input_precision=PREC, out_dtype=ACC)
            p_ab = p_state + o_a[:, None] * K + o_b[None, :]
            p_ba = p_state + o_b[:, None] * K + o_a[None, :]
            m_ba = (o_b < K)[:, None] & (o_a < K)[None, :]
            tl.store(ds + p_ab, b_ds.to(ds.dtype.element_ty), mask=m_ab)
            if jb != ja:
                tl.store(ds + p_ba, tl.trans(b_ds).to(ds.dtype.element_ty), mask=m_ba)
            if STORE_DW:
                b_dw = s_p * (b_xp - b_px)
                tl.store(dw + p_ab, b_dw.to(dw.dtype.element_ty), mask=m_ab)
                if jb != ja:
                    tl.store(dw + p_ba, (-tl.trans(b_dw)).to(dw.dtype.element_ty), mask=m_ba)


@triton.jit
def _chunk_operands(k, gcum, ds, dk, i_t, i_h, i_hk, bos, seq_len, boh, o_t, o_i, o_j, m_i, m_j,
                    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                    ACC: tl.constexpr, DX: tl.constexpr):
    """What the scan reads for chunk ``i_t`` (nothing when ``i_t < 0``): keys [BT, BK] in the dot
    dtype DX and their column block [BT, BKJ] as given, G [BT], G_last, the dS block [BK, BKJ] and
    the dk block [BT, BKJ] (all but the first in ACC).

    The keys reach DX through an ACC multiply by the row mask (an exact no-op) for every input
    dtype: versions of an earlier state pass that loaded float16 keys straight into their dot
    tiles hit an illegal address in GPU tests (H200, Triton 3.6), and this form passed. Those
    versions also offered a [64, K] x [K, 32] dot at 8 warps, the shape for which compute-sanitizer
    later showed Triton 3.6 reading shared memory out of bounds (``chunk_dk``): a likely cause, not
    verified; that config is not offered here either."""
    rows = tl.where(i_t >= 0, tl.minimum(seq_len - i_t * BT, BT), 0)
    m_t = o_t < rows
    m_tj = m_t[:, None] & m_j[None, :]
    tok = bos + i_t * BT + o_t
    p_k = ((tok * HKV + i_hk) * K)[:, None]
    b_k = tl.load(k + p_k + o_i[None, :], mask=m_t[:, None] & m_i[None, :], other=0).to(ACC)
    b_k = (b_k * tl.where(m_t, 1.0, 0.0)[:, None]).to(DX)
    b_kj = tl.load(k + p_k + o_j[None, :], mask=m_tj, other=0).to(ACC)
    b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
    g_last = tl.load(gcum + (bos + i_t * BT + rows - 1) * H + i_h, mask=rows > 0, other=0).to(ACC)
    b_ds = tl.load(ds + ((boh + i_t) * H + i_h) * K * K + o_i[:, None] * K + o_j[None, :],
                   mask=(m_i[:, None] & m_j[None, :]) & (rows > 0), other=0).to(ACC)
    b_dk = tl.load(dk + ((tok * H + i_h) * K)[:, None] + o_j[None, :], mask=m_tj, other=0).to(ACC)
    return b_k, b_kj, b_g, g_last, b_ds, b_dk


# The scan: one program per [K, BKJ] column block of one head's S (all K rows, so that it can
# contract the chunk's keys with it); per chunk one [BT, BK] x [BK, BKJ] dot and elementwise work.
# The next chunk's operands are loaded before this chunk's dot (carried across the iteration) so
# that the sequential loop does not wait on memory. Narrow blocks give more programs when there are
# few sequences and heads; every program reads the chunk's full key rows (L2 hits).
# It adds into ``dk`` in place and writes only the dGc partial rows of its own column blocks, so the
# autotuner restores both before each timed run and before the real one (``restore_value``).
@autotune(
    configs=[
        triton.Config({"BKJ": bkj}, num_warps=w, num_stages=1)
        for bkj, w in ((16, 4), (32, 4), (64, 8))
    ],
    key=["K", "H", "IS_VARLEN", "STORE_DH0", "nh_bucket"],
    restore_value=["dk", "dgc_part"],
)
@triton.jit
def chunk_gka_bwd_dh_kernel(
    k, gcum, ds, dw, dk, dgc_part, dht, dh0, cu_seqlens, chunk_offsets, T, NT, part_stride, nh_bucket,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BKJ: tl.constexpr, USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DX: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (cdiv(K, BKJ), N*H): columns [j0, j0 + BKJ) of one head's S = D + D^T ([BK, BKJ] tile,
    all rows), walking the chunks backwards:
        dk[t, j] += e_t (k_t S_c)[j],  dgc_part[i_j, t] = -0.5 sum_j k_t[j] e_t (k_t S_c)[j],
        S <- exp(G_last) S + dS_c,      e_t = exp(G_last - G_t)
    (and W <- exp(G_last) W + dW_c when the initial state's gradient is stored). ``nh_bucket``
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
    b_k, b_kj, b_g, g_last, b_ds, b_dk = _chunk_operands(
        k, gcum, ds, dk, n_chunks - 1, i_h, i_hk, bos, seq_len, boh, o_t, o_i, o_j, m_i, m_j,
        H, HKV, K, BT, ACC, DX)
    for i_r in range(n_chunks):
        i_t = n_chunks - 1 - i_r
        # Prefetch the previous chunk's operands; this chunk's were loaded one iteration ago.
        n_k, n_kj, n_g, n_glast, n_ds, n_dk = _chunk_operands(
            k, gcum, ds, dk, i_t - 1, i_h, i_hk, bos, seq_len, boh, o_t, o_i, o_j, m_i, m_j,
            H, HKV, K, BT, ACC, DX)
        rows = tl.minimum(seq_len - i_t * BT, BT)
        m_t = o_t < rows
        tok = bos + i_t * BT + o_t
        s_sc = column_scale(b_s)
        b_ks = tl.dot(b_k, (b_s / s_sc[None, :]).to(DX), input_precision=PREC, out_dtype=ACC)
        b_dks = tl.where(m_t, tl.exp(g_last - b_g), 0.0)[:, None] * (b_ks * s_sc[None, :])
        tl.store(dk + ((tok * H + i_h) * K)[:, None] + o_j[None, :], (b_dk + b_dks).to(dk.dtype.element_ty),
                 mask=m_t[:, None] & m_j[None, :])
        tl.store(dgc_part + i_j.to(tl.int64) * part_stride + tok * H + i_h,
                 -0.5 * tl.sum(b_kj * b_dks, axis=1), mask=m_t)
        b_s = b_s * tl.exp(g_last) + b_ds
        if STORE_DH0:
            b_w = b_w * tl.exp(g_last) + tl.load(dw + ((boh + i_t) * H + i_h) * K * K + o_ij, mask=m_ij,
                                                 other=0).to(ACC)
        b_k, b_kj, b_g, g_last, b_ds, b_dk = n_k, n_kj, n_g, n_glast, n_ds, n_dk
    if STORE_DH0:
        tl.store(dh0 + i_nh.to(tl.int64) * K * K + o_ij, (0.5 * (b_s + b_w)).to(dh0.dtype.element_ty),
                 mask=m_ij)


def chunk_gka_bwd_ds(
    k: torch.Tensor,
    x: torch.Tensor,
    dqs: torch.Tensor,
    gcum: torch.Tensor,
    lam_c: torch.Tensor,
    beta: torch.Tensor,
    states: ChunkStates,
    need_dw: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each chunk's contribution to the reverse scan: ``dS`` and (``need_dw``: for the gradient of
    the initial state) ``dW``, ``[n_slots, H, K, K]`` float32/64.

    Args:
        k: ``[B,T,HKV,K]``; x: ``[B,T,H,K]`` forward solution; dqs: ``[B,T,H,K]`` adjoint solution.
        gcum: chunk-local cumsum of ``gk`` ``[B,T,H]``; lam_c, beta: ``[B,T,H]`` from the solve backward.
        states: the chunk-start states of ``H`` (:func:`gka_kernels.gka.chunk_h.chunk_gka_fwd_h`).
        cu_seqlens, chunk_indices: varlen bookkeeping (``gla.chunk.ChunkPlan``) or None.
    """
    B, T, HKV, K = k.shape
    H = x.shape[2]
    NT = triton.cdiv(T, CHUNK)
    ds = torch.empty(states.h.shape, dtype=x.dtype, device=x.device)
    dw = torch.empty_like(ds) if need_dw else None
    grid = (chunk_indices.shape[0], H) if chunk_indices is not None else (NT, B * H)
    chunk_gka_bwd_ds_kernel[grid](
        k, x, dqs, gcum, lam_c, beta, states.h, states.scale, ds, dw, cu_seqlens, chunk_indices, T, NT,
        H=H, HKV=HKV, K=K, BT=CHUNK, BK=next_power_of_2(K), STORE_DW=need_dw,
        IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(k.dtype), DX=solve_dot_dtype(k.dtype), PREC=dot_precision(k.dtype),
    )
    return ds, dw


def chunk_gka_bwd_dh(
    k: torch.Tensor,
    gcum: torch.Tensor,
    ds: torch.Tensor,
    dw: torch.Tensor | None,
    dk: torch.Tensor,
    dgc: torch.Tensor,
    dht: torch.Tensor | None,
    num_seqs: int,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The reverse scan: adds the later chunks' part of the key gradient to ``dk`` (in place) and
    returns the gradient of the initial ``h_kk`` (None unless ``dw`` is given) and the later
    chunks' part of the decay gradient, ``[P, B, T, H]`` partial sums over the scan's column
    blocks (their sum over ``P`` completes ``dgc``;
    :func:`gka_kernels.common.cumsum.sequence_reverse_cumsum` takes them as they are).

    Args:
        k: ``[B,T,HKV,K]``; gcum: chunk-local cumsum of ``gk`` ``[B,T,H]``.
        ds, dw: the chunks' contributions ``[n_slots, H, K, K]`` from :func:`chunk_gka_bwd_ds`
            (``dw`` None: no initial-state gradient).
        dk: ``[B,T,H,K]`` (float32/64) from :func:`gka_kernels.gka.chunk_dk.chunk_gka_bwd_dk`,
            completed in place; dgc: its decay gradient ``[B,T,H]`` (shape and dtype only).
        dht: gradient of the final ``h_kk`` ``[N,H,K,K]`` or None.
        cu_seqlens, chunk_offsets: varlen bookkeeping (``gla.chunk.ChunkPlan``) or None.
    """
    B, T, HKV, K = k.shape
    H = dk.shape[2]
    NT = triton.cdiv(T, CHUNK)
    need_dh0 = dw is not None
    dgc_part = dgc.new_zeros((triton.cdiv(K, BKJ_MIN),) + tuple(dgc.shape))
    dh0 = dk.new_empty(num_seqs, H, K, K) if need_dh0 else None
    def grid(meta):
        return (triton.cdiv(K, meta["BKJ"]), num_seqs * H)
    chunk_gka_bwd_dh_kernel[grid](
        k, gcum, ds, dw, dk, dgc_part, dht, dh0, cu_seqlens, chunk_offsets, T, NT, dgc.numel(),
        grid_bucket(num_seqs * H), H=H, HKV=HKV, K=K, BT=CHUNK, BK=next_power_of_2(K),
        USE_DHT=dht is not None, STORE_DH0=need_dh0, IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(k.dtype), DX=solve_dot_dtype(k.dtype), PREC=dot_precision(k.dtype),
    )
    return dh0, dgc_part


for _bkj, _w in ((16, 4), (64, 8)):
    register_aot(AotSpec(
        name=f"gka.chunk_bwd_dh[bf16,k128,varlen,{_bkj},w{_w}]",
        kernel=chunk_gka_bwd_dh_kernel,
        types={"k": "*bf16", "gcum": "*fp32", "ds": "*fp32", "dw": "*fp32", "dk": "*fp32",
               "dgc_part": "*fp32", "dht": "*fp32", "dh0": "*fp32", "cu_seqlens": "*i32",
               "chunk_offsets": "*i64", "T": "i32", "NT": "i32", "part_stride": "i32", "nh_bucket": "i32"},
        constexprs={"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BK": 128, "BKJ": _bkj, "USE_DHT": True,
                    "STORE_DH0": True, "IS_VARLEN": True, "ACC": tl.float32, "DX": tl.float16,
                    "PREC": "ieee"},
        num_warps=_w, num_stages=1,
    ))
register_aot(AotSpec(
    name="gka.chunk_bwd_ds[bf16,k128]",
    kernel=chunk_gka_bwd_ds_kernel,
    types={"k": "*bf16", "x": "*fp32", "dqs": "*fp32", "gcum": "*fp32", "lam_c": "*fp32", "beta": "*fp32",
           "h": "*fp16", "h_scale": "*fp32", "ds": "*fp32", "dw": "*fp32", "cu_seqlens": "*i32",
           "chunk_indices": "*i32",
           "T": "i32", "NT": "i32"},
    constexprs={"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BK": 128, "BJ": 32, "STORE_DW": False,
                "IS_VARLEN": False, "ACC": tl.float32, "DX": tl.float16, "PREC": "ieee"},
    num_warps=4, num_stages=1,
))
