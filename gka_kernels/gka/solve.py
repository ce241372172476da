"""Chebyshev ridge solve on all rows of a chunk at once (forward and adjoint).

Within chunk ``c`` (rows t, chunk-local log-decay cumsum ``G``, chunk-start state ``H_c``):

    H_t = exp(G_t) H_c + sum_{j <= t} M[t, j] k_j k_j^T,     M[t, j] = exp(G_t - G_j)  (j <= t)

so for the rows ``Y [BT, K]`` of one chunk (row t multiplies ``H_t``)

    rows(H_t y_t) = (exp(G) * Y) @ H_c^T  +  ((Y @ K^T) * M) @ K          (three dots per apply)

Frobenius norm of every ``H_t`` without forming it (three-term formula):

    ||H_t||^2 = exp(2 G_t) ||H_c||^2 + 2 exp(G_t) sum_j M[t,j] k_j^T H_c k_j
                + [((M @ (K K^T)^2) * M) 1]_t

The iteration runs on the normalized system ``(H_t / fro_t + a I) y_t = rhs_t`` (spectrum in
``[a, 1 + a]``), so its iterates stay O(1/a) whatever the scale of ``H`` (fp16-safe), then
``x_t = y_t / fro_t``. This is SPEC 5's iteration on ``[lam_t, lam_t + fro_t]`` rescaled, with
the data-independent schedule ``w_i = 1 / (1 - c4 w_{i-1})``, ``w_0 = 2``.

Forward kernel: fro, ``x = A^{-1} q`` and ``qm = q + alpha (x - q)``.
Backward kernel (implicit differentiation, ``A_t`` symmetric): ``dx = alpha dqm``,
``dqs = A^{-1} dx`` (same iteration, saved fro), the total ``dq = dqs + (1 - alpha) dqm``,
``dalpha = (x - q) . dqm``, and per row the scalars the key/decay gradients need:

    c_t    = bp_lambda * a (x_t . dqs_t) / fro_t                (lambda-path weight of H_t)
    dgp_t  = <dH_t, H_t> = -dqs_t . (H_t x_t) - c_t ||H_t||^2    (decay gradient, own-state part)
    beta_t = sum_{s >= t in chunk} c_s exp(G_s - G_t + G_s)

Tiles: grid (chunks, B*H); one program holds ``H_c`` [K, K], the key chunk [BT, K], ``M`` [BT, BT]
and the iterates [BT, K] on-chip for all ``num_iter`` iterations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype, next_power_of_2
from gka_kernels.gka._common import CHUNK, dot_precision, chebyshev_constants, chunk_coords, dot_dtype


@triton.jit
def _load_chunk(k, gcum, h, bos, i_t, rows, i_s, i_h, i_hk,
                H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                ACC: tl.constexpr):
    """Chunk operands: token offsets, row/col masks, G [BT], M [BT, BT], K [BT, BK] and H_c^T."""
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t = o_t < rows
    m_k = o_k < K
    tok = bos + i_t * BT + o_t
    b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
    m_tt = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_m = tl.exp(tl.where(m_tt, b_g[:, None] - b_g[None, :], float("-inf")))
    b_k = tl.load(k + (tok * HKV + i_hk)[:, None] * K + o_k[None, :],
                  mask=m_t[:, None] & m_k[None, :], other=0).to(ACC)
    # b_ht[i, j] = H_c[j, i], so that rows(Y @ b_ht) = (H_c y_t)^T.
    b_ht = tl.load(h + (i_s * H + i_h) * K * K + o_k[:, None] + o_k[None, :] * K,
                   mask=m_k[:, None] & m_k[None, :], other=0).to(ACC)
    return tok, o_t, o_k, m_t, m_k, b_g, b_m, b_k, b_ht


@triton.jit
def _apply_h(b_y, b_eg, b_m, b_kd, b_htd, ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """rows(H_t y_t) for the rows of ``b_y``: (exp(G) * Y) @ H_c^T + ((Y @ K^T) * M) @ K."""
    b_p = tl.dot((b_y * b_eg[:, None]).to(DT), b_htd, input_precision=PREC, out_dtype=ACC)
    b_s = tl.dot(b_y.to(DT), tl.trans(b_kd), input_precision=PREC, out_dtype=ACC) * b_m
    b_p += tl.dot(b_s.to(DT), b_kd, input_precision=PREC, out_dtype=ACC)
    return b_p


@triton.jit
def _chebyshev(b_rhs, b_inv, b_eg, b_m, b_kd, b_htd, ridge, step, c4, num_iter,
               ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``num_iter`` Chebyshev steps for ``(H_t / fro_t + a I) y_t = rhs_t`` on every row."""
    b_prev = tl.zeros_like(b_rhs)
    b_y = step * b_rhs
    w = tl.full([], 2.0, ACC)
    for _ in range(num_iter):
        w = 1.0 / (1.0 - c4 * w)
        b_r = _apply_h(b_y, b_eg, b_m, b_kd, b_htd, ACC, DT, PREC) * b_inv[:, None] + ridge * b_y - b_rhs
        b_next = b_y - (step * w) * b_r + (w - 1.0) * (b_y - b_prev)
        b_prev = b_y
        b_y = b_next
    return b_y


_CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (1, 2)]


@autotune(configs=_CONFIGS, key=["K", "H", "HAS_ALPHA", "IS_VARLEN"])
@triton.jit
def gka_solve_fwd_kernel(
    q, k, gcum, h, alpha, x, qm, fro, cu_seqlens, chunk_indices, T, NT,
    ridge, step, c4, num_iter,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    HAS_ALPHA: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FRO_PREC: tl.constexpr,
):
    """Grid (chunks, B*H): fro (three-term formula), x = (H_t + a fro_t I)^{-1} q_t by
    Chebyshev, qm = q + alpha (x - q)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    bos, i_t, rows, i_s = chunk_coords(i_c, i_b, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    tok, o_t, o_k, m_t, m_k, b_g, b_m, b_k, b_ht = _load_chunk(
        k, gcum, h, bos, i_t, rows, i_s, i_h, i_hk, H, HKV, K, BT, BK, ACC)
    b_kd = b_k.to(DT)
    b_htd = b_ht.to(DT)
    b_eg = tl.exp(b_g)

    # ||H_t||_F^2, three terms.
    hn2 = tl.sum(tl.sum(b_ht * b_ht, axis=1), axis=0)
    b_khk = tl.sum(tl.dot(b_kd, b_htd, input_precision=PREC, out_dtype=ACC) * b_k, axis=1)  # k^T H_c k
    b_kk = tl.dot(b_kd, tl.trans(b_kd), input_precision=PREC, out_dtype=ACC)
    b_f3 = tl.dot(b_m, b_kk * b_kk, input_precision=FRO_PREC, out_dtype=ACC) * b_m
    b_fro2 = b_eg * b_eg * hn2 + 2.0 * b_eg * tl.sum(b_m * b_khk[None, :], axis=1) + tl.sum(b_f3, axis=1)
    b_fro = tl.sqrt(tl.maximum(b_fro2, 0.0))
    b_inv = 1.0 / tl.where(b_fro > 0, b_fro, 1.0)

    m_tk = m_t[:, None] & m_k[None, :]
    o_row = (tok * H + i_h)[:, None] * K + o_k[None, :]
    b_q = tl.load(q + o_row, mask=m_tk, other=0).to(ACC)
    b_y = _chebyshev(b_q, b_inv, b_eg, b_m, b_kd, b_htd, ridge, step, c4, num_iter, ACC, DT, PREC)
    b_x = b_y * b_inv[:, None]
    tl.store(x + o_row, b_x.to(x.dtype.element_ty), mask=m_tk)
    if HAS_ALPHA:
        b_a = tl.load(alpha + tok * H + i_h, mask=m_t, other=0).to(ACC)
        b_x = b_q + b_a[:, None] * (b_x - b_q)
    tl.store(qm + o_row, b_x.to(qm.dtype.element_ty), mask=m_tk)
    tl.store(fro + tok * H + i_h, b_fro.to(fro.dtype.element_ty), mask=m_t)


@autotune(configs=_CONFIGS, key=["K", "H", "HAS_ALPHA", "IS_VARLEN"])
@triton.jit
def gka_solve_bwd_kernel(
    q, k, gcum, h, alpha, x, fro, dqm, dq, dqs, dalpha, lam_c, beta, dgp,
    cu_seqlens, chunk_indices, T, NT, ridge, bp_coef, step, c4, num_iter,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    HAS_ALPHA: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, B*H): adjoint solve dqs = A^{-1} (alpha dqm) and the per-row scalars
    c, beta, dgp of the key/decay gradients (see the module docstring)."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    bos, i_t, rows, i_s = chunk_coords(i_c, i_b, cu_seqlens, chunk_indices, T, NT, BT, IS_VARLEN)
    tok, o_t, o_k, m_t, m_k, b_g, b_m, b_k, b_ht = _load_chunk(
        k, gcum, h, bos, i_t, rows, i_s, i_h, i_hk, H, HKV, K, BT, BK, ACC)
    b_kd = b_k.to(DT)
    b_htd = b_ht.to(DT)
    b_eg = tl.exp(b_g)
    b_fro = tl.load(fro + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b_inv = 1.0 / tl.where(b_fro > 0, b_fro, 1.0)

    m_tk = m_t[:, None] & m_k[None, :]
    o_row = (tok * H + i_h)[:, None] * K + o_k[None, :]
    b_dqm = tl.load(dqm + o_row, mask=m_tk, other=0).to(ACC)
    b_x = tl.load(x + o_row, mask=m_tk, other=0).to(ACC)
    if HAS_ALPHA:
        b_a = tl.load(alpha + tok * H + i_h, mask=m_t, other=0).to(ACC)
        b_rhs = b_dqm * b_a[:, None]
    else:
        b_rhs = b_dqm
    b_dqs = _chebyshev(b_rhs, b_inv, b_eg, b_m, b_kd, b_htd, ridge, step, c4, num_iter, ACC, DT, PREC)
    b_dqs = b_dqs * b_inv[:, None]

    b_hx = _apply_h(b_x, b_eg, b_m, b_kd, b_htd, ACC, DT, PREC)
    b_c = bp_coef * tl.sum(b_x * b_dqs, axis=1) * b_inv
    b_dgp = -tl.sum(b_dqs * b_hx, axis=1) - b_c * b_fro * b_fro
    m_st = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]
    b_e = tl.exp(tl.where(m_st, 2.0 * b_g[None, :] - b_g[:, None], float("-inf")))
    b_beta = tl.sum(b_e * b_c[None, :], axis=1)

    tl.store(dqs + o_row, b_dqs.to(dqs.dtype.element_ty), mask=m_tk)
    if HAS_ALPHA:
        b_q = tl.load(q + o_row, mask=m_tk, other=0).to(ACC)
        tl.store(dalpha + tok * H + i_h, tl.sum((b_x - b_q) * b_dqm, axis=1).to(dalpha.dtype.element_ty),
                 mask=m_t)
        b_dqs += (1.0 - b_a[:, None]) * b_dqm
    tl.store(dq + o_row, b_dqs.to(dq.dtype.element_ty), mask=m_tk)
    o_s = tok * H + i_h
    tl.store(lam_c + o_s, b_c.to(lam_c.dtype.element_ty), mask=m_t)
    tl.store(beta + o_s, b_beta.to(beta.dtype.element_ty), mask=m_t)
    tl.store(dgp + o_s, b_dgp.to(dgp.dtype.element_ty), mask=m_t)


def _grid(NT: int, B: int, H: int, chunk_indices: torch.Tensor | None) -> tuple[int, int]:
    if chunk_indices is not None:
        return (chunk_indices.shape[0], H)
    return (NT, B * H)


def gka_solve_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    gcum: torch.Tensor,
    h: torch.Tensor,
    alpha: torch.Tensor | None,
    ridge_ratio: float,
    num_iter: int,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward solve. ``q [B,T,H,K]``, ``k [B,T,HKV,K]``, ``gcum [B,T,H]`` (chunk-local cumsum of
    ``gk``), ``h`` chunk-start states, ``alpha [B,T,H]`` or None.

    Returns ``x`` and ``qm`` (``[B,T,H,K]``, dtype of ``q``) and ``fro [B,T,H]`` (float32; float64
    for float64 inputs; the true norm, 0 where ``H_t = 0``)."""
    B, T, H, K = q.shape
    NT = triton.cdiv(T, CHUNK)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    x = torch.empty_like(q)
    qm = torch.empty_like(q)
    fro = q.new_empty(B, T, H, dtype=acc_dtype)
    step, c4 = chebyshev_constants(ridge_ratio)
    gka_solve_fwd_kernel[_grid(NT, B, H, chunk_indices)](
        q, k, gcum, h, alpha, x, qm, fro, cu_seqlens, chunk_indices, T, NT,
        ridge_ratio, step, c4, num_iter,
        H=H, HKV=k.shape[2], K=K, BT=CHUNK, BK=next_power_of_2(K),
        HAS_ALPHA=alpha is not None, IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(q.dtype), DT=dot_dtype(q.dtype), PREC=dot_precision(q.dtype),
        FRO_PREC="ieee" if q.dtype == torch.float64 else "tf32x3",
    )
    return x, qm, fro


