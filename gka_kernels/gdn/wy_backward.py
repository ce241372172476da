"""Backward of the WY/UT representation (``wy.py``) of one chunk of the gated delta rule.

With ``Tm = (I + A)^-1``, ``w = Tm (beta exp(G) k)`` and ``u = Tm (beta v)``, the gradients use
``dX = Tm^T dY`` and ``dA = -(dX_u u^T + dX_w w^T)`` (strictly lower), then the chain rule
through ``A_ij = beta_i (k_i . k_j) exp(G_i - G_j)``.

Two launches:

* ``wy_bwd_kernel``, one program per (chunk, query head): that head's ``dbeta``, ``dg`` and its
  share ``dk_h`` of ``dk``. With ``H == HKV`` it adds ``dk_part`` and writes the final ``dk``;
  with grouped heads (``H > HKV``) ``dk_h`` goes to a float32 (float64 for float64 inputs)
  temporary ``[B,T,H,K]`` (4 H K bytes per token, 16 KB for H=32, K=128) that the caller sums
  over each group together with ``dk_part`` (fused into the L2-norm backward, or
  ``common.group_sum`` without it).
* ``wy_dv_kernel``, one program per (chunk, key/value head): ``dv = sum_h beta_h Tm_h^T dvn_h``
  over the query heads of the group, accumulated in registers and written once in ``v``'s dtype
  (no per-query-head temporary).
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
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2, 3)],
    key=["H", "HKV", "K", "V", "BT", "NK", "QK_NORM"],
)
@triton.jit
def wy_bwd_kernel(
    k, v, beta, G, rk, Tm, w, u, dw, dvn, dk_part, dG_part, dk, dbeta, dg, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, IS_VARLEN: tl.constexpr, QK_NORM: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Backward of the WY representation for one chunk of one query head, plus its gate
    gradients, except ``dv`` (``wy_dv_kernel``). Given ``dw`` and ``dvn`` (= dL/du) of the head and
    its key/value head's ``k``, ``v``::

        dXw = Tm^T dw, dXu = Tm^T dvn, dA = -strictly_lower(dXu u^T + dXw w^T)
        P   = dA * exp(G_i - G_j)
        dk_h  = beta exp(G) dXw + (diag(beta) P + P^T diag(beta)) k
        dbeta = rowsum(P * k k^T) + rowsum(dXu * v) + exp(G) rowsum(dXw * k)
        dG    = rowsum(D) - colsum(D) + beta exp(G) rowsum(dXw * k) + dG_part,  D = P * beta_i k_i.k_j

    and ``dg`` = reverse chunk-local cumsum of ``dG``. ``dk`` is [B,T,H,K]: this head's ``dk_h``,
    plus ``dk_part`` when ``H == HKV`` (then it is the final gradient; else the caller sums it
    over each group and adds ``dk_part``). With ``QK_NORM``, ``k`` stands for ``rk * k`` and
    ``dk`` is the gradient with respect to it.

    Grid (chunks, B*H). ``Tm^T`` [BT, BT] is loaded once (lower triangle of ``Tm``); pass 1 loops
    over ``[BT, BK]`` blocks (``k k^T``, ``dXw``, ``dA``) and ``[BT, BV]`` blocks (``dXu``, ``dA``);
    pass 2 recomputes ``dXw`` per ``[BT, BK]`` block on the tensor cores to write ``dk``.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    GROUP: tl.constexpr = H // HKV
    i_hk = i_h // GROUP
    bos, seq_len, i_t, _ = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    tok = bos + i_t * BT
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < seq_len
    strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
    # 64-bit scalar bases of the chunk, 32-bit tile offsets
    k += tok * HKV * K + i_hk * K
    v += tok * HKV * V + i_hk * V
    w += tok * H * K + i_h * K
    dw += tok * H * K + i_h * K
    dk += tok * H * K + i_h * K
    dk_part += tok * H * K + i_h * K  # read only when H == HKV
    u += tok * H * V + i_h * V
    dvn += tok * H * V + i_h * V
    o_kk = o_i[:, None] * (HKV * K)
    o_qk = o_i[:, None] * (H * K)
    o_kv = o_i[:, None] * (HKV * V)
    o_qv = o_i[:, None] * (H * V)
    # Tm rows are contiguous and the upper triangle reads as 0; used transposed
    Tm += tok * H * BT + i_h * BT
    m_tm = m_t[:, None] & (o_i[None, :] <= o_i[:, None])
    tm_t = tl.trans(tl.load(Tm + o_i[:, None] * (H * BT) + o_i[None, :], mask=m_tm, other=0).to(ACC).to(DOT))

    if QK_NORM:
        sk = tl.load(rk + (tok + o_i) * HKV + i_hk, mask=m_t, other=0).to(ACC)
    else:
        sk = tl.full([BT], 1.0, ACC)
    b = tl.load(beta + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
    gc = tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
    eg = tl.exp(gc)
    egs = eg * sk

    kk = tl.zeros([BT, BT], dtype=ACC)
    d_a = tl.zeros([BT, BT], dtype=ACC)
    db = tl.zeros([BT], dtype=ACC)
    d_g = tl.zeros([BT], dtype=ACC)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        kb = tl.load(k + o_kk + o_k[None, :], mask=m_tk, other=0).to(ACC)
        wb = tl.load(w + o_qk + o_k[None, :], mask=m_tk, other=0).to(ACC).to(DOT)
        dwb = tl.load(dw + o_qk + o_k[None, :], mask=m_tk, other=0).to(ACC).to(DOT)
        kk += tl.dot(kb.to(DOT), tl.trans(kb.to(DOT)), out_dtype=ACC)
        dxw = tl.dot(tm_t, dwb, out_dtype=ACC)
        d_a += tl.dot(dxw.to(DOT), tl.trans(wb), out_dtype=ACC)
        s = tl.sum(dxw * kb, axis=1) * egs
        db += s
        d_g += s * b
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        vb = tl.load(v + o_kv + o_v[None, :], mask=m_tv, other=0).to(ACC)
        ub = tl.load(u + o_qv + o_v[None, :], mask=m_tv, other=0).to(ACC).to(DOT)
        dub = tl.load(dvn + o_qv + o_v[None, :], mask=m_tv, other=0).to(ACC).to(DOT)
        dxu = tl.dot(tm_t, dub, out_dtype=ACC)
        d_a += tl.dot(dxu.to(DOT), tl.trans(ub), out_dtype=ACC)
        db += tl.sum(dxu * vb, axis=1)

    kk = kk * sk[:, None] * sk[None, :]
    p = tl.where(strict, -d_a * tl.exp(gc[:, None] - gc[None, :]), 0.0)
    db += tl.sum(p * kk, axis=1)
    dmat = p * kk * b[:, None]
    d_g += tl.sum(dmat, axis=1) - tl.sum(dmat, axis=0)
    for i_p in range(NK):
        d_g += tl.load(dG_part + ((tok + o_i) * H + i_h) * NK + i_p, mask=m_t, other=0).to(ACC)
    d_g = tl.where(m_t, d_g, 0.0)
    rev = tl.sum(d_g, axis=0) - tl.cumsum(d_g, axis=0) + d_g
    tl.store(dg + (tok + o_i) * H + i_h, rev.to(dg.dtype.element_ty), mask=m_t)
    tl.store(dbeta + (tok + o_i) * H + i_h, db.to(dbeta.dtype.element_ty), mask=m_t)

    q_mat = ((p * b[:, None] + tl.trans(p) * b[None, :]) * sk[None, :]).to(DOT)
    be = b * eg
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        kb = tl.load(k + o_kk + o_k[None, :], mask=m_tk, other=0).to(ACC).to(DOT)
        dwb = tl.load(dw + o_qk + o_k[None, :], mask=m_tk, other=0).to(ACC).to(DOT)
        acc = tl.dot(q_mat, kb, out_dtype=ACC) + tl.dot(tm_t, dwb, out_dtype=ACC) * be[:, None]
        if GROUP == 1:
            acc += tl.load(dk_part + o_qk + o_k[None, :], mask=m_tk, other=0).to(ACC)
        tl.store(dk + o_qk + o_k[None, :], acc.to(dk.dtype.element_ty), mask=m_tk)


@autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)],
    key=["H", "HKV", "V", "BT"],
)
@triton.jit
def wy_dv_kernel(
    beta, Tm, dvn, dv, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HKV: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
    IS_VARLEN: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """``dv = sum_h diag(beta_h) Tm_h^T dvn_h`` for one chunk of one key/value head, summed over
    the ``GROUP = H / HKV`` query heads ``h`` of its group (``u_h = Tm_h diag(beta_h) v``).

    Grid (chunks, B*HKV). For each ``[BT, BV]`` block of ``dv`` the group's ``Tm_h^T`` [BT, BT]
    (lower triangle of ``Tm``) and ``dvn_h`` blocks are loaded, the products accumulated in
    registers in ``ACC`` and ``dv`` stored once in its dtype.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_hk = i_bh // HKV, i_bh % HKV
    GROUP: tl.constexpr = H // HKV
    bos, seq_len, i_t, _ = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    tok = bos + i_t * BT
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < seq_len
    m_tm = m_t[:, None] & (o_i[None, :] <= o_i[:, None])
    # 64-bit scalar bases: first query head of the group; 32-bit tile offsets
    i_h0 = i_hk * GROUP
    Tm += tok * H * BT + i_h0 * BT
    dvn += tok * H * V + i_h0 * V
    beta += tok * H + i_h0
    dv += tok * HKV * V + i_hk * V
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        acc = tl.zeros([BT, BV], dtype=ACC)
        for j in range(GROUP):
            tm_t = tl.trans(tl.load(Tm + o_i[:, None] * (H * BT) + j * BT + o_i[None, :], mask=m_tm,
                                    other=0).to(ACC).to(DOT))
            dub = tl.load(dvn + o_i[:, None] * (H * V) + j * V + o_v[None, :], mask=m_tv, other=0).to(ACC).to(DOT)
            b = tl.load(beta + o_i * H + j, mask=m_t, other=0).to(ACC)
            acc += tl.dot(tm_t, dub, out_dtype=ACC) * b[:, None]
        tl.store(dv + o_i[:, None] * (HKV * V) + o_v[None, :], acc.to(dv.dtype.element_ty), mask=m_tv)


