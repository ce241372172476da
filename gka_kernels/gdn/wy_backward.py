"""Backward of the WY/UT representation (``wy.py``) of one chunk of the gated delta rule.

With ``Tm = (I + A)^-1``, ``w = Tm (beta exp(G) k)`` and ``u = Tm (beta v)``, the gradients use
``dX = Tm^T dY`` and ``dA = -(dX_u u^T + dX_w w^T)`` (strictly lower), then the chain rule
through ``A_ij = beta_i (k_i . k_j) exp(G_i - G_j)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune
from gka_kernels.gdn.indexing import block_size, chunk_span
from gka_kernels.gdn.wy import AOT_SHAPES, AOT_TYPES


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
    # Tm of query head i_h (rows contiguous; the upper triangle reads as 0), used transposed
    o_tm = o_i[:, None] * (H * BT) + o_i[None, :]
    m_tm = m_t[:, None] & (o_i[None, :] <= o_i[:, None])
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
        tm_t = tl.trans(tl.load(Tm + i_h * BT + o_tm, mask=m_tm, other=0).to(ACC).to(DOT))
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
            tm_t = tl.trans(tl.load(Tm + i_h * BT + o_tm, mask=m_tm, other=0).to(ACC).to(DOT))
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
            tm_t = tl.trans(tl.load(Tm + i_h * BT + o_tm, mask=m_tm, other=0).to(ACC).to(DOT))
            b = tl.load(beta + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
            dub = tl.load(dvn + (tok * H * V + i_h * V) + o_qv + o_v[None, :], mask=m_tv, other=0).to(DOT)
            acc += tl.dot(tm_t, dub, out_dtype=ACC) * b[:, None]
        tl.store(dv + o_kv + o_v[None, :], acc.to(dv.dtype.element_ty), mask=m_tv)


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


register_aot(AotSpec(
    name="gdn.wy_bwd[bf16,k128,bt64]",
    kernel=wy_bwd_kernel,
    types={**AOT_TYPES, "dw": "*bf16", "dvn": "*bf16", "dk_part": "*fp32", "dG_part": "*fp32",
           "dk": "*bf16", "dv": "*bf16", "dbeta": "*bf16", "dg": "*fp32"},
    constexprs={**AOT_SHAPES, "NK": 2, "IS_VARLEN": False, "QK_NORM": True},
    num_warps=8, num_stages=2,
))
