"""Token-by-token Gated KalmaNet (forward only): ``fused_recurrent_gka``, for decode and short T.

One program per (sequence, query head, block of value columns) walks the tokens with both states
in registers (float32):

    H = exp(gk_t) H + k_t k_t^T ;  fro = ||H||_F (1 where 0)
    y = Chebyshev((H / fro + a I), q_t, num_iter) ;  x = y / fro     (as in ``gka.solve``)
    qm = q_t + alpha_t (x - q_t)
    U = exp(g_t) U + k_t v_t^T ;  o_t = scale U^T qm

Programs that share a (sequence, head) but own different value blocks repeat the (cheap, K-sized)
solve; the one owning the first block writes the final ``h_kk``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype, grid_bucket, next_power_of_2
from gka_kernels.gka._common import chebyshev_constants
from gka_kernels.gka.chunk import check_gka_inputs


@autotune(
    configs=[triton.Config({"BV": bv}, num_warps=w) for bv in (64, 32, 128) for w in (8, 4)],
    key=["K", "V", "H", "nh_bucket"],
)
@triton.jit
def fused_recurrent_gka_kernel(
    q, k, v, g, gk, alpha, o, h0_kk, h0_kv, ht_kk, ht_kv, cu_seqlens, T,
    scale, ridge, step, c4, num_iter, nh_bucket,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr,
    HAS_ALPHA: tl.constexpr, USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr,
    IS_VARLEN: tl.constexpr, ACC: tl.constexpr,
):
    """Grid (cdiv(V, BV), N*H). H: [BK, BK], U: [BK, BV] in registers; per token K-vectors. Every V
    tile repeats the whole solve, so splitting V pays only when N*H programs leave SMs idle: the
    autotune key has ``nh_bucket = grid_bucket(N * H)`` (not read in the body)."""
    i_v = tl.program_id(0)
    i_nh = tl.program_id(1)
    i_n = i_nh // H
    i_h = i_nh % H
    i_hk = i_h // (H // HKV)
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kk = m_k[:, None] & m_k[None, :]
    m_kv = m_k[:, None] & m_v[None, :]

    b_h = tl.zeros([BK, BK], dtype=ACC)
    b_u = tl.zeros([BK, BV], dtype=ACC)
    if USE_H0:
        b_h += tl.load(h0_kk + i_nh.to(tl.int64) * K * K + o_k[:, None] * K + o_k[None, :],
                       mask=m_kk, other=0).to(ACC)
        b_u += tl.load(h0_kv + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                       mask=m_kv, other=0).to(ACC)
    for t in range(bos, eos):
        b_k = tl.load(k + (t * HKV + i_hk) * K + o_k, mask=m_k, other=0).to(ACC)
        b_vv = tl.load(v + (t * HKV + i_hk) * V + o_v, mask=m_v, other=0).to(ACC)
        b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(ACC)
        b_gk = tl.load(gk + t * H + i_h).to(ACC)
        b_g = tl.load(g + t * H + i_h).to(ACC)
        b_h = b_h * tl.exp(b_gk) + b_k[:, None] * b_k[None, :]
        fro = tl.sqrt(tl.sum(tl.sum(b_h * b_h, axis=1), axis=0))
        inv = 1.0 / tl.where(fro > 0, fro, 1.0)
        # Normalized Chebyshev (as in gka.solve): iterate y and its increment d.
        b_y = step * b_q
        b_d = b_y
        w = tl.full([], 2.0, ACC)
        for _ in range(num_iter):
            w = 1.0 / (1.0 - c4 * w)
            b_r = tl.sum(b_h * b_y[None, :], axis=1) * inv + ridge * b_y - b_q
            b_d = (w - 1.0) * b_d - (step * w) * b_r
            b_y += b_d
        b_x = b_y * inv
        if HAS_ALPHA:
            b_a = tl.load(alpha + t * H + i_h).to(ACC)
            b_x = b_q + b_a * (b_x - b_q)
        b_u = b_u * tl.exp(b_g) + b_k[:, None] * b_vv[None, :]
        b_o = scale * tl.sum(b_u * b_x[:, None], axis=0)
        tl.store(o + (t * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
    if STORE_FINAL:
        tl.store(ht_kk + i_nh.to(tl.int64) * K * K + o_k[:, None] * K + o_k[None, :],
                 b_h.to(ht_kk.dtype.element_ty), mask=m_kk & (o_k[:, None] * 0 + i_v == 0))
        tl.store(ht_kv + i_nh.to(tl.int64) * K * V + o_k[:, None] * V + o_v[None, :],
                 b_u.to(ht_kv.dtype.element_ty), mask=m_kv)


class _ForwardOnly(torch.autograd.Function):
    """Makes backpropagating through ``fused_recurrent_gka`` fail loudly instead of silently."""

    @staticmethod
    def forward(ctx, o, *inputs):
        return o

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("fused_recurrent_gka is forward only; use chunk_gka for training")


def fused_recurrent_gka(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    gk: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    scale: float | None = None,
    ridge_ratio: float = 0.02,
    num_iter: int = 30,
    bp_lambda: bool = True,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Gated KalmaNet, token by token (decode and short sequences; forward only).

    Same arguments, math and returns as :func:`gka_kernels.gka.chunk_gka` (``bp_lambda`` is
    accepted for signature compatibility and has no effect). Both states stay in registers for the
    whole sequence, so ``K, V <= 128``. Backpropagating through the output raises.

    Args:
        q: ``[B, T, H, K]``; k: ``[B, T, HKV, K]``; v: ``[B, T, HKV, V]``; g, gk, alpha: ``[B, T, H]``.
        initial_state: ``(h_kk [N, H, K, K], h_kv [N, H, K, V])`` float32.

    Returns:
        ``o [B, T, H, V]`` (dtype of ``q``) and the final ``(h_kk, h_kv)`` (float32) or None.
    """
    dims, scale = check_gka_inputs(q, k, v, g, gk, alpha, scale, ridge_ratio, num_iter, bp_lambda,
                                   initial_state, output_final_state, cu_seqlens)
    B, T, H, K, V, N = dims.B, dims.T, dims.H, dims.K, dims.V, dims.N
    h0_kk, h0_kv = initial_state if initial_state is not None else (None, None)
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = q.new_empty(B, T, H, V)
    ht_kk = ht_kv = None
    if output_final_state:
        ht_kk = q.new_empty(N, H, K, K, dtype=state_dtype)
        ht_kv = q.new_empty(N, H, K, V, dtype=state_dtype)
    gk = g if gk is None else gk
    step, c4 = chebyshev_constants(float(ridge_ratio))

    def grid(meta):
        return (triton.cdiv(V, meta["BV"]), N * H)
    fused_recurrent_gka_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), gk.contiguous(),
        alpha.contiguous() if alpha is not None else None, o,
        h0_kk.contiguous() if h0_kk is not None else None,
        h0_kv.contiguous() if h0_kv is not None else None,
        ht_kk, ht_kv, cu_seqlens, T, scale, float(ridge_ratio), step, c4, num_iter, grid_bucket(N * H),
        H=H, HKV=dims.HKV, K=K, V=V, BK=next_power_of_2(K),
        HAS_ALPHA=alpha is not None, USE_H0=initial_state is not None, STORE_FINAL=output_final_state,
        IS_VARLEN=cu_seqlens is not None, ACC=compute_dtype(q.dtype),
    )
    tensors = [t for t in (q, k, v, g, gk, alpha, h0_kk, h0_kv) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        o = _ForwardOnly.apply(o, *tensors)
    return o, ((ht_kk, ht_kv) if output_final_state else None)


for _bv, _w in ((64, 8), (128, 8), (64, 4)):
    register_aot(AotSpec(
        name=f"gka.fused_recurrent[bf16,k128,bv{_bv},w{_w}]",
        kernel=fused_recurrent_gka_kernel,
        types={"q": "*bf16", "k": "*bf16", "v": "*bf16", "g": "*fp32", "gk": "*fp32", "alpha": "*bf16",
               "o": "*bf16", "h0_kk": "*fp32", "h0_kv": "*fp32", "ht_kk": "*fp32", "ht_kv": "*fp32",
               "cu_seqlens": "*i32", "T": "i32", "scale": "fp32", "ridge": "fp32", "step": "fp32",
               "c4": "fp32", "num_iter": "i32"},
        constexprs={"H": 32, "HKV": 8, "K": 128, "V": 128, "BK": 128, "BV": _bv, "HAS_ALPHA": True,
                    "USE_H0": True, "STORE_FINAL": True, "IS_VARLEN": True, "ACC": tl.float32},
        num_warps=_w,
    ))
