"""The WY/UT representation of one chunk of the gated delta rule, forward and backward.

Within a chunk of ``BT`` tokens with chunk-local cumulative log-decays ``G`` (``G_i = sum_{s<=i} g_s``)::

    A  = strictly_lower(beta_i (k_i . k_j) exp(G_i - G_j))     [BT, BT]
    Tm = (I + A)^-1                                              (unit lower triangular)
    w  = Tm (beta exp(G) k) = (Tm diag(beta exp(G))) k           [BT, K]
    u  = Tm (beta v)        = (Tm diag(beta)) v                  [BT, V]

so that the chunk's delta-rule residuals are ``v_new = u - w h`` for the state ``h`` entering it.
``Tm`` is computed in float32 from four ``BC = BT / 4`` diagonal sub-blocks, each inverted by
forward substitution, merged by block back-substitution (``T_IJ = -T_II sum_{J<=m<I} A_Im T_mJ``)
with exact-precision dots. The per-token factors (and, with ``QK_NORM``, the inverse key norms
``rk``: ``k`` stands for ``rk * k``) scale the columns of ``Tm`` rather than the keys/values,
so the raw 16-bit inputs feed the tensor cores unrounded. The backward of ``w`` and ``u`` uses
``dX = Tm^T dY`` and ``dA = -(dX_u u^T + dX_w w^T)`` (strictly lower), then the chain rule
through ``A``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune
from gka_kernels.gdn.indexing import block_size, chunk_span


@autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)],
    key=["H", "HKV", "K", "V", "BT", "QK_NORM", "STORE_T"],
)
@triton.jit
def wy_fwd_kernel(
    k, v, beta, G, rk, Tm, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, QK_NORM: tl.constexpr,
    STORE_T: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Tm = (I + A)^-1, w = Tm (beta exp(G) k), u = Tm (beta v) for one chunk of one query head.

    Grid (chunks, B*H). ``k``/``v`` [B,T,HKV,*], ``beta``/``G`` [B,T,H], ``rk`` [B,T,HKV]
    (inverse key norms, read with ``QK_NORM``), ``w`` [B,T,H,K], ``u`` [B,T,H,V]; with
    ``STORE_T`` also ``Tm`` [B,T,H,BT] (ACC, lower triangle only; the backward needs it, the
    forward does not). Tiles: ``[BC, BC]`` sub-blocks of ``A``/``Tm`` (BC = BT/4) and
    ``[BC, BK]`` / ``[BC, BV]`` row slabs of keys/values: ``w_I = sum_{J<=I} (T_IJ diag(f_J)) k_J``.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, i_t, _ = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    BC: tl.constexpr = BT // 4
    o_c = tl.arange(0, BC)
    t0 = i_t * BT + o_c
    m0, m1, m2, m3 = t0 < seq_len, t0 + BC < seq_len, t0 + 2 * BC < seq_len, t0 + 3 * BC < seq_len
    tok = bos + i_t * BT
    r0 = tok + o_c
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
    p_k = k + (tok * HKV * K + i_hk * K) + o_c[:, None] * (HKV * K)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = (o_k < K)[None, :]
        pk = p_k + o_k[None, :]
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
    if QK_NORM:
        s0 = tl.load(rk + r0 * HKV + i_hk, mask=m0, other=0).to(ACC)
        s1 = tl.load(rk + r1 * HKV + i_hk, mask=m1, other=0).to(ACC)
        s2 = tl.load(rk + r2 * HKV + i_hk, mask=m2, other=0).to(ACC)
        s3 = tl.load(rk + r3 * HKV + i_hk, mask=m3, other=0).to(ACC)
    else:
        s0 = tl.full([BC], 1.0, ACC)
        s1, s2, s3 = s0, s0, s0
    # A_IJ = beta_I (k_I . k_J) exp(G_I - G_J): strictly lower inside diagonal blocks; rows past
    # the sequence end are zero (their exponent could overflow).
    lower = o_c[:, None] > o_c[None, :]
    c0, c1, c2, c3 = b0 * s0, b1 * s1, b2 * s2, b3 * s3
    a00 = tl.where(lower & m0[:, None], a00 * c0[:, None] * (s0[None, :] * tl.exp(g0[:, None] - g0[None, :])), 0.0)
    a11 = tl.where(lower & m1[:, None], a11 * c1[:, None] * (s1[None, :] * tl.exp(g1[:, None] - g1[None, :])), 0.0)
    a22 = tl.where(lower & m2[:, None], a22 * c2[:, None] * (s2[None, :] * tl.exp(g2[:, None] - g2[None, :])), 0.0)
    a33 = tl.where(lower & m3[:, None], a33 * c3[:, None] * (s3[None, :] * tl.exp(g3[:, None] - g3[None, :])), 0.0)
    a10 = tl.where(m1[:, None], a10 * c1[:, None] * (s0[None, :] * tl.exp(g1[:, None] - g0[None, :])), 0.0)
    a20 = tl.where(m2[:, None], a20 * c2[:, None] * (s0[None, :] * tl.exp(g2[:, None] - g0[None, :])), 0.0)
    a21 = tl.where(m2[:, None], a21 * c2[:, None] * (s1[None, :] * tl.exp(g2[:, None] - g1[None, :])), 0.0)
    a30 = tl.where(m3[:, None], a30 * c3[:, None] * (s0[None, :] * tl.exp(g3[:, None] - g0[None, :])), 0.0)
    a31 = tl.where(m3[:, None], a31 * c3[:, None] * (s1[None, :] * tl.exp(g3[:, None] - g1[None, :])), 0.0)
    a32 = tl.where(m3[:, None], a32 * c3[:, None] * (s2[None, :] * tl.exp(g3[:, None] - g2[None, :])), 0.0)

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

    # w_I = sum_{J<=I} (T_IJ diag(beta exp(G) rk)_J) k_J, with the raw keys as the dot operand.
    f0, f1, f2, f3 = c0 * tl.exp(g0), c1 * tl.exp(g1), c2 * tl.exp(g2), c3 * tl.exp(g3)
    w00, w11 = (t00 * f0[None, :]).to(DOT), (t11 * f1[None, :]).to(DOT)
    w22, w33 = (t22 * f2[None, :]).to(DOT), (t33 * f3[None, :]).to(DOT)
    w10, w20, w30 = (t10 * f0[None, :]).to(DOT), (t20 * f0[None, :]).to(DOT), (t30 * f0[None, :]).to(DOT)
    w21, w31, w32 = (t21 * f1[None, :]).to(DOT), (t31 * f1[None, :]).to(DOT), (t32 * f2[None, :]).to(DOT)
    p_w = w + (tok * H * K + i_h * K) + o_c[:, None] * (H * K)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = (o_k < K)[None, :]
        pk = p_k + o_k[None, :]
        k0 = tl.load(pk, mask=m0[:, None] & m_k, other=0).to(DOT)
        k1 = tl.load(pk + BC * HKV * K, mask=m1[:, None] & m_k, other=0).to(DOT)
        k2 = tl.load(pk + 2 * BC * HKV * K, mask=m2[:, None] & m_k, other=0).to(DOT)
        k3 = tl.load(pk + 3 * BC * HKV * K, mask=m3[:, None] & m_k, other=0).to(DOT)
        y0 = tl.dot(w00, k0, out_dtype=ACC)
        y1 = tl.dot(w10, k0, out_dtype=ACC)
        y1 += tl.dot(w11, k1, out_dtype=ACC)
        y2 = tl.dot(w20, k0, out_dtype=ACC)
        y2 += tl.dot(w21, k1, out_dtype=ACC)
        y2 += tl.dot(w22, k2, out_dtype=ACC)
        y3 = tl.dot(w30, k0, out_dtype=ACC)
        y3 += tl.dot(w31, k1, out_dtype=ACC)
        y3 += tl.dot(w32, k2, out_dtype=ACC)
        y3 += tl.dot(w33, k3, out_dtype=ACC)
        pw = p_w + o_k[None, :]
        tl.store(pw, y0.to(w.dtype.element_ty), mask=m0[:, None] & m_k)
        tl.store(pw + BC * H * K, y1.to(w.dtype.element_ty), mask=m1[:, None] & m_k)
        tl.store(pw + 2 * BC * H * K, y2.to(w.dtype.element_ty), mask=m2[:, None] & m_k)
        tl.store(pw + 3 * BC * H * K, y3.to(w.dtype.element_ty), mask=m3[:, None] & m_k)
    # u_I = sum_{J<=I} (T_IJ diag(beta)_J) v_J.
    u00, u11 = (t00 * b0[None, :]).to(DOT), (t11 * b1[None, :]).to(DOT)
    u22, u33 = (t22 * b2[None, :]).to(DOT), (t33 * b3[None, :]).to(DOT)
    u10, u20, u30 = (t10 * b0[None, :]).to(DOT), (t20 * b0[None, :]).to(DOT), (t30 * b0[None, :]).to(DOT)
    u21, u31, u32 = (t21 * b1[None, :]).to(DOT), (t31 * b1[None, :]).to(DOT), (t32 * b2[None, :]).to(DOT)
    p_v = v + (tok * HKV * V + i_hk * V) + o_c[:, None] * (HKV * V)
    p_u = u + (tok * H * V + i_h * V) + o_c[:, None] * (H * V)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = (o_v < V)[None, :]
        pv = p_v + o_v[None, :]
        v0 = tl.load(pv, mask=m0[:, None] & m_v, other=0).to(DOT)
        v1 = tl.load(pv + BC * HKV * V, mask=m1[:, None] & m_v, other=0).to(DOT)
        v2 = tl.load(pv + 2 * BC * HKV * V, mask=m2[:, None] & m_v, other=0).to(DOT)
        v3 = tl.load(pv + 3 * BC * HKV * V, mask=m3[:, None] & m_v, other=0).to(DOT)
        y0 = tl.dot(u00, v0, out_dtype=ACC)
        y1 = tl.dot(u10, v0, out_dtype=ACC)
        y1 += tl.dot(u11, v1, out_dtype=ACC)
        y2 = tl.dot(u20, v0, out_dtype=ACC)
        y2 += tl.dot(u21, v1, out_dtype=ACC)
        y2 += tl.dot(u22, v2, out_dtype=ACC)
        y3 = tl.dot(u30, v0, out_dtype=ACC)
        y3 += tl.dot(u31, v1, out_dtype=ACC)
        y3 += tl.dot(u32, v2, out_dtype=ACC)
        y3 += tl.dot(u33, v3, out_dtype=ACC)
        pu = p_u + o_v[None, :]
        tl.store(pu, y0.to(u.dtype.element_ty), mask=m0[:, None] & m_v)
        tl.store(pu + BC * H * V, y1.to(u.dtype.element_ty), mask=m1[:, None] & m_v)
        tl.store(pu + 2 * BC * H * V, y2.to(u.dtype.element_ty), mask=m2[:, None] & m_v)
        tl.store(pu + 3 * BC * H * V, y3.to(u.dtype.element_ty), mask=m3[:, None] & m_v)

    if STORE_T:
        p = Tm + (tok * H * BT + i_h * BT) + (o_c[:, None] * (H * BT) + o_c[None, :])
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
    configs=[triton.Config({}, num_warps=8, num_stages=s) for s in (2, 1, 3)],  # fewer warps spill
    key=["H", "HKV", "K", "V", "BT", "NK", "QK_NORM"],
)
@triton.jit
def wy_bwd_kernel(
    k, v, beta, G, rk, Tm, w, u, dw, dvn, dk_part, dG_part, dk, dv, dbeta, dg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, IS_VARLEN: tl.constexpr, QK_NORM: tl.constexpr,
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
    [B,T,HKV,K]. With ``QK_NORM``, ``k`` stands for ``rk * k`` and ``dk`` is the gradient with
    respect to it. Grid (chunks, B*HKV); tiles ``[BT, BT]``, ``[BT, BK]``, ``[BT, BV]``.
    """
    i_c, i_bk = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    GROUP: tl.constexpr = H // HKV
    bos, seq_len, i_t, _ = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    tok = bos + i_t * BT
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < seq_len
    strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    # 64-bit scalar bases of the chunk, 32-bit tile offsets
    k += tok * HKV * K + i_hk * K
    dk += tok * HKV * K + i_hk * K
    dk_part += tok * HKV * K + i_hk * K
    v += tok * HKV * V + i_hk * V
    dv += tok * HKV * V + i_hk * V
    o_kk = o_i[:, None] * (HKV * K)
    o_qk = o_i[:, None] * (H * K)
    o_kv = o_i[:, None] * (HKV * V)
    o_qv = o_i[:, None] * (H * V)
    # Tm^T of query head i_h: element [j, i] = Tm[i, j] (zero where j > i)
    o_tt = o_i[None, :] * (H * BT) + o_i[:, None]
    m_tt = m_t[None, :] & (o_i[:, None] <= o_i[None, :])
    Tm += tok * H * BT

    if QK_NORM:
        sk = tl.load(rk + (tok + o_i) * HKV + i_hk, mask=m_t, other=0).to(ACC)
    else:
        sk = tl.full([BT], 1.0, ACC)
    kk = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        kb = tl.load(k + o_kk + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K), other=0).to(DOT)
        kk += tl.dot(kb, tl.trans(kb), out_dtype=ACC)
    kk = kk * sk[:, None] * sk[None, :]

    q_sum = tl.zeros([BT, BT], dtype=ACC)
    for j in range(GROUP):
        i_h = i_hk * GROUP + j
        p_qk = tok * H * K + i_h * K
        p_qv = tok * H * V + i_h * V
        tm_t = tl.load(Tm + i_h * BT + o_tt, mask=m_tt, other=0).to(ACC).to(DOT)
        b = tl.load(beta + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
        gc = tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
        eg = tl.exp(gc)
        egs = eg * sk
        d_a = tl.zeros([BT, BT], dtype=ACC)
        db = tl.zeros([BT], dtype=ACC)
        d_g = tl.zeros([BT], dtype=ACC)
        for i_k in range((K + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            kb = tl.load(k + o_kk + o_k[None, :], mask=m_tk, other=0).to(ACC)
            wb = tl.load(w + p_qk + o_qk + o_k[None, :], mask=m_tk, other=0).to(DOT)
            dwb = tl.load(dw + p_qk + o_qk + o_k[None, :], mask=m_tk, other=0).to(DOT)
            dxw = tl.dot(tm_t, dwb, out_dtype=ACC)
            d_a += tl.dot(dxw.to(DOT), tl.trans(wb), out_dtype=ACC)
            s = tl.sum(dxw * kb, axis=1) * egs
            db += s
            d_g += s * b
        for i_v in range((V + BV - 1) // BV):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v[None, :] < V)
            vb = tl.load(v + o_kv + o_v[None, :], mask=m_tv, other=0).to(ACC)
            ub = tl.load(u + p_qv + o_qv + o_v[None, :], mask=m_tv, other=0).to(DOT)
            dub = tl.load(dvn + p_qv + o_qv + o_v[None, :], mask=m_tv, other=0).to(DOT)
            dxu = tl.dot(tm_t, dub, out_dtype=ACC)
            d_a += tl.dot(dxu.to(DOT), tl.trans(ub), out_dtype=ACC)
            db += tl.sum(dxu * vb, axis=1)
        p = tl.where(strict, -d_a * tl.exp(gc[:, None] - gc[None, :]), 0.0)
        db += tl.sum(p * kk, axis=1)
        dmat = p * kk * b[:, None]
        d_g += tl.sum(dmat, axis=1) - tl.sum(dmat, axis=0)
        q_sum += p * b[:, None] + tl.trans(p) * b[None, :]
        for i_p in range(NK):
            d_g += tl.load(dG_part + ((tok + o_i) * H + i_h) * NK + i_p, mask=m_t, other=0).to(ACC)
        d_g = tl.where(m_t, d_g, 0.0)
        rev = tl.sum(d_g, axis=0) - tl.cumsum(d_g, axis=0) + d_g
        tl.store(dg + (tok + o_i) * H + i_h, rev.to(dg.dtype.element_ty), mask=m_t)
        tl.store(dbeta + (tok + o_i) * H + i_h, db.to(dbeta.dtype.element_ty), mask=m_t)

    q_sum_d = (q_sum * sk[None, :]).to(DOT)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        acc = tl.load(dk_part + o_kk + o_k[None, :], mask=m_tk, other=0).to(ACC)
        kb = tl.load(k + o_kk + o_k[None, :], mask=m_tk, other=0).to(DOT)
        acc += tl.dot(q_sum_d, kb, out_dtype=ACC)
        for j in range(GROUP):
            i_h = i_hk * GROUP + j
            tm_t = tl.load(Tm + i_h * BT + o_tt, mask=m_tt, other=0).to(ACC).to(DOT)
            be = tl.load(beta + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
            be *= tl.exp(tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC))
            dwb = tl.load(dw + (tok * H * K + i_h * K) + o_qk + o_k[None, :], mask=m_tk, other=0).to(DOT)
            acc += tl.dot(tm_t, dwb, out_dtype=ACC) * be[:, None]
        tl.store(dk + o_kk + o_k[None, :], acc.to(dk.dtype.element_ty), mask=m_tk)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        acc = tl.zeros([BT, BV], dtype=ACC)
        for j in range(GROUP):
            i_h = i_hk * GROUP + j
            tm_t = tl.load(Tm + i_h * BT + o_tt, mask=m_tt, other=0).to(ACC).to(DOT)
            b = tl.load(beta + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
            dub = tl.load(dvn + (tok * H * V + i_h * V) + o_qv + o_v[None, :], mask=m_tv, other=0).to(DOT)
            acc += tl.dot(tm_t, dub, out_dtype=ACC) * b[:, None]
        tl.store(dv + o_kv + o_v[None, :], acc.to(dv.dtype.element_ty), mask=m_tv)


def wy_forward(k, v, beta, G, rk, cu_seqlens, chunk_indices, n_chunks_seq, chunk_size, store_dtype, acc, dot,
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
        k, v, beta, G, rk, Tm, w, u, cu_seqlens, chunk_indices, T,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=block_size(K), BV=block_size(V),
        IS_VARLEN=cu_seqlens is not None, QK_NORM=rk is not None, STORE_T=store_t, ACC=acc, DOT=dot,
    )
    return Tm, w, u


def wy_backward(k, v, beta, G, rk, Tm, w, u, dw, dvn, dk_part, dG_part, cu_seqlens, chunk_indices, n_chunks_seq,
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
        k, v, beta, G, rk, Tm, w, u, dw, dvn, dk_part, dG_part, dk, dv, dbeta, dg, cu_seqlens, chunk_indices, T,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=block_size(K), BV=block_size(V), NK=dG_part.shape[-1],
        IS_VARLEN=cu_seqlens is not None, QK_NORM=rk is not None, ACC=acc, DOT=dot,
    )
    return dk, dv, dbeta, dg


_AOT_SHAPES = {"H": 32, "HKV": 8, "K": 128, "V": 128, "BT": 64, "BK": 64, "BV": 64,
               "ACC": tl.float32, "DOT": tl.bfloat16}
_AOT_TYPES = {"k": "*bf16", "v": "*bf16", "beta": "*bf16", "G": "*fp32", "rk": "*fp32", "Tm": "*fp32", "w": "*bf16",
              "u": "*bf16", "cu_seqlens": "*i32", "chunk_indices": "*i32"}
for _store_t, _varlen in ((False, False), (True, True)):
    register_aot(AotSpec(
        name=f"gdn.wy_fwd[bf16,k128,bt64,store_t={_store_t},varlen={_varlen}]",
        kernel=wy_fwd_kernel,
        types=_AOT_TYPES,
        constexprs={**_AOT_SHAPES, "IS_VARLEN": _varlen, "QK_NORM": _store_t, "STORE_T": _store_t},
        num_warps=4, num_stages=2,
    ))
register_aot(AotSpec(
    name="gdn.wy_bwd[bf16,k128,bt64]",
    kernel=wy_bwd_kernel,
    types={**_AOT_TYPES, "dw": "*bf16", "dvn": "*bf16", "dk_part": "*fp32", "dG_part": "*fp32",
           "dk": "*bf16", "dv": "*bf16", "dbeta": "*bf16", "dg": "*fp32"},
    constexprs={**_AOT_SHAPES, "NK": 2, "IS_VARLEN": False, "QK_NORM": True},
    num_warps=8, num_stages=2,
))
