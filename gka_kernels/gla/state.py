"""Inter-chunk state pass of chunked simple GLA (forward states and backward state gradients).

One kernel serves both directions. For every chunk ``c`` of ``BT`` tokens (local cumulative
log-decays ``G``, last valid row ``L``) it stores the running ``[K, V]`` matrix ``S`` and then
folds the chunk in:

    forward  (REVERSE=False, a = k, b = v, W = exp(G_L - G)):        S <- exp(G_L) S + (W a)^T b
             stores the state at the start of every chunk; S starts at h0, ends at the final state.
    backward (REVERSE=True,  a = q, b = do, W = scale exp(G)):       S <- exp(G_L) S + (W a)^T b
             chunks in reverse order; stores dL/d(state at the end of every chunk); S starts at
             dL/d(final state) and ends at dL/d(h0).

1-D grid over (K block, V block, sequence * head): programs split the state into ``[BK, BV]``
tiles so that even ``B = 1`` launches enough programs; each runs the sequential loop over its
sequence's chunks with one ``[BK, BT] x [BT, BV]`` ``tl.dot`` per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.split_dot import dot_hi_lo
from gka_kernels.common.triton_utils import autotune


@autotune(
    configs=[
        triton.Config({"BK": BK, "BV": BV}, num_warps=w, num_stages=s)
        for BK, BV, w, s in ((64, 64, 4, 2), (64, 64, 8, 3), (32, 64, 4, 3), (64, 32, 4, 3),
                             (32, 32, 4, 2), (32, 32, 2, 3))
    ],
    key=["H", "HA", "HB", "K", "V", "BT", "NH", "REVERSE", "HAS_VS", "DT", "SPLIT"],
)
@triton.jit
def chunk_state_pass_kernel(
    a, b, vs, gc, h0, hs, ht, cu_seqlens, chunk_offsets, T, NH, scale,
    H: tl.constexpr, HA: tl.constexpr, HB: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    REVERSE: tl.constexpr, HAS_VS: tl.constexpr, USE_H0: tl.constexpr, STORE_HT: tl.constexpr,
    IS_VARLEN: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """a: [B,T,HA,K], b: [B,T,HB,V], vs (optional row scale of b): [B,T,H], gc: [B,T,H] chunk-local
    cumsum of g, h0/ht: [N,H,K,V] float32, hs: [NT_total,H,K,V]. NH (= N*H) only keys autotuning."""
    NKB = tl.cdiv(K, BK)
    NVB = tl.cdiv(V, BV)
    pid = tl.program_id(0)  # 1-D grid: state tiles fastest, then (sequence, head)
    i_k = pid % NKB
    i_v = (pid // NKB) % NVB
    i_nh = pid // (NKB * NVB)
    i_n = i_nh // H
    i_h = i_nh % H
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
        boh = i_n.to(tl.int64) * tl.cdiv(T, BT)
    NT = tl.cdiv(seq_len, BT)
    i_ha = i_h // (H // HA)
    i_hb = i_h // (H // HB)

    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    kv_off = o_k[:, None] * V + o_v[None, :]

    S = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        S += tl.load(h0 + i_nh.to(tl.int64) * K * V + kv_off, mask=m_kv, other=0).to(ACC)
    r = tl.arange(0, BT)
    for i in range(NT):
        if REVERSE:
            i_t = NT - 1 - i
        else:
            i_t = i
        tl.store(hs + ((boh + i_t) * H + i_h) * K * V + kv_off, S.to(hs.dtype.element_ty), mask=m_kv)

        # scalar 64-bit base at the chunk's first row; 32-bit offsets inside the tile
        row0 = bos + i_t * BT
        m_t = r < seq_len - i_t * BT
        last = tl.minimum(seq_len - i_t * BT, BT) - 1
        G = tl.load(gc + row0 * H + i_h + r * H, mask=m_t, other=0).to(ACC)
        G_last = tl.load(gc + (row0 + last) * H + i_h).to(ACC)
        # a^T tile [BK, BT] and b tile [BT, BV]
        at = tl.load(a + (row0 * HA + i_ha) * K + r[None, :] * (HA * K) + o_k[:, None],
                     mask=m_k[:, None] & m_t[None, :], other=0).to(ACC)
        bt = tl.load(b + (row0 * HB + i_hb) * V + r[:, None] * (HB * V) + o_v[None, :],
                     mask=m_t[:, None] & m_v[None, :], other=0).to(ACC)
        if REVERSE:
            w = tl.exp(G) * scale
        else:
            w = tl.exp(G_last - G)
        if HAS_VS:  # (W a)^T (vs b) = (W vs a)^T b
            w *= tl.load(vs + row0 * H + i_h + r * H, mask=m_t, other=0).to(ACC)
        w = tl.where(m_t, w, 0)
        S = S * tl.exp(G_last) + dot_hi_lo(at * w[None, :], bt, SPLIT, False, DT, ACC, PREC)
    if STORE_HT:
        tl.store(ht + i_nh.to(tl.int64) * K * V + kv_off, S.to(ht.dtype.element_ty), mask=m_kv)


def chunk_state_pass(
    a: torch.Tensor,
    b: torch.Tensor,
    gc: torch.Tensor,
    *,
    BT: int,
    reverse: bool,
    scale: float,
    state_in: torch.Tensor | None,
    store_final: bool,
    states_dtype: torch.dtype,
    v_scale: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_offsets: torch.Tensor | None = None,
    num_chunks: int,
    num_seqs: int,
    acc,
    dot_dtype,
    precision: str,
    split: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the state pass; returns (per-chunk states ``[num_chunks, H, K, V]`` in
    ``states_dtype``, final ``[N, H, K, V]`` float32 (float64 under gradcheck) or None)."""
    Bsz, T, HA, K = a.shape
    H = gc.shape[2]
    HB, V = b.shape[2], b.shape[3]
    hs = a.new_empty(num_chunks, H, K, V, dtype=states_dtype)
    ht = a.new_empty(num_seqs, H, K, V, dtype=torch.float64 if acc == tl.float64 else torch.float32) \
        if store_final else None
    NH = num_seqs * H
    grid = lambda meta: (triton.cdiv(K, meta["BK"]) * triton.cdiv(V, meta["BV"]) * NH,)  # noqa: E731
    chunk_state_pass_kernel[grid](
        a, b, v_scale, gc, state_in, hs, ht, cu_seqlens, chunk_offsets, T, NH, scale,
        H=H, HA=HA, HB=HB, K=K, V=V, BT=BT,
        REVERSE=reverse, HAS_VS=v_scale is not None, USE_H0=state_in is not None,
        STORE_HT=store_final, IS_VARLEN=cu_seqlens is not None,
        ACC=acc, DT=dot_dtype, PREC=precision, SPLIT=split,
    )
    return hs, ht


