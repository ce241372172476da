"""``fused_recurrent_gated_delta_rule``: token-by-token gated delta rule, forward only.

One program owns a ``[K, BV]`` slice of one head's state (float32 registers) and walks the tokens
of one sequence::

    S <- exp(g_t) S;   v_new = beta_t (v_t - S^T k_t);   S <- S + k_t v_new^T;   o_t = scale S^T q_t

Grid ``(V / BV, N * H)``. Meant for decoding (``T == 1`` with an ``initial_state``) and short
prompts; long sequences should use ``chunk_gated_delta_rule``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype, grid_bucket, is_interpreter, next_power_of_2
from gka_kernels.gdn.inputs import check_inputs
from gka_kernels.gdn.l2norm import EPS


def _configs():
    sizes = (16,) if is_interpreter() else (32, 16, 64)
    return [triton.Config({"BV": bv}, num_warps=nw, num_stages=1) for bv in sizes for nw in (4, 2, 8)]


@autotune(configs=_configs(), key=["H", "HKV", "K", "V", "L2NORM", "nh_bucket"])
@triton.jit
def fused_recurrent_fwd_kernel(
    q, k, v, g, beta, o, h0, ht, cu_seqlens, T, scale, nh_bucket,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
    BV: tl.constexpr, IS_VARLEN: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    L2NORM: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr,
):
    """``q`` [B,T,H,K], ``k`` [B,T,HKV,K], ``v`` [B,T,HKV,V], ``g``/``beta`` [B,T,H], ``o`` [B,T,H,V],
    ``h0``/``ht`` [N,H,K,V]. Tiles: state ``[BK, BV]``, per token ``[BK]`` and ``[BV]`` vectors.
    ``nh_bucket = grid_bucket(N * H)`` is only an autotune key: the best BV depends on the grid size."""
    i_v, i_nh = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    i_hk = i_h // (H // HKV)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :]
    state = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        state += tl.load(h0 + p_kv, mask=m_kv, other=0).to(ACC)
    for t in range(seq_len):
        row = bos + t
        qt = tl.load(q + (row * H + i_h) * K + o_k, mask=m_k, other=0).to(ACC)
        kt = tl.load(k + (row * HKV + i_hk) * K + o_k, mask=m_k, other=0).to(ACC)
        vt = tl.load(v + (row * HKV + i_hk) * V + o_v, mask=m_v, other=0).to(ACC)
        gt = tl.load(g + row * H + i_h).to(ACC)
        bt = tl.load(beta + row * H + i_h).to(ACC)
        if L2NORM:
            qt = qt / tl.sqrt(tl.sum(qt * qt, axis=0) + EPS)
            kt = kt / tl.sqrt(tl.sum(kt * kt, axis=0) + EPS)
        state = state * tl.exp(gt)
        vn = (vt - tl.sum(kt[:, None] * state, axis=0)) * bt
        state += kt[:, None] * vn[None, :]
        ot = tl.sum(qt[:, None] * state, axis=0) * scale
        tl.store(o + (row * H + i_h) * V + o_v, ot.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(ht + p_kv, state.to(ht.dtype.element_ty), mask=m_kv)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule token by token (forward only; no autograd graph).

    Same arguments, shapes and results as ``chunk_gated_delta_rule`` (SPEC 3): ``q`` ``[B,T,H,K]``,
    ``k`` ``[B,T,HKV,K]``, ``v`` ``[B,T,HKV,V]``, ``g``/``beta`` ``[B,T,H]``, ``initial_state`` and
    the returned final state ``[N,H,K,V]`` float32 (``N = B`` or ``len(cu_seqlens) - 1``); ``o`` is
    ``[B,T,H,V]`` in the dtype of ``q``. Typical use is decoding: ``T == 1`` with the cached state.
    """
    dims, scale, initial_state, cu_seqlens = check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = dims.V
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.empty(B, T, H, V, device=q.device, dtype=q.dtype)
    ht = torch.empty(dims.N, H, K, V, device=q.device, dtype=state_dtype) if output_final_state else None
    grid = lambda meta: (triton.cdiv(V, meta["BV"]), dims.N * H)  # noqa: E731
    with torch.no_grad():
        fused_recurrent_fwd_kernel[grid](
            q, k, v, g, beta, o, initial_state, ht, cu_seqlens, T, scale, grid_bucket(dims.N * H),
            H=H, HKV=dims.HKV, K=K, V=V, BK=next_power_of_2(K), IS_VARLEN=cu_seqlens is not None,
            USE_H0=initial_state is not None, STORE_FINAL=bool(output_final_state),
            L2NORM=bool(use_qk_l2norm_in_kernel), EPS=EPS, ACC=compute_dtype(q.dtype),
        )
    return o, ht


register_aot(AotSpec(
    name="gdn.fused_recurrent[bf16,k128,bv32,varlen]",
    kernel=fused_recurrent_fwd_kernel,
    types={"q": "*bf16", "k": "*bf16", "v": "*bf16", "g": "*fp32", "beta": "*bf16", "o": "*bf16",
           "h0": "*fp32", "ht": "*fp32", "cu_seqlens": "*i32", "scale": "fp32"},
    constexprs={"H": 32, "HKV": 8, "K": 128, "V": 128, "BK": 128, "BV": 32, "IS_VARLEN": True,
                "USE_H0": True, "STORE_FINAL": True, "L2NORM": True, "EPS": EPS, "ACC": tl.float32},
    num_warps=4, num_stages=1,
))
