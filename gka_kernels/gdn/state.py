"""Sequential chunk-state passes of the gated delta rule (the only non-chunk-parallel work).

Forward, for each chunk ``c`` of a sequence, with ``G`` the chunk-local cumulative log-decay and
``G_L`` its value at the chunk's last token::

    h_c      -> stored (state entering chunk c)
    v_new    = u - w h_c                                     [BT, V]
    h_{c+1}  = exp(G_L) h_c + (exp(G_L - G) k)^T v_new

Backward, in reverse chunk order, with ``dh`` the gradient of the state leaving chunk ``c``::

    dh       -> stored
    dv_new   = dv_local + (exp(G_L - G) k) dh                 (dv_local = scale (q k^T * M)^T do)
    dh      <- exp(G_L) dh + scale (exp(G) q)^T do - w^T dv_new

Both are grid ``(V / BV, N * H)``: one program owns a ``[K, BV]`` slice of one head's state (the
recurrence never mixes value columns), so long single sequences still fill the GPU by splitting V.
Tiles: state ``[BK = pad(K), BV]`` in registers (float32), per-chunk loads ``[BT, BK]`` and ``[BT, BV]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, next_power_of_2
from gka_kernels.gdn.indexing import sequence_span

#: BV candidates: the first (used alone under the interpreter) is the smallest.
_BV = (16, 32, 64)


def _state_configs():
    return [triton.Config({"BV": bv}, num_warps=nw, num_stages=ns)
            for bv in _BV for nw in (4, 8) for ns in (2, 3)]


@autotune(configs=_state_configs(), key=["H", "HKV", "K", "V", "BT", "N"])
@triton.jit
def state_fwd_kernel(
    k, w, u, G, rk, h0, h, vn, ht, cu_seqlens, chunk_offsets, T, N,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, QK_NORM: tl.constexpr,
    USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Forward state pass. ``k`` [B,T,HKV,K] (times ``rk`` [B,T,HKV] with ``QK_NORM``),
    ``w`` [B,T,H,K], ``u``/``vn`` [B,T,H,V], ``G`` [B,T,H], ``h0``/``ht`` [N,H,K,V],
    ``h`` [chunks,H,K,V]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, NT, boc = sequence_span(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    # addresses: a 64-bit scalar base, then 32-bit row and column offsets
    head = i_nh.to(tl.int64) * K * V
    state = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        state += tl.load(h0 + head + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0).to(ACC)
    for i_t in range(NT):
        tok = bos + i_t * BT
        tl.store(h + ((boc + i_t) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                 state.to(h.dtype.element_ty), mask=m_kv)
        m_t = i_t * BT + o_i < seq_len
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        wb = tl.load(w + (tok * H * K + i_h * K) + o_i[:, None] * (H * K) + o_k[None, :], mask=m_tk,
                     other=0).to(DOT)
        p_tv = tok * H * V + i_h * V
        ub = tl.load(u + p_tv + o_i[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0).to(ACC)
        vnb = ub - tl.dot(wb, state.to(DOT), out_dtype=ACC)
        tl.store(vn + p_tv + o_i[:, None] * (H * V) + o_v[None, :], vnb.to(vn.dtype.element_ty), mask=m_tv)
        last = tl.minimum(seq_len - i_t * BT, BT) - 1
        g_last = tl.load(G + (tok + last) * H + i_h).to(ACC)
        gc = tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
        kb = tl.load(k + (tok * HKV * K + i_hk * K) + o_i[:, None] * (HKV * K) + o_k[None, :], mask=m_tk,
                     other=0).to(DOT)
        # (exp(G_L - G) k)^T v_new, with the per-token factors applied to the smaller v_new tile
        f = tl.exp(tl.where(m_t, g_last - gc, float("-inf")))
        if QK_NORM:
            f *= tl.load(rk + (tok + o_i) * HKV + i_hk, mask=m_t, other=0).to(ACC)
        vd = vnb.to(DOT).to(ACC) * f[:, None]
        state = state * tl.exp(g_last) + tl.dot(tl.trans(kb), vd.to(DOT), out_dtype=ACC)
    if STORE_FINAL:
        tl.store(ht + head + o_k[:, None] * V + o_v[None, :], state.to(ht.dtype.element_ty), mask=m_kv)


@autotune(configs=_state_configs(), key=["H", "HKV", "K", "V", "BT", "N"])
@triton.jit
def state_bwd_kernel(
    q, k, w, G, rq, rk, do, dvl, dht, dh, dvn, dh0, cu_seqlens, chunk_offsets, T, N, scale,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, QK_NORM: tl.constexpr,
    USE_DHT: tl.constexpr, STORE_DH0: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Backward state pass (reverse chunk order). ``q`` [B,T,H,K], ``k`` [B,T,HKV,K] (times
    ``rq`` [B,T,H] / ``rk`` [B,T,HKV] with ``QK_NORM``), ``w`` [B,T,H,K], ``do``/``dvl``/``dvn``
    [B,T,H,V], ``dht``/``dh0`` [N,H,K,V], ``dh`` [chunks,H,K,V]."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, NT, boc = sequence_span(i_n, T, cu_seqlens, chunk_offsets, BT, IS_VARLEN)
    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
    head = i_nh.to(tl.int64) * K * V
    dstate = tl.zeros([BK, BV], dtype=ACC)
    if USE_DHT:
        dstate += tl.load(dht + head + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0).to(ACC)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tok = bos + i_t * BT
        tl.store(dh + ((boc + i_t) * H + i_h) * K * V + o_k[:, None] * V + o_v[None, :],
                 dstate.to(dh.dtype.element_ty), mask=m_kv)
        m_t = i_t * BT + o_i < seq_len
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        last = tl.minimum(seq_len - i_t * BT, BT) - 1
        g_last = tl.load(G + (tok + last) * H + i_h).to(ACC)
        gc = tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
        kb = tl.load(k + (tok * HKV * K + i_hk * K) + o_i[:, None] * (HKV * K) + o_k[None, :], mask=m_tk,
                     other=0).to(DOT)
        # per-token factors scale the [BT, BV] tiles rather than the [BT, K] key/query tiles
        fk = tl.exp(tl.where(m_t, g_last - gc, float("-inf")))
        fq = scale * tl.exp(tl.where(m_t, gc, float("-inf")))
        if QK_NORM:
            fk *= tl.load(rk + (tok + o_i) * HKV + i_hk, mask=m_t, other=0).to(ACC)
            fq *= tl.load(rq + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
        p_tv = tok * H * V + i_h * V
        dvnb = tl.dot(kb, dstate.to(DOT), out_dtype=ACC) * fk[:, None]
        dvnb += tl.load(dvl + p_tv + o_i[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0).to(ACC)
        dvnb = dvnb.to(dvn.dtype.element_ty)
        tl.store(dvn + p_tv + o_i[:, None] * (H * V) + o_v[None, :], dvnb, mask=m_tv)
        p_tk = tok * H * K + i_h * K
        qb = tl.load(q + p_tk + o_i[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0).to(DOT)
        dod = tl.load(do + p_tv + o_i[:, None] * (H * V) + o_v[None, :], mask=m_tv, other=0).to(ACC) * fq[:, None]
        wb = tl.load(w + p_tk + o_i[:, None] * (H * K) + o_k[None, :], mask=m_tk, other=0).to(DOT)
        dstate = dstate * tl.exp(g_last)
        dstate += tl.dot(tl.trans(qb), dod.to(DOT), out_dtype=ACC)
        dstate -= tl.dot(tl.trans(wb), dvnb.to(DOT), out_dtype=ACC)
    if STORE_DH0:
        tl.store(dh0 + head + o_k[:, None] * V + o_v[None, :], dstate.to(dh0.dtype.element_ty), mask=m_kv)


def state_forward(k, w, u, G, rk, initial_state, output_final_state, cu_seqlens, chunk_offsets, n_chunks,
                  chunk_size, N, state_dtype, acc, dot):
    """Returns ``h`` [n_chunks,H,K,V] (dtype of ``w``), ``v_new`` [B,T,H,V] (dtype of ``u``) and the
    final state [N,H,K,V] (``state_dtype``) or None."""
    B, T, HKV, K = k.shape
    H, V = u.shape[2], u.shape[3]
    h = torch.empty(n_chunks, H, K, V, device=k.device, dtype=w.dtype)
    vn = torch.empty_like(u)
    ht = torch.empty(N, H, K, V, device=k.device, dtype=state_dtype) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)  # noqa: E731
    state_fwd_kernel[grid](
        k, w, u, G, rk, initial_state, h, vn, ht, cu_seqlens, chunk_offsets, T, N,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=next_power_of_2(K), IS_VARLEN=cu_seqlens is not None,
        QK_NORM=rk is not None, USE_H0=initial_state is not None, STORE_FINAL=output_final_state, ACC=acc, DOT=dot,
    )
    return h, vn, ht


def state_backward(q, k, w, G, rq, rk, do, dvl, dht, initial_state, need_dh0, cu_seqlens, chunk_offsets,
                   n_chunks, chunk_size, N, scale, acc, dot):
    """Returns ``dh`` [n_chunks,H,K,V] (gradient of each chunk's outgoing state, dtype of ``w``),
    ``dv_new`` [B,T,H,V] (dtype of ``dvl``) and the gradient of the initial state (or None)."""
    B, T, H, K = q.shape
    HKV = k.shape[2]
    V = do.shape[-1]
    dh = torch.empty(n_chunks, H, K, V, device=q.device, dtype=w.dtype)
    dvn = torch.empty_like(dvl)
    dh0 = torch.empty_like(initial_state) if need_dh0 else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), N * H)  # noqa: E731
    state_bwd_kernel[grid](
        q, k, w, G, rq, rk, do, dvl, dht, dh, dvn, dh0, cu_seqlens, chunk_offsets, T, N, scale,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=next_power_of_2(K), IS_VARLEN=cu_seqlens is not None,
        QK_NORM=rq is not None, USE_DHT=dht is not None, STORE_DH0=need_dh0, ACC=acc, DOT=dot,
    )
    return dh, dvn, dh0


_AOT_SHAPES = {"H": 32, "HKV": 8, "K": 128, "V": 128, "BT": 64, "BK": 128, "ACC": tl.float32,
               "DOT": tl.bfloat16}
for _bv in (32,):
    register_aot(AotSpec(
        name=f"gdn.state_fwd[bf16,k128,bv{_bv}]",
        kernel=state_fwd_kernel,
        types={"k": "*bf16", "w": "*bf16", "u": "*bf16", "G": "*fp32", "rk": "*fp32", "h0": "*fp32", "h": "*bf16",
               "vn": "*bf16", "ht": "*fp32", "cu_seqlens": "*i32", "chunk_offsets": "*i64"},
        constexprs={**_AOT_SHAPES, "BV": _bv, "IS_VARLEN": True, "QK_NORM": True, "USE_H0": True,
                    "STORE_FINAL": True},
        num_warps=4, num_stages=2,
    ))
    register_aot(AotSpec(
        name=f"gdn.state_bwd[bf16,k128,bv{_bv}]",
        kernel=state_bwd_kernel,
        types={"q": "*bf16", "k": "*bf16", "w": "*bf16", "G": "*fp32", "rq": "*fp32", "rk": "*fp32",
               "do": "*bf16", "dvl": "*bf16",
               "dht": "*fp32", "dh": "*bf16", "dvn": "*bf16", "dh0": "*fp32", "cu_seqlens": "*i32",
               "chunk_offsets": "*i64", "scale": "fp32"},
        constexprs={**_AOT_SHAPES, "BV": _bv, "IS_VARLEN": False, "QK_NORM": True, "USE_DHT": True,
                    "STORE_DH0": True},
        num_warps=4, num_stages=2,
    ))
