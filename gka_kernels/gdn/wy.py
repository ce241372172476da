"""The WY/UT representation of one chunk of the gated delta rule, forward and backward.

Within a chunk of ``BT`` tokens with chunk-local cumulative log-decays ``G`` (``G_i = sum_{s<=i} g_s``)::

    A  = strictly_lower(beta_i (k_i . k_j) exp(G_i - G_j))     [BT, BT]
    Tm = (I + A)^-1                                              (unit lower triangular)
    w  = Tm (beta exp(G) k)                                      [BT, K]
    u  = Tm (beta v)                                             [BT, V]

so that the chunk's delta-rule residuals are ``v_new = u - w h`` for the state ``h`` entering it.
``Tm`` is computed in float32 from four ``BC = BT / 4`` diagonal sub-blocks, each inverted by
forward substitution, merged by block back-substitution (``T_IJ = -T_II sum_{J<=m<I} A_Im T_mJ``)
with exact-precision dots. The backward of ``w`` and ``u`` uses ``dX = Tm^T dY`` and
``dA = -(dX_u u^T + dX_w w^T)`` (strictly lower), then the chain rule through ``A``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune
from gka_kernels.gdn.indexing import block_size, chunk_span


@autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 2, 8) for s in (2, 3)],
    key=["H", "HKV", "K", "V", "BT", "STORE_T"],
)
@triton.jit
def wy_fwd_kernel(
    k, v, beta, G, Tm, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, STORE_T: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Tm = (I + A)^-1, w = Tm (beta exp(G) k), u = Tm (beta v) for one chunk of one query head.

    Grid (chunks, B*H). ``k``/``v`` [B,T,HKV,*], ``beta``/``G`` [B,T,H], ``w`` [B,T,H,K],
    ``u`` [B,T,H,V]; with ``STORE_T`` also ``Tm`` [B,T,H,BT] (ACC, lower triangle only; the
    backward needs it, the forward does not). Tiles: ``[BC, BC]`` sub-blocks of ``A``/``Tm``
    (BC = BT/4) and ``[BC, BK]`` / ``[BC, BV]`` row slabs of keys/values; ``w_I = sum_J T_IJ x_J``.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, i_t, _ = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    BC: tl.constexpr = BT // 4
    o_c = tl.arange(0, BC)
    t0 = i_t * BT + o_c
    m0, m1, m2, m3 = t0 < seq_len, t0 + BC < seq_len, t0 + 2 * BC < seq_len, t0 + 3 * BC < seq_len
    r0 = bos + t0
    r1, r2, r3 = r0 + BC, r0 + 2 * BC, r0 + 3 * BC

    a10 = tl.zeros([BC, BC], dtype=ACC)
    a20 = tl.zeros([BC, BC], dtype=ACC)
    a21 = tl.zeros([BC, BC], dtype=ACC)
    a30 = tl.zeros([BC, BC], dtype=ACC)
    a31 = tl.zeros([BC, BC], dtype=ACC)
    a32 = tl.zeros([BC, BC], dtype=ACC)
    a00 = tl.zeros([BC, BC], dtype=ACC)
    a11 = tl.zeros([BC, BC], dtype=ACC)
    a22 = tl.zeros([BC, BC], dtype=ACC)
    a33 = tl.zeros([BC, BC], dtype=ACC)
    p0 = k + (r0 * HKV + i_hk)[:, None] * K
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = (o_k < K)[None, :]
        pk = p0 + o_k[None, :]
        k0 = tl.load(pk, mask=m0[:, None] & m_k, other=0).to(DOT)
        k1 = tl.load(pk + BC * HKV * K, mask=m1[:, None] & m_k, other=0).to(DOT)
        k2 = tl.load(pk + 2 * BC * HKV * K, mask=m2[:, None] & m_k, other=0).to(DOT)
        k3 = tl.load(pk + 3 * BC * HKV * K, mask=m3[:, None] & m_k, other=0).to(DOT)
        a00 += tl.dot(k0, tl.trans(k0), out_dtype=ACC)
        a11 += tl.dot(k1, tl.trans(k1), out_dtype=ACC)
        a22 += tl.dot(k2, tl.trans(k2), out_dtype=ACC)
        a33 += tl.dot(k3, tl.trans(k3), out_dtype=ACC)
        a10 += tl.dot(k1, tl.trans(k0), out_dtype=ACC)
        a20 += tl.dot(k2, tl.trans(k0), out_dtype=ACC)
        a21 += tl.dot(k2, tl.trans(k1), out_dtype=ACC)
        a30 += tl.dot(k3, tl.trans(k0), out_dtype=ACC)
        a31 += tl.dot(k3, tl.trans(k1), out_dtype=ACC)
        a32 += tl.dot(k3, tl.trans(k2), out_dtype=ACC)

    b0 = tl.load(beta + r0 * H + i_h, mask=m0, other=0).to(ACC)
    b1 = tl.load(beta + r1 * H + i_h, mask=m1, other=0).to(ACC)
    b2 = tl.load(beta + r2 * H + i_h, mask=m2, other=0).to(ACC)
    b3 = tl.load(beta + r3 * H + i_h, mask=m3, other=0).to(ACC)
    g0 = tl.load(G + r0 * H + i_h, mask=m0, other=0).to(ACC)
    g1 = tl.load(G + r1 * H + i_h, mask=m1, other=0).to(ACC)
    g2 = tl.load(G + r2 * H + i_h, mask=m2, other=0).to(ACC)
    g3 = tl.load(G + r3 * H + i_h, mask=m3, other=0).to(ACC)
    # A_IJ = beta_I (k_I . k_J) exp(G_I - G_J): strictly lower inside diagonal blocks; rows past
    # the sequence end are zero (their exponent could overflow).
    lower = o_c[:, None] > o_c[None, :]
    a00 = tl.where(lower & m0[:, None], a00 * b0[:, None] * tl.exp(g0[:, None] - g0[None, :]), 0.0)
    a11 = tl.where(lower & m1[:, None], a11 * b1[:, None] * tl.exp(g1[:, None] - g1[None, :]), 0.0)
    a22 = tl.where(lower & m2[:, None], a22 * b2[:, None] * tl.exp(g2[:, None] - g2[None, :]), 0.0)
    a33 = tl.where(lower & m3[:, None], a33 * b3[:, None] * tl.exp(g3[:, None] - g3[None, :]), 0.0)
    a10 = tl.where(m1[:, None], a10 * b1[:, None] * tl.exp(g1[:, None] - g0[None, :]), 0.0)
    a20 = tl.where(m2[:, None], a20 * b2[:, None] * tl.exp(g2[:, None] - g0[None, :]), 0.0)
    a21 = tl.where(m2[:, None], a21 * b2[:, None] * tl.exp(g2[:, None] - g1[None, :]), 0.0)
    a30 = tl.where(m3[:, None], a30 * b3[:, None] * tl.exp(g3[:, None] - g0[None, :]), 0.0)
    a31 = tl.where(m3[:, None], a31 * b3[:, None] * tl.exp(g3[:, None] - g1[None, :]), 0.0)
    a32 = tl.where(m3[:, None], a32 * b3[:, None] * tl.exp(g3[:, None] - g2[None, :]), 0.0)

    # Diagonal blocks by forward substitution, all four in one loop: row i of T_II becomes
    # e_i - sum_{j<i} A_II[i, j] row_j(T_II) (a product with row i of A_II alone; rows j < i are final).
    eye = tl.where(o_c[:, None] == o_c[None, :], 1.0, 0.0).to(ACC)
    t00, t11, t22, t33 = eye, eye, eye, eye
    for i in range(1, BC):
        sel = (o_c == i)[:, None]
        t00 -= tl.dot(tl.where(sel, a00, 0.0), t00, out_dtype=ACC, input_precision="ieee")
        t11 -= tl.dot(tl.where(sel, a11, 0.0), t11, out_dtype=ACC, input_precision="ieee")
        t22 -= tl.dot(tl.where(sel, a22, 0.0), t22, out_dtype=ACC, input_precision="ieee")
        t33 -= tl.dot(tl.where(sel, a33, 0.0), t33, out_dtype=ACC, input_precision="ieee")
    # Off-diagonal blocks: T_IJ = -T_II sum_{J<=m<I} A_Im T_mJ (exact-precision products).
    t10 = -tl.dot(t11, tl.dot(a10, t00, out_dtype=ACC, input_precision="ieee"),
                  out_dtype=ACC, input_precision="ieee")
    t21 = -tl.dot(t22, tl.dot(a21, t11, out_dtype=ACC, input_precision="ieee"),
                  out_dtype=ACC, input_precision="ieee")
    t32 = -tl.dot(t33, tl.dot(a32, t22, out_dtype=ACC, input_precision="ieee"),
                  out_dtype=ACC, input_precision="ieee")
    x = tl.dot(a20, t00, out_dtype=ACC, input_precision="ieee")
    x += tl.dot(a21, t10, out_dtype=ACC, input_precision="ieee")
    t20 = -tl.dot(t22, x, out_dtype=ACC, input_precision="ieee")
    x = tl.dot(a31, t11, out_dtype=ACC, input_precision="ieee")
    x += tl.dot(a32, t21, out_dtype=ACC, input_precision="ieee")
    t31 = -tl.dot(t33, x, out_dtype=ACC, input_precision="ieee")
    x = tl.dot(a30, t00, out_dtype=ACC, input_precision="ieee")
    x += tl.dot(a31, t10, out_dtype=ACC, input_precision="ieee")
    x += tl.dot(a32, t20, out_dtype=ACC, input_precision="ieee")
    t30 = -tl.dot(t33, x, out_dtype=ACC, input_precision="ieee")

    # w_I = sum_{J<=I} T_IJ (beta exp(G) k)_J and u_I = sum_{J<=I} T_IJ (beta v)_J, slab by slab.
    c00, c11, c22, c33 = t00.to(DOT), t11.to(DOT), t22.to(DOT), t33.to(DOT)
    c10, c20, c21 = t10.to(DOT), t20.to(DOT), t21.to(DOT)
    c30, c31, c32 = t30.to(DOT), t31.to(DOT), t32.to(DOT)
    e0, e1, e2, e3 = b0 * tl.exp(g0), b1 * tl.exp(g1), b2 * tl.exp(g2), b3 * tl.exp(g3)
    p_w = w + (r0 * H + i_h)[:, None] * K
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = (o_k < K)[None, :]
        pk = p0 + o_k[None, :]
        x0 = (tl.load(pk, mask=m0[:, None] & m_k, other=0).to(ACC) * e0[:, None]).to(DOT)
        x1 = (tl.load(pk + BC * HKV * K, mask=m1[:, None] & m_k, other=0).to(ACC) * e1[:, None]).to(DOT)
        x2 = (tl.load(pk + 2 * BC * HKV * K, mask=m2[:, None] & m_k, other=0).to(ACC) * e2[:, None]).to(DOT)
        x3 = (tl.load(pk + 3 * BC * HKV * K, mask=m3[:, None] & m_k, other=0).to(ACC) * e3[:, None]).to(DOT)
        y0 = tl.dot(c00, x0, out_dtype=ACC)
        y1 = tl.dot(c10, x0, out_dtype=ACC)
        y1 += tl.dot(c11, x1, out_dtype=ACC)
        y2 = tl.dot(c20, x0, out_dtype=ACC)
        y2 += tl.dot(c21, x1, out_dtype=ACC)
        y2 += tl.dot(c22, x2, out_dtype=ACC)
        y3 = tl.dot(c30, x0, out_dtype=ACC)
        y3 += tl.dot(c31, x1, out_dtype=ACC)
        y3 += tl.dot(c32, x2, out_dtype=ACC)
        y3 += tl.dot(c33, x3, out_dtype=ACC)
        pw = p_w + o_k[None, :]
        tl.store(pw, y0.to(w.dtype.element_ty), mask=m0[:, None] & m_k)
        tl.store(pw + BC * H * K, y1.to(w.dtype.element_ty), mask=m1[:, None] & m_k)
        tl.store(pw + 2 * BC * H * K, y2.to(w.dtype.element_ty), mask=m2[:, None] & m_k)
        tl.store(pw + 3 * BC * H * K, y3.to(w.dtype.element_ty), mask=m3[:, None] & m_k)
    p_v = v + (r0 * HKV + i_hk)[:, None] * V
    p_u = u + (r0 * H + i_h)[:, None] * V
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = (o_v < V)[None, :]
        pv = p_v + o_v[None, :]
        x0 = (tl.load(pv, mask=m0[:, None] & m_v, other=0).to(ACC) * b0[:, None]).to(DOT)
        x1 = (tl.load(pv + BC * HKV * V, mask=m1[:, None] & m_v, other=0).to(ACC) * b1[:, None]).to(DOT)
        x2 = (tl.load(pv + 2 * BC * HKV * V, mask=m2[:, None] & m_v, other=0).to(ACC) * b2[:, None]).to(DOT)
        x3 = (tl.load(pv + 3 * BC * HKV * V, mask=m3[:, None] & m_v, other=0).to(ACC) * b3[:, None]).to(DOT)
        y0 = tl.dot(c00, x0, out_dtype=ACC)
        y1 = tl.dot(c10, x0, out_dtype=ACC)
        y1 += tl.dot(c11, x1, out_dtype=ACC)
        y2 = tl.dot(c20, x0, out_dtype=ACC)
        y2 += tl.dot(c21, x1, out_dtype=ACC)
        y2 += tl.dot(c22, x2, out_dtype=ACC)
        y3 = tl.dot(c30, x0, out_dtype=ACC)
        y3 += tl.dot(c31, x1, out_dtype=ACC)
        y3 += tl.dot(c32, x2, out_dtype=ACC)
        y3 += tl.dot(c33, x3, out_dtype=ACC)
        pu = p_u + o_v[None, :]
        tl.store(pu, y0.to(u.dtype.element_ty), mask=m0[:, None] & m_v)
        tl.store(pu + BC * H * V, y1.to(u.dtype.element_ty), mask=m1[:, None] & m_v)
        tl.store(pu + 2 * BC * H * V, y2.to(u.dtype.element_ty), mask=m2[:, None] & m_v)
        tl.store(pu + 3 * BC * H * V, y3.to(u.dtype.element_ty), mask=m3[:, None] & m_v)

    if STORE_T:
        p = Tm + (r0 * H + i_h)[:, None] * BT + o_c[None, :]
        s = BC * H * BT
        ty = Tm.dtype.element_ty
        tl.store(p, t00.to(ty), mask=m0[:, None])
        tl.store(p + s, t10.to(ty), mask=m1[:, None])
        tl.store(p + s + BC, t11.to(ty), mask=m1[:, None])
        tl.store(p + 2 * s, t20.to(ty), mask=m2[:, None])
        tl.store(p + 2 * s + BC, t21.to(ty), mask=m2[:, None])
        tl.store(p + 2 * s + 2 * BC, t22.to(ty), mask=m2[:, None])
        tl.store(p + 3 * s, t30.to(ty), mask=m3[:, None])
        tl.store(p + 3 * s + BC, t31.to(ty), mask=m3[:, None])
        tl.store(p + 3 * s + 2 * BC, t32.to(ty), mask=m3[:, None])
        tl.store(p + 3 * s + 3 * BC, t33.to(ty), mask=m3[:, None])


@autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)],
    key=["H", "HKV", "K", "V", "BT", "NK"],
)
@triton.jit
def wy_bwd_kernel(
    k, v, beta, G, Tm, w, u, dw, dvn, dk_part, dG_part, dk, dv, dbeta, dg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Backward of the WY representation for one chunk of one key/value head and the query heads
    of its group, plus the gate gradients. Per query head, given ``dw`` and ``dvn`` (= dL/du)::

        dXw = Tm^T dw, dXu = Tm^T dvn, dA = -strictly_lower(dXu u^T + dXw w^T)
        P   = dA * exp(G_i - G_j)
        dk += beta exp(G) dXw + (diag(beta) P + P^T diag(beta)) k
        dv += beta dXu
        dbeta = rowsum(P * k k^T) + rowsum(dXu * v) + exp(G) rowsum(dXw * k)
        dG    = rowsum(D) - colsum(D) + beta exp(G) rowsum(dXw * k) + dG_part,  D = P * beta_i k_i.k_j

    and ``dg`` = reverse chunk-local cumsum of ``dG``. ``dk``/``dv`` sum over the group in
    registers (the ``P`` terms collapse into one ``[BT, BT]`` matrix), starting from ``dk_part``
    [B,T,HKV,K]. Grid (chunks, B*HKV); tiles ``[BT, BT]``, ``[BT, BK]``, ``[BT, BV]``.
    """
    i_c, i_bk = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    GROUP: tl.constexpr = H // HKV
    bos, seq_len, i_t, _ = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < seq_len
    rows = bos + i_t * BT + o_i
    o_kk = (rows * HKV + i_hk)[:, None] * K
    o_kv = (rows * HKV + i_hk)[:, None] * V
    strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    # Tm^T of a query head: element [j, i] = Tm[i, j] at Tm + o_tt + i_h * BT (zero where j > i)
    o_tt = rows[None, :] * H * BT + o_i[:, None]
    m_tt = m_t[None, :] & (o_i[:, None] <= o_i[None, :])

    kk = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        kb = tl.load(k + o_kk + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K), other=0).to(DOT)
        kk += tl.dot(kb, tl.trans(kb), out_dtype=ACC)

    q_sum = tl.zeros([BT, BT], dtype=ACC)
    for j in range(GROUP):
        i_h = i_hk * GROUP + j
        o_qk = (rows * H + i_h)[:, None] * K
        o_qv = (rows * H + i_h)[:, None] * V
        tm_t = tl.load(Tm + o_tt + i_h * BT, mask=m_tt, other=0).to(ACC).to(DOT)
        b = tl.load(beta + rows * H + i_h, mask=m_t, other=0).to(ACC)
        gc = tl.load(G + rows * H + i_h, mask=m_t, other=0).to(ACC)
        eg = tl.exp(gc)
        d_a = tl.zeros([BT, BT], dtype=ACC)
        db = tl.zeros([BT], dtype=ACC)
        d_g = tl.zeros([BT], dtype=ACC)
        for i_k in range((K + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            kb = tl.load(k + o_kk + o_k[None, :], mask=m_tk, other=0).to(ACC)
            wb = tl.load(w + o_qk + o_k[None, :], mask=m_tk, other=0).to(DOT)
            dwb = tl.load(dw + o_qk + o_k[None, :], mask=m_tk, other=0).to(DOT)
            dxw = tl.dot(tm_t, dwb, out_dtype=ACC)
            d_a += tl.dot(dxw.to(DOT), tl.trans(wb), out_dtype=ACC)
            s = tl.sum(dxw * kb, axis=1) * eg
            db += s
            d_g += s * b
        for i_v in range((V + BV - 1) // BV):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v[None, :] < V)
            vb = tl.load(v + o_kv + o_v[None, :], mask=m_tv, other=0).to(ACC)
            ub = tl.load(u + o_qv + o_v[None, :], mask=m_tv, other=0).to(DOT)
            dub = tl.load(dvn + o_qv + o_v[None, :], mask=m_tv, other=0).to(DOT)
            dxu = tl.dot(tm_t, dub, out_dtype=ACC)
            d_a += tl.dot(dxu.to(DOT), tl.trans(ub), out_dtype=ACC)
            db += tl.sum(dxu * vb, axis=1)
        p = tl.where(strict, -d_a * tl.exp(gc[:, None] - gc[None, :]), 0.0)
        db += tl.sum(p * kk, axis=1)
        dmat = p * kk * b[:, None]
        d_g += tl.sum(dmat, axis=1) - tl.sum(dmat, axis=0)
        q_sum += p * b[:, None] + tl.trans(p) * b[None, :]
        for i_p in range(NK):
            d_g += tl.load(dG_part + (rows * H + i_h) * NK + i_p, mask=m_t, other=0).to(ACC)
        d_g = tl.where(m_t, d_g, 0.0)
        rev = tl.sum(d_g, axis=0) - tl.cumsum(d_g, axis=0) + d_g
        tl.store(dg + rows * H + i_h, rev.to(dg.dtype.element_ty), mask=m_t)
        tl.store(dbeta + rows * H + i_h, db.to(dbeta.dtype.element_ty), mask=m_t)

    q_sum_d = q_sum.to(DOT)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        acc = tl.load(dk_part + o_kk + o_k[None, :], mask=m_tk, other=0).to(ACC)
        kb = tl.load(k + o_kk + o_k[None, :], mask=m_tk, other=0).to(DOT)
        acc += tl.dot(q_sum_d, kb, out_dtype=ACC)
        for j in range(GROUP):
            i_h = i_hk * GROUP + j
            tm_t = tl.load(Tm + o_tt + i_h * BT, mask=m_tt, other=0).to(ACC).to(DOT)
            be = tl.load(beta + rows * H + i_h, mask=m_t, other=0).to(ACC)
            be *= tl.exp(tl.load(G + rows * H + i_h, mask=m_t, other=0).to(ACC))
            dwb = tl.load(dw + (rows * H + i_h)[:, None] * K + o_k[None, :], mask=m_tk, other=0).to(DOT)
            acc += tl.dot(tm_t, dwb, out_dtype=ACC) * be[:, None]
        tl.store(dk + o_kk + o_k[None, :], acc.to(dk.dtype.element_ty), mask=m_tk)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        acc = tl.zeros([BT, BV], dtype=ACC)
        for j in range(GROUP):
            i_h = i_hk * GROUP + j
            tm_t = tl.load(Tm + o_tt + i_h * BT, mask=m_tt, other=0).to(ACC).to(DOT)
            b = tl.load(beta + rows * H + i_h, mask=m_t, other=0).to(ACC)
            dub = tl.load(dvn + (rows * H + i_h)[:, None] * V + o_v[None, :], mask=m_tv, other=0).to(DOT)
            acc += tl.dot(tm_t, dub, out_dtype=ACC) * b[:, None]
        tl.store(dv + o_kv + o_v[None, :], acc.to(dv.dtype.element_ty), mask=m_tv)


def wy_forward(k, v, beta, G, cu_seqlens, chunk_indices, n_chunks_seq, chunk_size, store_dtype, acc, dot,
               store_t):
    """Returns ``(Tm, w, u)``: ``Tm`` [B,T,H,BT] (float32/64; only with ``store_t``, else None),
    ``w`` [B,T,H,K] and ``u`` [B,T,H,V] in ``store_dtype``."""
    B, T, HKV, K = k.shape
    H, V = beta.shape[-1], v.shape[-1]
    tm_dtype = torch.float64 if acc == tl.float64 else torch.float32
    Tm = torch.empty(B, T, H, chunk_size, device=k.device, dtype=tm_dtype) if store_t else None
    w = torch.empty(B, T, H, K, device=k.device, dtype=store_dtype)
    u = torch.empty(B, T, H, V, device=k.device, dtype=store_dtype)
    wy_fwd_kernel[(n_chunks_seq, B * H)](
        k, v, beta, G, Tm, w, u, cu_seqlens, chunk_indices, T,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=block_size(K), BV=block_size(V),
        IS_VARLEN=cu_seqlens is not None, STORE_T=store_t, ACC=acc, DOT=dot,
    )
    return Tm, w, u


def wy_backward(k, v, beta, G, Tm, w, u, dw, dvn, dk_part, dG_part, cu_seqlens, chunk_indices, n_chunks_seq,
                chunk_size, dk_dtype, g_dtype, acc, dot):
    """Returns ``dk`` [B,T,HKV,K] (``dk_part`` plus the WY part, in ``dk_dtype``), ``dv``
    [B,T,HKV,V] (dtype of ``v``), ``dbeta`` (dtype of ``beta``) and ``dg`` (``g_dtype``) [B,T,H]."""
    B, T, HKV, K = k.shape
    H, V = beta.shape[-1], v.shape[-1]
    dk = torch.empty(B, T, HKV, K, device=k.device, dtype=dk_dtype)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dg = torch.empty(B, T, H, device=k.device, dtype=g_dtype)
    wy_bwd_kernel[(n_chunks_seq, B * HKV)](
        k, v, beta, G, Tm, w, u, dw, dvn, dk_part, dG_part, dk, dv, dbeta, dg, cu_seqlens, chunk_indices, T,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=block_size(K), BV=block_size(V), NK=dG_part.shape[-1],
        IS_VARLEN=cu_seqlens is not None, ACC=acc, DOT=dot,
    )
    return dk, dv, dbeta, dg


_AOT_SHAPES = {"H": 32, "HKV": 8, "K": 128, "V": 128, "BT": 64, "BK": 64, "BV": 64,
               "ACC": tl.float32, "DOT": tl.bfloat16}
_AOT_TYPES = {"k": "*bf16", "v": "*bf16", "beta": "*bf16", "G": "*fp32", "Tm": "*fp32", "w": "*bf16",
              "u": "*bf16", "cu_seqlens": "*i32", "chunk_indices": "*i32"}
for _store_t, _varlen in ((False, False), (True, False), (False, True)):
    register_aot(AotSpec(
        name=f"gdn.wy_fwd[bf16,k128,bt64,store_t={_store_t},varlen={_varlen}]",
        kernel=wy_fwd_kernel,
        types=_AOT_TYPES,
        constexprs={**_AOT_SHAPES, "IS_VARLEN": _varlen, "STORE_T": _store_t},
        num_warps=4, num_stages=2,
    ))
register_aot(AotSpec(
    name="gdn.wy_bwd[bf16,k128,bt64]",
    kernel=wy_bwd_kernel,
    types={**_AOT_TYPES, "dw": "*bf16", "dvn": "*bf16", "dk_part": "*fp32", "dG_part": "*fp32",
           "dk": "*bf16", "dv": "*bf16", "dbeta": "*bf16", "dg": "*fp32"},
    constexprs={**_AOT_SHAPES, "NK": 2, "IS_VARLEN": False},
    num_warps=8, num_stages=2,
))
