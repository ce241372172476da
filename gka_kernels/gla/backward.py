"""Backward of chunked simple GLA: value gradients, and query/key/decay gradients.

Per chunk, with start state ``h``, ``dh`` = dL/d(state at the chunk's end), chunk-local
cumulative log-decays ``G`` (last valid row ``L``), ``M_ij = [i >= j] exp(G_i - G_j)`` and
``v_eff = v * vs``:

    dv_eff = (k exp(G_L - G)) @ dh + scale * (M * (q @ k^T))^T @ do
    dq     = scale * exp(G) (do @ h^T)  + scale * (M * (do @ v_eff^T)) @ k
    dk     = exp(G_L - G) (v_eff @ dh^T) + scale * (M * (do @ v_eff^T))^T @ q
    dG_i   = q_i . dq_i - k_i . dk_i  (+ exp(G_L) <h, dh> + sum_j k_j . dk_j^inter on row L)
    dg     = reverse cumulative sum of dG within the chunk

(``dk^inter`` is the ``dh`` term of ``dk``.) Heads that share a query/key/value head are reduced
inside one program, in a fixed order, so the result is deterministic (no atomics). The optional
``vs`` row scale and ``D`` skip connection of the forward (Mamba-2) get their gradients here too:
``dv = vs * dv_eff + D * do``, ``dvs = sum_V dv_eff * v``, ``dD`` partial sums of ``do * v``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.split_dot import dot_hi_lo, split_hi_lo
from gka_kernels.common.cumsum import chunk_local_cumsum
from gka_kernels.common.triton_utils import autotune
from gka_kernels.gla.locate import locate_chunk


#: Value block of the dv kernel (fixed, not tuned: it sizes the buffer of partial sums over V blocks).
_DV_BV = 64


@autotune(
    configs=[
        triton.Config({"BK": BK}, num_warps=w, num_stages=s)
        for BK, w, s in ((64, 8, 2), (64, 4, 2), (128, 8, 2), (128, 4, 3))
    ],
    key=["H", "HQ", "HK", "HV", "K", "V", "BT", "BV", "HAS_VS", "HAS_D", "DT", "SPLIT"],
)
@triton.jit
def chunk_bwd_dv_kernel(
    q, k, v, vs, gc, dhs, do, D, dv, dvs, dD, cu_seqlens, chunk_indices, T, TT, scale,
    H: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_VS: tl.constexpr, HAS_D: tl.constexpr, D_PER_V: tl.constexpr,
    IS_VARLEN: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """1-D grid over (V block, value head, chunk): one program owns a [BT, BV] tile of one value
    head and loops over the H/HV heads reading it. dv: [B,T,HV,V]; dvs: [NV,B,T,H] float32 partial sums over
    V blocks (TT = B*T); dD: [NT_total,H,V] float32 partial sums over the chunk's rows."""
    # 1-D grid, value blocks fastest, then value heads, then chunks
    NV = tl.cdiv(V, BV)
    pid = tl.program_id(0)
    i_v = pid % NV
    i_hv = (pid // NV) % HV
    i_tg = (pid // (NV * HV)).to(tl.int64)
    i_t, bos, seq_len = locate_chunk(pid // (NV * HV), cu_seqlens, chunk_indices, T, BT, IS_VARLEN)
    GV: tl.constexpr = H // HV

    # scalar 64-bit bases at the chunk's first row; 32-bit offsets inside the tile
    row0 = bos + i_t * BT
    r = tl.arange(0, BT)
    m_t = r < seq_len - i_t * BT
    last = tl.minimum(seq_len - i_t * BT, BT) - 1
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    causal_t = (r[:, None] <= r[None, :]) & m_t[None, :]  # [j, i]: i >= j
    if HAS_VS or HAS_D:
        bv = tl.load(v + (row0 * HV + i_hv) * V + r[:, None] * (HV * V) + o_v[None, :], mask=m_tv,
                     other=0).to(ACC)

    dv_acc = tl.zeros([BT, BV], dtype=ACC)
    for i_g in range(GV):
        i_h = i_hv * GV + i_g
        i_hq = i_h // (H // HQ)
        i_hk = i_h // (H // HK)
        dh_base = dhs + (i_tg * H + i_h) * K * V
        q_base = q + (row0 * HQ + i_hq) * K
        k_base = k + (row0 * HK + i_hk) * K
        g_base = gc + row0 * H + i_h
        acc_at = tl.zeros([BT, BT], dtype=ACC)
        b_dv = tl.zeros([BT, BV], dtype=ACC)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            bk = tl.load(k_base + r[:, None] * (HK * K) + o_k[None, :],
                         mask=m_t[:, None] & m_k[None, :], other=0).to(ACC)
            bqt = tl.load(q_base + r[None, :] * (HQ * K) + o_k[:, None],
                          mask=m_k[:, None] & m_t[None, :], other=0).to(ACC)
            bdh = tl.load(dh_base + o_k[:, None] * V + o_v[None, :],
                          mask=m_k[:, None] & m_v[None, :], other=0).to(ACC)
            acc_at += dot_hi_lo(bk, bqt, False, SPLIT, DT, ACC, PREC)
            b_dv += dot_hi_lo(bk, bdh, False, SPLIT, DT, ACC, PREC)
        G = tl.load(g_base + r * H, mask=m_t, other=0).to(ACC)
        G_last = tl.load(g_base + last * H).to(ACC)
        b_dv *= tl.where(m_t, tl.exp(G_last - G), 0)[:, None]
        acc_at *= tl.exp(tl.where(causal_t, G[None, :] - G[:, None], float("-inf"))) * scale
        out_off = (row0 * H + i_h) * V + r[:, None] * (H * V) + o_v[None, :]
        bdo = tl.load(do + out_off, mask=m_tv, other=0).to(ACC)
        b_dv += dot_hi_lo(acc_at, bdo, SPLIT, False, DT, ACC, PREC)
        if HAS_VS:
            tl.store(dvs + (i_v.to(tl.int64) * TT + row0) * H + i_h + r * H,
                     tl.sum(b_dv * bv, axis=1), mask=m_t)
            b_dv *= tl.load(vs + row0 * H + i_h + r * H, mask=m_t, other=0).to(ACC)[:, None]
        if HAS_D:
            if D_PER_V:
                b_dv += bdo * tl.load(D + i_h * V + o_v, mask=m_v, other=0).to(ACC)[None, :]
            else:
                b_dv += bdo * tl.load(D + i_h).to(ACC)
            tl.store(dD + (i_tg * H + i_h) * V + o_v, tl.sum(bdo * bv, axis=0), mask=m_v)
        dv_acc += b_dv
    tl.store(dv + (row0 * HV + i_hv) * V + r[:, None] * (HV * V) + o_v[None, :],
             dv_acc.to(dv.dtype.element_ty), mask=m_tv)


@autotune(
    configs=[
        triton.Config({"BV": BV}, num_warps=w, num_stages=s)
        for BV, w, s in ((32, 8, 2), (64, 8, 2), (32, 4, 2), (32, 8, 3))
    ],
    key=["H", "HQ", "HK", "HV", "K", "V", "BT", "BK", "HAS_VS", "DT", "SPLIT"],
)
@triton.jit
def chunk_bwd_dqkg_kernel(
    q, k, v, vs, gc, hs, dhs, do, dq, dk, dg, cu_seqlens, chunk_indices, T, TT, scale,
    H: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, NG: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    Q_ACC: tl.constexpr, K_ACC: tl.constexpr, HAS_VS: tl.constexpr,
    IS_VARLEN: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """1-D grid over (K block, head group, chunk): one program owns a [BT, BK] tile and NG
    consecutive heads.
    Q_ACC (K_ACC): the NG heads share one query (key) head, whose gradient is summed in registers
    and stored once into dq [B,T,HQ,K] (dk [B,T,HK,K]); otherwise every head's gradient goes to
    its own slot of dq [B,T,H,K] (dk [B,T,H,K]). dg: [NK,B,T,H] float32, the gradient of the
    chunk-local cumsum G, partial over K blocks (TT = B*T); the caller sums the blocks and takes
    the reverse cumulative sum within chunks."""
    # 1-D grid, key blocks fastest, then head groups, then chunks
    NK = tl.cdiv(K, BK)
    pid = tl.program_id(0)
    i_k = pid % NK
    i_hg = (pid // NK) % (H // NG)
    i_tg = (pid // (NK * (H // NG))).to(tl.int64)
    i_t, bos, seq_len = locate_chunk(pid // (NK * (H // NG)), cu_seqlens, chunk_indices, T, BT,
                                     IS_VARLEN)

    # scalar 64-bit bases at the chunk's first row; 32-bit offsets inside the tile
    row0 = bos + i_t * BT
    r = tl.arange(0, BT)
    m_t = r < seq_len - i_t * BT
    last = tl.minimum(seq_len - i_t * BT, BT) - 1
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    causal = (r[:, None] >= r[None, :]) & m_t[:, None]

    # dk_acc accumulates dk over the NG heads (or holds one head's when not shared); sk holds
    # rowsum(k * dk_acc) so far, so that each head's k . dk_h is a difference of running sums (no
    # per-head dk tile). dq is formed per head (b_dq), then stored or added to dq_acc.
    # Registers (sm_90, K = 128): only b_da, b_dq and dk_acc are live across the V loop. q and k
    # are read after it, where they are used (k twice), instead of being held; do @ h^T takes do
    # as it is (exact in DT) and gets its row scale exp(G) * scale on the fp32 result; b_da is
    # split into hi + lo once for both of its products. Without SPLIT, and without dq_acc live
    # across the loop (Q_ACC), there are registers for one more [BT, BK] tile: a k tile shared by the
    # NG heads (read twice per head otherwise) is then read once, before the head loop (HOLD_K).
    # Measured on an H200 (train-4k): GQA GLA 721 -> 655 us; holding k (or q and k) with Q_ACC, as
    # in Mamba-2, was slower (662 -> 680 / 695 us).
    HOLD_K: tl.constexpr = K_ACC and not Q_ACC and not SPLIT
    dq_acc = tl.zeros([BT, BK], dtype=ACC)
    dk_acc = tl.zeros([BT, BK], dtype=ACC)
    sk = tl.zeros([BT], dtype=ACC)
    if HOLD_K:
        bk_held = tl.load(k + (row0 * HK + (i_hg * NG) // (H // HK)) * K + r[:, None] * (HK * K)
                          + o_k[None, :], mask=m_tk, other=0).to(ACC)
    for i_g in range(NG):
        i_h = i_hg * NG + i_g
        q_base = q + (row0 * HQ + i_h // (H // HQ)) * K
        k_base = k + (row0 * HK + i_h // (H // HK)) * K
        h_base = hs + (i_tg * H + i_h) * K * V
        dh_base = dhs + (i_tg * H + i_h) * K * V
        v_base = v + (row0 * HV + i_h // (H // HV)) * V
        do_base = do + (row0 * H + i_h) * V
        g_base = gc + row0 * H + i_h
        G = tl.load(g_base + r * H, mask=m_t, other=0).to(ACC)
        G_last = tl.load(g_base + last * H).to(ACC)
        w_k = tl.where(m_t, tl.exp(G_last - G), 0)
        if HAS_VS:  # v_eff = vs * v: scale the rows of v @ dh^T and the columns of do @ v^T
            bs = tl.load(vs + row0 * H + i_h + r * H, mask=m_t, other=0).to(ACC)
            w_k *= bs
        b_da = tl.zeros([BT, BT], dtype=ACC)
        b_dq = tl.zeros([BT, BK], dtype=ACC)  # do @ h^T; its row scale exp(G) * scale comes after
        b_hdh = tl.zeros([BK], dtype=ACC)
        for i_v in range(tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_v = o_v < V
            m_tv = m_t[:, None] & m_v[None, :]
            bv = tl.load(v_base + r[:, None] * (HV * V) + o_v[None, :], mask=m_tv, other=0).to(ACC)
            bdo = tl.load(do_base + r[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0).to(ACC)
            # [BV, BK] tiles of h^T and dh^T
            m_vk = m_v[:, None] & m_k[None, :]
            bht = tl.load(h_base + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0).to(ACC)
            bdht = tl.load(dh_base + o_k[None, :] * V + o_v[:, None], mask=m_vk, other=0).to(ACC)
            # v enters unsplit: cast to DT before the transpose (same values, half the bytes moved)
            b_da += dot_hi_lo(bdo, tl.trans(bv.to(DT)), False, False, DT, ACC, PREC)
            b_dq += dot_hi_lo(bdo, bht, False, SPLIT, DT, ACC, PREC)
            dk_acc += dot_hi_lo(bv * w_k[:, None], bdht, SPLIT, SPLIT, DT, ACC, PREC)
            b_hdh += tl.sum(bht * bdht, axis=0)
        if HOLD_K:
            bk = bk_held
        else:
            bk = tl.load(k_base + r[:, None] * (HK * K) + o_k[None, :], mask=m_tk, other=0).to(ACC)
        sk_inter = tl.sum(bk * dk_acc, axis=1)
        dg_last = tl.sum(b_hdh, axis=0) * tl.exp(G_last) + tl.sum(sk_inter - sk, axis=0)
        b_da *= tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf"))) * scale
        if HAS_VS:
            b_da *= bs[None, :]
        # b_da enters both products below as hi + lo parts, split once (the fp32 tile dies here)
        da_hi, da_lo = split_hi_lo(b_da, DT)
        bk_hi = bk.to(DT)
        b_dq = b_dq * (tl.exp(G) * scale)[:, None]
        b_dq = tl.dot(da_hi, bk_hi, b_dq, out_dtype=ACC, input_precision=PREC)
        if SPLIT:
            b_dq = tl.dot(da_lo, bk_hi, b_dq, out_dtype=ACC, input_precision=PREC)
        bq = tl.load(q_base + r[:, None] * (HQ * K) + o_k[None, :], mask=m_tk, other=0).to(ACC)
        b_dg = tl.sum(bq * b_dq, axis=1) + tl.where(r == last, dg_last, 0)
        if Q_ACC:
            dq_acc += b_dq
        else:
            tl.store(dq + (row0 * H + i_h) * K + r[:, None] * (H * K) + o_k[None, :],
                     b_dq.to(dq.dtype.element_ty), mask=m_tk)
        bq_hi, bq_lo = split_hi_lo(bq, DT)
        dk_acc = tl.dot(tl.trans(da_hi), bq_hi, dk_acc, out_dtype=ACC, input_precision=PREC)
        if SPLIT:
            dk_acc = tl.dot(tl.trans(da_lo), bq_hi, dk_acc, out_dtype=ACC, input_precision=PREC)
            dk_acc = tl.dot(tl.trans(da_hi), bq_lo, dk_acc, out_dtype=ACC, input_precision=PREC)
        # k . dk_h as a difference of running sums (k re-read unless held: with SPLIT it is not
        # kept across the products)
        if not HOLD_K:
            bk = tl.load(k_base + r[:, None] * (HK * K) + o_k[None, :], mask=m_tk, other=0).to(ACC)
        sk_new = tl.sum(bk * dk_acc, axis=1)
        b_dg -= sk_new - sk
        tl.store(dg + (i_k.to(tl.int64) * TT + row0) * H + i_h + r * H,
                 b_dg.to(dg.dtype.element_ty), mask=m_t)
        if K_ACC:
            sk = sk_new
        else:
            tl.store(dk + (row0 * H + i_h) * K + r[:, None] * (H * K) + o_k[None, :],
                     dk_acc.to(dk.dtype.element_ty), mask=m_tk)
            dk_acc = tl.zeros([BT, BK], dtype=ACC)
    if Q_ACC:
        tl.store(dq + (row0 * HQ + (i_hg * NG) // (H // HQ)) * K + r[:, None] * (HQ * K)
                 + o_k[None, :],
                 dq_acc.to(dq.dtype.element_ty), mask=m_tk)
    if K_ACC:
        tl.store(dk + (row0 * HK + (i_hg * NG) // (H // HK)) * K + r[:, None] * (HK * K)
                 + o_k[None, :],
                 dk_acc.to(dk.dtype.element_ty), mask=m_tk)


def chunk_bwd_dv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    dhs: torch.Tensor,
    do: torch.Tensor,
    *,
    scale: float,
    BT: int,
    num_chunks: int,
    v_scale: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    acc,
    dot_dtype,
    precision: str,
    split: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns ``dv [B,T,HV,V]`` (v's dtype), ``dvs [B,T,H]`` (float32) when ``v_scale`` is given,
    ``dD`` (D's shape, float32) when ``D`` is given."""
    Bsz, T, HQ, K = q.shape
    H = gc.shape[2]
    HK, HV, V = k.shape[2], v.shape[2], v.shape[3]
    fdt = torch.float64 if acc == tl.float64 else torch.float32
    dv = torch.empty_like(v)
    BV = min(_DV_BV, max(16, triton.next_power_of_2(V)))
    dvs = v.new_empty(triton.cdiv(V, BV), Bsz, T, H, dtype=fdt) if v_scale is not None else None
    dD = v.new_empty(num_chunks, H, V, dtype=fdt) if D is not None else None
    grid = (triton.cdiv(V, BV) * HV * num_chunks,)
    chunk_bwd_dv_kernel[grid](
        q, k, v, v_scale, gc, dhs, do, D, dv, dvs, dD, cu_seqlens, chunk_indices, T, Bsz * T, scale,
        H=H, HQ=HQ, HK=HK, HV=HV, K=K, V=V, BT=BT, BV=BV,
        HAS_VS=v_scale is not None, HAS_D=D is not None, D_PER_V=D is not None and D.dim() == 2,
        IS_VARLEN=cu_seqlens is not None, ACC=acc, DT=dot_dtype, PREC=precision, SPLIT=split,
    )
    if dvs is not None:
        dvs = dvs.sum(0)
    if dD is not None:
        dD = dD.sum(0)
        if D.dim() == 1:
            dD = dD.sum(-1)
    return dv, dvs, dD


def chunk_bwd_dqkg(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    hs: torch.Tensor,
    dhs: torch.Tensor,
    do: torch.Tensor,
    *,
    scale: float,
    BT: int,
    num_chunks: int,
    v_scale: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    acc,
    dot_dtype,
    precision: str,
    split: bool = False,
    dk_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``dq`` (q's shape and dtype), ``dk`` (k's shape; ``dk_dtype``, default k's dtype),
    ``dg [B,T,H]`` float32 (float64 under gradcheck)."""
    Bsz, T, HQ, K = q.shape
    H = gc.shape[2]
    HK, HV, V = k.shape[2], v.shape[2], v.shape[3]
    fdt = torch.float64 if acc == tl.float64 else torch.float32
    gq, gk = H // HQ, H // HK
    NG = max(gq, gk)
    q_acc, k_acc = gq == NG, gk == NG
    # A gradient not reduced in registers goes per head to a buffer, then is summed over the
    # heads of its group (float32, fixed order) unless every head has its own.
    dq = torch.empty_like(q) if q_acc else q.new_empty(Bsz, T, H, K, dtype=q.dtype if gq == 1 else fdt)
    dk_dtype = dk_dtype or k.dtype
    dk = torch.empty_like(k, dtype=dk_dtype) if k_acc else \
        k.new_empty(Bsz, T, H, K, dtype=dk_dtype if gk == 1 else fdt)
    BK = min(64, max(16, triton.next_power_of_2(K)))
    NK = triton.cdiv(K, BK)
    dg = q.new_empty(NK, Bsz, T, H, dtype=fdt)
    grid = (NK * (H // NG) * num_chunks,)
    chunk_bwd_dqkg_kernel[grid](
        q, k, v, v_scale, gc, hs, dhs, do, dq, dk, dg, cu_seqlens, chunk_indices, T, Bsz * T, scale,
        H=H, HQ=HQ, HK=HK, HV=HV, NG=NG, K=K, V=V, BT=BT, BK=BK,
        Q_ACC=q_acc, K_ACC=k_acc, HAS_VS=v_scale is not None,
        IS_VARLEN=cu_seqlens is not None, ACC=acc, DT=dot_dtype, PREC=precision, SPLIT=split,
    )
    if not q_acc and gq > 1:
        dq = dq.view(Bsz, T, HQ, gq, K).sum(3).to(q.dtype)
    if not k_acc and gk > 1:
        dk = dk.view(Bsz, T, HK, gk, K).sum(3).to(dk_dtype)
    dG = dg.sum(0) if NK > 1 else dg[0]
    return dq, dk, chunk_local_cumsum(dG, BT, reverse=True, cu_seqlens=cu_seqlens,
                                      chunk_indices=chunk_indices)


# dv: the bf16 Mamba-2 layout (v scale, D) and the GKA readout (float32 q and k split into bf16
# hi + lo, bf16 v, do and dv): a base table plus per-variant overrides.
_DV_TYPES = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "vs": "*fp32", "gc": "*fp32", "dhs": "*bf16",
             "do": "*bf16", "D": "*fp32", "dv": "*bf16", "dvs": "*fp32", "dD": "*fp32",
             "cu_seqlens": "*i32", "chunk_indices": "*i32", "scale": "fp32"}
for _tag, _types, _consts, _warps in (
    ("bf16,k128,v128,vs,d", {},
     {"HQ": 8, "HK": 8, "HV": 32, "HAS_VS": True, "HAS_D": True, "D_PER_V": True, "SPLIT": False}, 8),
    ("gka: fp32 q k, bf16 v do dv, bf16 hi+lo,k128,v128", {"q": "*fp32", "k": "*fp32", "dhs": "*fp32"},
     {"HQ": 32, "HK": 8, "HV": 8, "HAS_VS": False, "HAS_D": False, "D_PER_V": False, "SPLIT": True}, 4),
):
    register_aot(AotSpec(
        name=f"gla_bwd_dv[{_tag}]",
        kernel=chunk_bwd_dv_kernel,
        types={**_DV_TYPES, **_types},
        constexprs={"H": 32, "K": 128, "V": 128, "BT": 64, "BK": 64, "BV": 64, "IS_VARLEN": False,
                    "ACC": tl.float32, "DT": tl.bfloat16, "PREC": "ieee", **_consts},
        num_warps=_warps, num_stages=2,
    ))
for _name, _hq, _hk, _hv in (("mamba2", 8, 8, 32), ("gqa", 32, 8, 8)):
    register_aot(AotSpec(
        name=f"gla_bwd_dqkg[bf16,k128,v128,{_name}]",
        kernel=chunk_bwd_dqkg_kernel,
        types={"q": "*bf16", "k": "*bf16", "v": "*bf16", "vs": "*fp32", "gc": "*fp32",
               "hs": "*bf16", "dhs": "*bf16", "do": "*bf16", "dq": "*bf16", "dk": "*bf16",
               "dg": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32", "TT": "i64",
               "scale": "fp32"},
        constexprs={"H": 32, "HQ": _hq, "HK": _hk, "HV": _hv, "NG": 32 // min(_hq, _hk),
                    "K": 128, "V": 128, "BT": 64, "BK": 64, "BV": 32,
                    "Q_ACC": _hq == min(_hq, _hk), "K_ACC": _hk == min(_hq, _hk),
                    "HAS_VS": _name == "mamba2", "IS_VARLEN": True,
                    "ACC": tl.float32, "DT": tl.bfloat16, "PREC": "ieee", "SPLIT": False},
        num_warps=8, num_stages=2,
    ))
register_aot(AotSpec(
    name="gla_bwd_dqkg[gka: fp32 q k, bf16 v do, bf16 hi+lo,k128,v128]",
    kernel=chunk_bwd_dqkg_kernel,
    types={"q": "*fp32", "k": "*fp32", "v": "*bf16", "vs": "*fp32", "gc": "*fp32",
           "hs": "*fp32", "dhs": "*fp32", "do": "*bf16", "dq": "*fp32", "dk": "*fp32",
           "dg": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32", "TT": "i64",
           "scale": "fp32"},
    constexprs={"H": 32, "HQ": 32, "HK": 8, "HV": 8, "NG": 4, "K": 128, "V": 128, "BT": 64,
                "BK": 64, "BV": 32, "Q_ACC": False, "K_ACC": True, "HAS_VS": False,
                "IS_VARLEN": False, "ACC": tl.float32, "DT": tl.bfloat16, "PREC": "ieee", "SPLIT": True},
    num_warps=4, num_stages=2,
))