def gka_solve_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    gcum: torch.Tensor,
    h: torch.Tensor,
    alpha: torch.Tensor | None,
    x: torch.Tensor,
    fro: torch.Tensor,
    dqm: torch.Tensor,
    ridge_ratio: float,
    num_iter: int,
    bp_lambda: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Adjoint solve. Returns ``dq`` (dtype of ``q``), ``dqs = A^{-1} alpha dqm`` ([B,T,H,K],
    float32/64), ``dalpha`` (float32/64 or None) and the per-row ``c``, ``beta``, ``dgp``
    ([B,T,H], float32/64)."""
    B, T, H, K = q.shape
    NT = triton.cdiv(T, CHUNK)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.empty_like(q)
    dqs = q.new_empty(B, T, H, K, dtype=acc_dtype)
    dalpha = q.new_empty(B, T, H, dtype=acc_dtype) if alpha is not None else None
    lam_c = q.new_empty(B, T, H, dtype=acc_dtype)
    beta = torch.empty_like(lam_c)
    dgp = torch.empty_like(lam_c)
    step, c4 = chebyshev_constants(ridge_ratio)
    gka_solve_bwd_kernel[_grid(NT, B, H, chunk_indices)](
        q, k, gcum, h, alpha, x, fro, dqm, dq, dqs, dalpha, lam_c, beta, dgp,
        cu_seqlens, chunk_indices, T, NT, ridge_ratio, ridge_ratio if bp_lambda else 0.0, step, c4, num_iter,
        H=H, HKV=k.shape[2], K=K, BT=CHUNK, BK=next_power_of_2(K),
        HAS_ALPHA=alpha is not None, IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(q.dtype), DT=dot_dtype(q.dtype), PREC=dot_precision(q.dtype),
    )
    return dq, dqs, dalpha, lam_c, beta, dgp


_AOT_TYPES = {"q": "*bf16", "k": "*bf16", "gcum": "*fp32", "h": "*bf16", "alpha": "*bf16",
              "x": "*bf16", "fro": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32",
              "T": "i32", "NT": "i32", "ridge": "fp32", "step": "fp32", "c4": "fp32", "num_iter": "i32"}
_AOT_CONST = {"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BK": 128, "HAS_ALPHA": True,
              "ACC": tl.float32, "DT": tl.bfloat16, "PREC": "ieee"}
for _w in (4, 8):
    register_aot(AotSpec(
        name=f"gka.solve_fwd[bf16,k128,w{_w}]",
        kernel=gka_solve_fwd_kernel,
        types={**_AOT_TYPES, "qm": "*bf16"},
        constexprs={**_AOT_CONST, "IS_VARLEN": False, "FRO_PREC": "tf32x3"},
        num_warps=_w, num_stages=1,
    ))
    register_aot(AotSpec(
        name=f"gka.solve_bwd[bf16,k128,w{_w}]",
        kernel=gka_solve_bwd_kernel,
        types={**_AOT_TYPES, "dqm": "*bf16", "dq": "*bf16", "dqs": "*fp32", "dalpha": "*fp32",
               "lam_c": "*fp32", "beta": "*fp32", "dgp": "*fp32", "bp_coef": "fp32"},
        constexprs={**_AOT_CONST, "IS_VARLEN": True},
        num_warps=_w, num_stages=1,
    ))
