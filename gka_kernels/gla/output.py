"""Forward output of chunked simple GLA, with the optional Mamba-2 extras fused in the epilogue.

For a chunk with start state ``h`` ([K, V]) and chunk-local cumulative log-decays ``G``:

    o = scale * ( exp(G) * (q @ h)  +  (tril(q @ k^T) * exp(G_i - G_j)) @ v_eff )
    v_eff = v * vs            (optional per-token, per-head row scale, HAS_VS)
    o += D * v                (optional skip connection, HAS_D; D per head or per (head, channel))
    y = o * silu(z)           (optional gate, HAS_Z; the pre-gate o is also stored for backward)

1-D grid over (value block, head group, chunk); one program computes ``[BT, BV]`` output tiles
of the heads that share a query and a key head (q @ k^T once for them), looping over ``K`` in
``BK`` slices for ``q @ h`` ([BT,BK]x[BK,BV]) and ``q @ k^T`` ([BT,BK]x[BK,BT]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.split_dot import dot_hi_lo
from gka_kernels.common.triton_utils import autotune
from gka_kernels.gla.locate import locate_chunk


@autotune(
    configs=[
        triton.Config({"BK": BK, "BV": BV}, num_warps=w, num_stages=s)
        for BK, BV, w, s in ((64, 64, 4, 2), (64, 64, 8, 3), (64, 128, 8, 2), (128, 64, 8, 2),
                             (128, 128, 8, 2))
    ],
    key=["H", "HQ", "HK", "HV", "NG", "K", "V", "BT", "HAS_VS", "HAS_D", "HAS_Z", "DT", "SPLIT"],
)
@triton.jit
def chunk_fwd_o_kernel(
    q, k, v, vs, gc, hs, D, z, o, ypre, cu_seqlens, chunk_indices, T, scale,
    H: tl.constexpr, HQ: tl.constexpr, HK: tl.constexpr, HV: tl.constexpr, NG: tl.constexpr,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_VS: tl.constexpr, HAS_D: tl.constexpr, D_PER_V: tl.constexpr, HAS_Z: tl.constexpr,
    IS_VARLEN: tl.constexpr, ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
    SPLIT: tl.constexpr,
):
    """q: [B,T,HQ,K], k: [B,T,HK,K], v: [B,T,HV,V], vs/gc: [B,T,H], hs: [NT_total,H,K,V],
    D: [H] or [H,V], z/o/ypre: [B,T,H,V]. One program serves NG consecutive heads that read the
    same query and key heads: q @ k^T is computed once for all of them."""
    # 1-D grid, value blocks fastest, then head groups, then chunks
    NV = tl.cdiv(V, BV)
    pid = tl.program_id(0)
    i_v = pid % NV
    i_hg = (pid // NV) % (H // NG)
    i_tg = (pid // (NV * (H // NG))).to(tl.int64)
    i_t, bos, seq_len = locate_chunk(pid // (NV * (H // NG)), cu_seqlens, chunk_indices, T, BT,
                                     IS_VARLEN)
    i_hq = (i_hg * NG) // (H // HQ)
    i_hk = (i_hg * NG) // (H // HK)

    # scalar 64-bit bases at the chunk's first row; 32-bit offsets inside the tile
    row0 = bos + i_t * BT
    r = tl.arange(0, BT)
    m_t = r < seq_len - i_t * BT
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]
    q_base = q + (row0 * HQ + i_hq) * K
    k_base = k + (row0 * HK + i_hk) * K
    causal = (r[:, None] >= r[None, :]) & m_t[:, None]

    qk = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range(tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        bq = tl.load(q_base + r[:, None] * (HQ * K) + o_k[None, :],
                     mask=m_t[:, None] & m_k[None, :], other=0).to(ACC)
        bkt = tl.load(k_base + r[None, :] * (HK * K) + o_k[:, None],
                      mask=m_k[:, None] & m_t[None, :], other=0).to(ACC)
        qk += dot_hi_lo(bq, bkt, SPLIT, False, DT, ACC, PREC)

    for i_g in range(NG):
        i_h = i_hg * NG + i_g
        h_base = hs + (i_tg * H + i_h) * K * V
        acc_o = tl.zeros([BT, BV], dtype=ACC)
        for i_k in range(tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            bq = tl.load(q_base + r[:, None] * (HQ * K) + o_k[None, :],
                         mask=m_t[:, None] & m_k[None, :], other=0).to(ACC)
            bh = tl.load(h_base + o_k[:, None] * V + o_v[None, :],
                         mask=m_k[:, None] & m_v[None, :], other=0).to(ACC)
            acc_o += dot_hi_lo(bq, bh, SPLIT, SPLIT, DT, ACC, PREC)
        G = tl.load(gc + row0 * H + i_h + r * H, mask=m_t, other=0).to(ACC)
        acc_o *= tl.exp(G)[:, None]
        acc_a = qk * tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
        bv = tl.load(v + (row0 * HV + i_h // (H // HV)) * V + r[:, None] * (HV * V) + o_v[None, :],
                     mask=m_tv, other=0).to(ACC)
        if HAS_VS:
            bs = tl.load(vs + row0 * H + i_h + r * H, mask=m_t, other=0).to(ACC)
            acc_a *= bs[None, :]
        acc_o += dot_hi_lo(acc_a, bv, SPLIT, False, DT, ACC, PREC)
        acc_o *= scale
        if HAS_D:
            if D_PER_V:
                bd = tl.load(D + i_h * V + o_v, mask=m_v, other=0).to(ACC)
                acc_o += bv * bd[None, :]
            else:
                acc_o += bv * tl.load(D + i_h).to(ACC)
        out_base = (row0 * H + i_h) * V
        out_off = r[:, None] * (H * V) + o_v[None, :]
        if HAS_Z:
            tl.store(ypre + out_base + out_off, acc_o.to(ypre.dtype.element_ty), mask=m_tv)
            bz = tl.load(z + out_base + out_off, mask=m_tv, other=0).to(ACC)
            acc_o *= bz * tl.sigmoid(bz)
        tl.store(o + out_base + out_off, acc_o.to(o.dtype.element_ty), mask=m_tv)


def shared_qk_heads(H: int, HQ: int, HK: int) -> int:
    """Size of the blocks of consecutive heads that read one query head and one key head."""
    gq, gk = H // HQ, H // HK
    return min(gq, gk) if max(gq, gk) % min(gq, gk) == 0 else 1


def chunk_fwd_o(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    hs: torch.Tensor,
    *,
    scale: float,
    BT: int,
    num_chunks: int,
    v_scale: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_indices: torch.Tensor | None = None,
    acc,
    dot_dtype,
    precision: str,
    split: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the output kernel; returns ``o [B,T,H,V]`` (v's dtype) and, when ``z`` is given,
    the pre-gate output (same shape and dtype). Operands may differ in dtype (each load is
    converted to the accumulation dtype, then to ``dot_dtype``). ``split``: queries, states and
    scores enter the dots as hi + lo (``common.split_dot``), keys and values once."""
    Bsz, T, HQ, K = q.shape
    H = gc.shape[2]
    HK, HV, V = k.shape[2], v.shape[2], v.shape[3]
    o = v.new_empty(Bsz, T, H, V)
    ypre = torch.empty_like(o) if z is not None else None
    NG = shared_qk_heads(H, HQ, HK)
    grid = lambda meta: (triton.cdiv(V, meta["BV"]) * (H // NG) * num_chunks,)  # noqa: E731
    chunk_fwd_o_kernel[grid](
        q, k, v, v_scale, gc, hs, D, z, o, ypre, cu_seqlens, chunk_indices, T, scale,
        H=H, HQ=HQ, HK=HK, HV=HV, NG=NG, K=K, V=V, BT=BT,
        HAS_VS=v_scale is not None, HAS_D=D is not None, D_PER_V=D is not None and D.dim() == 2,
        HAS_Z=z is not None, IS_VARLEN=cu_seqlens is not None,
        ACC=acc, DT=dot_dtype, PREC=precision, SPLIT=split,
    )
    return o, ypre


register_aot(AotSpec(
    name="gla_fwd_o[bf16,k128,v128,vs,d,z]",
    kernel=chunk_fwd_o_kernel,
    types={"q": "*bf16", "k": "*bf16", "v": "*bf16", "vs": "*fp32", "gc": "*fp32", "hs": "*bf16",
           "D": "*fp32", "z": "*bf16", "o": "*bf16", "ypre": "*bf16", "cu_seqlens": "*i32",
           "chunk_indices": "*i32", "scale": "fp32"},
    constexprs={"H": 32, "HQ": 8, "HK": 8, "HV": 32, "NG": 4, "K": 128, "V": 128, "BT": 64, "BK": 64,
                "BV": 64, "HAS_VS": True, "HAS_D": True, "D_PER_V": False, "HAS_Z": True,
                "IS_VARLEN": False, "ACC": tl.float32, "DT": tl.bfloat16, "PREC": "ieee", "SPLIT": False},
    num_warps=8, num_stages=2,
))
# Float32 queries and keys (plain float32 GLA, and the GKA readout, whose v and o are 16-bit).
_FP32_TYPES = {"q": "*fp32", "k": "*fp32", "v": "*fp32", "vs": "*fp32", "gc": "*fp32", "hs": "*fp32",
               "D": "*fp32", "z": "*fp32", "o": "*fp32", "ypre": "*fp32", "cu_seqlens": "*i32",
               "chunk_indices": "*i32", "scale": "fp32"}
for _name, _types, _consts, _warps in (
    ("gla_fwd_o[fp32,tf32x3,k100,v64]", {},
     {"H": 8, "HQ": 8, "HK": 2, "HV": 2, "K": 100, "V": 64, "DT": tl.float32, "PREC": "tf32x3",
      "SPLIT": False}, 8),
    ("gla_fwd_o[gka: fp32 q k, bf16 v o, bf16 hi+lo,k128,v128]", {"v": "*bf16", "o": "*bf16"},
     {"H": 32, "HQ": 32, "HK": 8, "HV": 8, "K": 128, "V": 128, "DT": tl.bfloat16, "PREC": "ieee",
      "SPLIT": True}, 4),
):
    register_aot(AotSpec(
        name=_name,
        kernel=chunk_fwd_o_kernel,
        types={**_FP32_TYPES, **_types},
        constexprs={"NG": 1, "BT": 64, "BK": 64, "BV": 64, "HAS_VS": False, "HAS_D": False,
                    "D_PER_V": False, "HAS_Z": False, "IS_VARLEN": False, "ACC": tl.float32,
                    **_consts},
        num_warps=_warps, num_stages=2,
    ))