# The bf16 GLA / Mamba-2 layout, and the GKA readout (float32 queries and keys split into bf16
# hi + lo, bf16 values and output gradient: the reverse pass reads q and do).
_BF16_TYPES = {"a": "*bf16", "b": "*bf16", "vs": "*fp32", "gc": "*fp32", "h0": "*fp32", "hs": "*bf16",
               "ht": "*fp32", "cu_seqlens": "*i32", "chunk_offsets": "*i64", "scale": "fp32"}
for _rev in (False, True):
    for _tag, _types, _consts, _warps in (
        ("bf16", {}, {"HA": 8, "HB": 32, "BK": 64, "HAS_VS": not _rev, "USE_H0": True,
                      "STORE_HT": True, "IS_VARLEN": True, "SPLIT": False}, 8),
        ("gka: fp32 a, bf16 b, bf16 hi+lo", {"a": "*fp32", "hs": "*fp32"},
         {"HA": 32 if _rev else 8, "HB": 32 if _rev else 8, "BK": 32, "HAS_VS": False,
          "USE_H0": False, "STORE_HT": False, "IS_VARLEN": False, "SPLIT": True}, 4),
    ):
        register_aot(AotSpec(
            name=f"gla_state_pass[{'bwd' if _rev else 'fwd'},{_tag},k128,v128]",
            kernel=chunk_state_pass_kernel,
            types={**_BF16_TYPES, **_types},
            constexprs={"H": 32, "K": 128, "V": 128, "BT": 64, "BV": 64, "REVERSE": _rev,
                        "ACC": tl.float32, "DT": tl.bfloat16, "PREC": "ieee", **_consts},
            num_warps=_warps, num_stages=3,
        ))