def wy_backward(k, v, beta, G, rk, Tm, w, u, dw, dvn, dk_part, dG_part, cu_seqlens, chunk_indices, n_chunks_seq,
                chunk_size, dk_dtype, g_dtype, acc, dot):
    """Returns ``(dk_h, dv, dbeta, dg)``: ``dv`` [B,T,HKV,V] (dtype of ``v``), ``dbeta`` (dtype of
    ``beta``) and ``dg`` (``g_dtype``) [B,T,H] are final; ``dk_h`` [B,T,H,K] is

    * with ``H == HKV``: the whole ``dk`` (``dk_part`` plus the WY part) in ``dk_dtype``;
    * with ``H > HKV``: each query head's WY part alone, un-summed, in float32 (float64 when
      ``acc`` is float64); the caller adds ``dk_part`` and sums over each group of ``H / HKV``
      heads (``l2norm_backward(..., base=dk_part)`` or ``common.group_sum``).
    """
    B, T, HKV, K = k.shape
    H, V = beta.shape[-1], v.shape[-1]
    if H == HKV:
        dk_h = torch.empty(B, T, H, K, device=k.device, dtype=dk_dtype)
    else:
        dk_h = torch.empty(B, T, H, K, device=k.device, dtype=torch.float64 if acc == tl.float64 else torch.float32)
    dv = torch.empty_like(v)
    dbeta = torch.empty_like(beta)
    dg = torch.empty(B, T, H, device=k.device, dtype=g_dtype)
    varlen = cu_seqlens is not None
    wy_bwd_kernel[(n_chunks_seq, B * H)](
        k, v, beta, G, rk, Tm, w, u, dw, dvn, dk_part, dG_part, dk_h, dbeta, dg, cu_seqlens, chunk_indices,
        T, H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=block_size(K), BV=block_size(V), NK=dG_part.shape[-1],
        IS_VARLEN=varlen, QK_NORM=rk is not None, ACC=acc, DOT=dot,
    )
    wy_dv_kernel[(n_chunks_seq, B * HKV)](
        beta, Tm, dvn, dv, cu_seqlens, chunk_indices, T,
        H=H, HKV=HKV, V=V, BT=chunk_size, BV=block_size(V), IS_VARLEN=varlen, ACC=acc, DOT=dot,
    )
    return dk_h, dv, dbeta, dg


