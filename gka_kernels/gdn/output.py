"""Chunk-parallel output of the gated delta rule and its backward (everything except the WY part).

With ``h`` the state entering a chunk, ``v_new`` its residuals and ``M_ij = exp(G_i - G_j)`` for
``i >= j`` (0 above the diagonal)::

    o  = scale (exp(G) q h + (q k^T * M) v_new)                               [BT, V]

Backward, given ``do``, ``dh`` (gradient of the chunk's outgoing state) and ``dv_new``::

    dv_local = scale (q k^T * M)^T do             (before the state pass adds (exp(G_L-G) k) dh)
    dS   = scale (do v_new^T) * M
    dq   = scale exp(G) do h^T + dS k
    dk   = dS^T q + exp(G_L - G) v_new dh^T
    dw   = -dv_new h^T
    dG   = rowsum(scale exp(G) (do h^T) * q) + rowsum(D) - colsum(D) - e,  D = dS * q k^T,
           e_j = exp(G_L - G_j) (v_new dh^T)_j . k_j, plus (sum_j e_j + exp(G_L) sum(h * dh)) at
           the chunk's last token.

With ``QK_NORM``, ``q`` and ``k`` stand for ``rq * q`` and ``rk * k`` (inverse L2 norms per
token and head): the factors scale rows/columns of the products, so the raw 16-bit inputs feed the
tensor cores unrounded, and ``dq``/``dk`` are gradients with respect to the normalized vectors.
Keys/values are read from head ``h // (H // HKV)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, is_interpreter
from gka_kernels.gdn.indexing import block_size, chunk_span


def _configs(tune_bv: bool, warps=(4, 8), stages=(2, 3)):
    """Launch configs. With ``tune_bv`` the gridded value block ``BV`` is tuned too (16 under the
    interpreter, so that CPU tests run several blocks)."""
    sizes = ((16,) if is_interpreter() else (64, 128)) if tune_bv else (None,)
    return [triton.Config({"BV": bs} if bs else {}, num_warps=nw, num_stages=ns)
            for bs in sizes for nw in warps for ns in stages]


@autotune(configs=_configs(True), key=["H", "HKV", "K", "V", "BT", "QK_NORM"])
@triton.jit
def output_fwd_kernel(
    q, k, vn, h, G, rq, rk, o, cu_seqlens, chunk_indices, T, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, QK_NORM: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    """o = scale (exp(G) q h + (q k^T * M) v_new). Grid (V/BV, chunks, B*H); tiles ``[BT, BK]``
    (looped over K), ``[BK, BV]``, ``[BT, BT]``, output ``[BT, BV]``."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, i_t, i_tg = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    tok = bos + i_t * BT
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < seq_len
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    # 64-bit scalar bases, 32-bit tile offsets
    q += tok * H * K + i_h * K
    k += tok * HKV * K + i_hk * K
    h += (i_tg * H + i_h) * K * V
    acc_o = tl.zeros([BT, BV], dtype=ACC)
    acc_s = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        qb = tl.load(q + o_i[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0).to(DOT)
        kb = tl.load(k + o_i[:, None] * (HKV * K) + o_k[None, :], mask=m_tk, other=0).to(DOT)
        hb = tl.load(h + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0).to(DOT)
        acc_o += tl.dot(qb, hb, out_dtype=ACC)
        acc_s += tl.dot(qb, tl.trans(kb), out_dtype=ACC)
    gc = tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
    fq = scale * tl.exp(tl.where(m_t, gc, float("-inf")))
    if QK_NORM:
        sq = tl.load(rq + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
        sk = tl.load(rk + (tok + o_i) * HKV + i_hk, mask=m_t, other=0).to(ACC)
        fq *= sq
        acc_s *= sq[:, None] * sk[None, :]
    causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    acc_s = tl.where(causal, acc_s * tl.exp(gc[:, None] - gc[None, :]), 0.0) * scale
    m_tv = m_t[:, None] & m_v[None, :]
    o_tv = o_i[:, None] * (H * V) + o_v[None, :]
    vnb = tl.load(vn + tok * H * V + i_h * V + o_tv, mask=m_tv, other=0).to(DOT)
    out = acc_o * fq[:, None]
    out += tl.dot(acc_s.to(DOT), vnb, out_dtype=ACC)
    tl.store(o + tok * H * V + i_h * V + o_tv, out.to(o.dtype.element_ty), mask=m_tv)


@autotune(configs=_configs(True), key=["H", "HKV", "K", "V", "BT", "QK_NORM"])
@triton.jit
def dv_local_kernel(
    q, k, G, rq, rk, do, dvl, cu_seqlens, chunk_indices, T, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, QK_NORM: tl.constexpr,
    ACC: tl.constexpr, DOT: tl.constexpr,
):
    """dv_local = scale (q k^T * M)^T do. Grid (V/BV, chunks, B*H); ``[BT, BT]`` tile of
    ``k_j . q_i`` accumulated over K blocks, output ``[BT, BV]``."""
    i_v, i_c, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, i_t, _ = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    tok = bos + i_t * BT
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < seq_len
    o_v = i_v * BV + tl.arange(0, BV)
    q += tok * H * K + i_h * K
    k += tok * HKV * K + i_hk * K
    acc_s = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        qb = tl.load(q + o_i[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0).to(DOT)
        kb = tl.load(k + o_i[:, None] * (HKV * K) + o_k[None, :], mask=m_tk, other=0).to(DOT)
        acc_s += tl.dot(kb, tl.trans(qb), out_dtype=ACC)
    gc = tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
    if QK_NORM:
        acc_s *= tl.load(rk + (tok + o_i) * HKV + i_hk, mask=m_t, other=0).to(ACC)[:, None]
        acc_s *= tl.load(rq + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)[None, :]
    # element [j, i] = scale (k_j . q_i) exp(G_i - G_j) for j <= i
    anti = (o_i[:, None] <= o_i[None, :]) & m_t[None, :]
    acc_s = tl.where(anti, acc_s * tl.exp(gc[None, :] - gc[:, None]), 0.0) * scale
    m_tv = m_t[:, None] & (o_v[None, :] < V)
    o_tv = o_i[:, None] * (H * V) + o_v[None, :]
    dob = tl.load(do + (tok * H * V + i_h * V) + o_tv, mask=m_tv, other=0).to(DOT)
    out = tl.dot(acc_s.to(DOT), dob, out_dtype=ACC)
    tl.store(dvl + (tok * H * V + i_h * V) + o_tv, out.to(dvl.dtype.element_ty), mask=m_tv)


@autotune(configs=_configs(False, warps=(8,), stages=(2, 1, 3)), key=["H", "HKV", "K", "V", "BT", "QK_NORM"])
@triton.jit
def dqkw_kernel(
    q, k, h, dh, vn, do, dvn, G, rq, rk, dq, dk, dw, dG_part, cu_seqlens, chunk_indices, T, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, IS_VARLEN: tl.constexpr,
    QK_NORM: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """dq, the non-WY part of dk, dw and this K block's part of dG (see the module docstring),
    for one key head and the query heads of its group.

    Grid (K/BK, chunks, B*HKV). Per query head, loops over V in ``BV`` blocks accumulating
    ``[BT, BK]`` products with ``h``/``dh`` ``[BK, BV]`` and the ``[BT, BT]`` ``do v_new^T``.
    ``dq``/``dw`` are per query head [B,T,H,K]; ``dk`` [B,T,HKV,K] sums the group;
    ``dG_part`` is [B,T,H,NK] with ``NK = ceil(K / BK)``.
    """
    i_k, i_c, i_bk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_hk = i_bk // HKV, i_bk % HKV
    GROUP: tl.constexpr = H // HKV
    bos, seq_len, i_t, i_tg = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    tok = bos + i_t * BT
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < seq_len
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    k += tok * HKV * K + i_hk * K
    dk += tok * HKV * K + i_hk * K
    kb = tl.load(k + o_i[:, None] * (HKV * K) + o_k[None, :], mask=m_tk, other=0).to(ACC)
    if QK_NORM:
        sk = tl.load(rk + (tok + o_i) * HKV + i_hk, mask=m_t, other=0).to(ACC)
    else:
        sk = tl.full([BT], 1.0, ACC)
    last = tl.minimum(BT, seq_len - i_t * BT) - 1
    causal = (o_i[:, None] >= o_i[None, :]) & m_t[:, None]
    acc_dk = tl.zeros([BT, BK], dtype=ACC)
    for j in range(GROUP):
        i_h = i_hk * GROUP + j
        p_s = (i_tg * H + i_h) * K * V
        p_tv = tok * H * V + i_h * V
        acc_dq = tl.zeros([BT, BK], dtype=ACC)
        acc_dw = tl.zeros([BT, BK], dtype=ACC)
        acc_dkh = tl.zeros([BT, BK], dtype=ACC)
        acc_ds = tl.zeros([BT, BT], dtype=ACC)
        acc_hdh = tl.zeros([BK], dtype=ACC)
        for i_v in range((V + BV - 1) // BV):
            o_v = i_v * BV + tl.arange(0, BV)
            m_kv = m_k[:, None] & (o_v[None, :] < V)
            hb = tl.load(h + p_s + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0)
            dhb = tl.load(dh + p_s + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0)
            m_tv = m_t[:, None] & (o_v[None, :] < V)
            vnb = tl.load(vn + p_tv + o_i[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0).to(DOT)
            dob = tl.load(do + p_tv + o_i[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0).to(DOT)
            dvnb = tl.load(dvn + p_tv + o_i[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0).to(DOT)
            acc_dq += tl.dot(dob, tl.trans(hb.to(DOT)), out_dtype=ACC)
            acc_dw += tl.dot(dvnb, tl.trans(hb.to(DOT)), out_dtype=ACC)
            acc_dkh += tl.dot(vnb, tl.trans(dhb.to(DOT)), out_dtype=ACC)
            acc_ds += tl.dot(dob, tl.trans(vnb), out_dtype=ACC)
            acc_hdh += tl.sum(hb.to(ACC) * dhb.to(ACC), axis=1)

        p_tk = tok * H * K + i_h * K
        qb = tl.load(q + p_tk + o_i[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0).to(ACC)
        gc = tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
        g_last = tl.load(G + (tok + last) * H + i_h).to(ACC)
        if QK_NORM:
            sq = tl.load(rq + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
        else:
            sq = tl.full([BT], 1.0, ACC)
        ds = tl.where(causal, acc_ds * tl.exp(gc[:, None] - gc[None, :]), 0.0) * scale
        dq_inter = acc_dq * (scale * tl.exp(tl.where(m_t, gc, float("-inf"))))[:, None]
        dqb = dq_inter + tl.dot((ds * sk[None, :]).to(DOT), kb.to(DOT), out_dtype=ACC)
        dkh = acc_dkh * tl.exp(tl.where(m_t, g_last - gc, float("-inf")))[:, None]
        acc_dk += tl.dot(tl.trans(ds * sq[:, None]).to(DOT), qb.to(DOT), out_dtype=ACC) + dkh
        d1 = ds * tl.dot(qb.to(DOT), tl.trans(kb.to(DOT)), out_dtype=ACC) * (sq[:, None] * sk[None, :])
        e = tl.sum(dkh * kb, axis=1) * sk
        d_g = tl.sum(dq_inter * qb, axis=1) * sq + tl.sum(d1, axis=1) - tl.sum(d1, axis=0) - e
        d_g += tl.where(o_i == last, tl.sum(e, axis=0) + tl.exp(g_last) * tl.sum(acc_hdh, axis=0), 0.0)
        tl.store(dq + p_tk + o_i[:, None] * (H * K) + o_k[None, :], dqb.to(dq.dtype.element_ty), mask=m_tk)
        tl.store(dw + p_tk + o_i[:, None] * (H * K) + o_k[None, :], (-acc_dw).to(dw.dtype.element_ty), mask=m_tk)
        tl.store(dG_part + ((tok + o_i) * H + i_h) * NK + i_k, d_g.to(dG_part.dtype.element_ty), mask=m_t)
    tl.store(dk + o_i[:, None] * (HKV * K) + o_k[None, :], acc_dk.to(dk.dtype.element_ty), mask=m_tk)


def _grid(D: int, n_chunks: int, BH: int):
    return lambda meta: (triton.cdiv(D, meta["BV"]), n_chunks, BH)


def output_forward(q, k, vn, h, G, rq, rk, scale, cu_seqlens, chunk_indices, n_chunks_seq, chunk_size, acc, dot):
    """o [B,T,H,V] in the dtype of ``q``."""
    B, T, H, K = q.shape
    HKV, V = k.shape[2], vn.shape[-1]
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    output_fwd_kernel[_grid(V, n_chunks_seq, B * H)](
        q, k, vn, h, G, rq, rk, o, cu_seqlens, chunk_indices, T, scale,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=block_size(K),
        IS_VARLEN=cu_seqlens is not None, QK_NORM=rq is not None, ACC=acc, DOT=dot,
    )
    return o


def dv_local(q, k, G, rq, rk, do, scale, cu_seqlens, chunk_indices, n_chunks_seq, chunk_size, store_dtype, acc,
             dot):
    """scale (q k^T * M)^T do per chunk, [B,T,H,V] in ``store_dtype``."""
    B, T, H, K = q.shape
    HKV, V = k.shape[2], do.shape[-1]
    dvl = torch.empty(B, T, H, V, device=q.device, dtype=store_dtype)
    dv_local_kernel[_grid(V, n_chunks_seq, B * H)](
        q, k, G, rq, rk, do, dvl, cu_seqlens, chunk_indices, T, scale,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=block_size(K),
        IS_VARLEN=cu_seqlens is not None, QK_NORM=rq is not None, ACC=acc, DOT=dot,
    )
    return dvl


def dqkw(q, k, h, dh, vn, do, dvn, G, rq, rk, scale, cu_seqlens, chunk_indices, n_chunks_seq, chunk_size,
         dq_dtype, store_dtype, acc, dot):
    """Returns ``dq`` [B,T,H,K] (``dq_dtype``), the non-WY ``dk`` [B,T,HKV,K] (float32/64),
    ``dw`` [B,T,H,K] (``store_dtype``) and ``dG_part`` [B,T,H,NK] (float32/64)."""
    B, T, H, K = q.shape
    HKV, V = k.shape[2], do.shape[-1]
    acc_dtype = torch.float64 if acc == tl.float64 else torch.float32
    BK = block_size(K)
    nk = triton.cdiv(K, BK)
    dq = torch.empty(B, T, H, K, device=q.device, dtype=dq_dtype)
    dk = torch.empty(B, T, HKV, K, device=q.device, dtype=acc_dtype)
    dw = torch.empty(B, T, H, K, device=q.device, dtype=store_dtype)
    dG_part = torch.empty(B, T, H, nk, device=q.device, dtype=acc_dtype)
    dqkw_kernel[(nk, n_chunks_seq, B * HKV)](
        q, k, h, dh, vn, do, dvn, G, rq, rk, dq, dk, dw, dG_part, cu_seqlens, chunk_indices, T, scale,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=BK, BV=block_size(V), NK=nk,
        IS_VARLEN=cu_seqlens is not None, QK_NORM=rq is not None, ACC=acc, DOT=dot,
    )
    return dq, dk, dw, dG_part


_AOT_SHAPES = {"H": 32, "HKV": 8, "K": 128, "V": 128, "BT": 64, "BK": 64, "ACC": tl.float32,
               "DOT": tl.bfloat16}
register_aot(AotSpec(
    name="gdn.output_fwd[bf16,k128,bt64]",
    kernel=output_fwd_kernel,
    types={"q": "*bf16", "k": "*bf16", "vn": "*bf16", "h": "*bf16", "G": "*fp32", "rq": "*fp32", "rk": "*fp32",
           "o": "*bf16", "cu_seqlens": "*i32", "chunk_indices": "*i32", "scale": "fp32"},
    constexprs={**_AOT_SHAPES, "BV": 128, "IS_VARLEN": False, "QK_NORM": True},
    num_warps=8, num_stages=2,
))
register_aot(AotSpec(
    name="gdn.dv_local[bf16,k128,bt64]",
    kernel=dv_local_kernel,
    types={"q": "*bf16", "k": "*bf16", "G": "*fp32", "rq": "*fp32", "rk": "*fp32", "do": "*bf16", "dvl": "*bf16",
           "cu_seqlens": "*i32", "chunk_indices": "*i32", "scale": "fp32"},
    constexprs={**_AOT_SHAPES, "BV": 128, "IS_VARLEN": True, "QK_NORM": True},
    num_warps=4, num_stages=2,
))
register_aot(AotSpec(
    name="gdn.dqkw[bf16,k128,bt64]",
    kernel=dqkw_kernel,
    types={"q": "*bf16", "k": "*bf16", "h": "*bf16", "dh": "*bf16", "vn": "*bf16", "do": "*bf16",
           "dvn": "*bf16", "G": "*fp32", "rq": "*fp32", "rk": "*fp32", "dq": "*fp32", "dk": "*fp32",
           "dw": "*bf16", "dG_part": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32", "scale": "fp32"},
    constexprs={**_AOT_SHAPES, "BV": 64, "NK": 2, "IS_VARLEN": False, "QK_NORM": True},
    num_warps=8, num_stages=2,
))