_AOT_TYPES = {**AOT_TYPES, "Tm": "*bf16", "dw": "*bf16", "dvn": "*bf16", "dk_part": "*fp32", "dG_part": "*fp32",
              "dk": "*fp32", "dbeta": "*bf16", "dg": "*fp32"}
for _warps in (4, 8):
    for _stages in (1, 2):
        register_aot(AotSpec(
            name=f"gdn.wy_bwd[bf16,k128,bt64,group4,warps{_warps},stages{_stages}]",
            kernel=wy_bwd_kernel,
            types=_AOT_TYPES,
            constexprs={**AOT_SHAPES, "NK": 2, "IS_VARLEN": False, "QK_NORM": True},
            num_warps=_warps, num_stages=_stages,
        ))
        register_aot(AotSpec(
            name=f"gdn.wy_dv[bf16,v128,bt64,group4,warps{_warps},stages{_stages}]",
            kernel=wy_dv_kernel,
            types={"beta": "*bf16", "Tm": "*bf16", "dvn": "*bf16", "dv": "*bf16", "cu_seqlens": "*i32",
                   "chunk_indices": "*i32"},
            constexprs={name: AOT_SHAPES[name] for name in ("H", "HKV", "V", "BT", "BV", "ACC", "DOT")}
            | {"IS_VARLEN": False},
            num_warps=_warps, num_stages=_stages,
        ))
register_aot(AotSpec(
    name="gdn.wy_bwd[bf16,k128,bt64,group1,varlen,warps4,stages1]",
    kernel=wy_bwd_kernel,
    types={**_AOT_TYPES, "dk": "*bf16"},
    constexprs={**AOT_SHAPES, "HKV": AOT_SHAPES["H"], "NK": 2, "IS_VARLEN": True, "QK_NORM": False},
    num_warps=4, num_stages=1,
))
