"""Chebyshev ridge solve on all rows of a chunk at once (forward and adjoint).

Within chunk ``c`` (rows t, chunk-local log-decay cumsum ``G``, chunk-start state ``H_c``):

    H_t = exp(G_t) H_c + sum_{j <= t} M[t, j] k_j k_j^T,     M[t, j] = exp(G_t - G_j)  (j <= t)

so for the rows ``Y [BT, K]`` of one chunk (row t multiplies ``H_t``)

    rows(H_t y_t) = (exp(G) * Y) @ H_c^T  +  ((Y @ K^T) * M) @ K          (three dots per apply)

Frobenius norm of every ``H_t`` without forming it (three-term formula):

    ||H_t||^2 = exp(2 G_t) ||H_c||^2 + 2 exp(G_t) sum_j M[t,j] k_j^T H_c k_j
                + [((M @ (K K^T)^2) * M) 1]_t

The iteration runs on the normalized system ``(H_t / fro_t + a I) y_t = rhs_t`` (spectrum in
``[a, 1 + a]``), then ``x_t = y_t / fro_t``.

Dot operands (``DT``; float16 for 16-bit inputs, see ``_common.solve_dot_dtype``) are kept in
float16 range whatever the data: ``H_c`` enters as stored, ``H_c / s_c`` with entries in
``[-1, 1]`` (:mod:`gka_kernels.gka.chunk_h`; the factor goes into the row scale ``exp(G) s_c``),
the right-hand side is scaled per row to norm ``min(1, 1024 a)``
(so ``||y_t|| <~ 1024``; the solve is linear, the scale is undone at the end), keys are unit-norm
(beta-scaled). This is SPEC 5's iteration on ``[lam_t, lam_t + fro_t]`` rescaled, with
the data-independent schedule ``w_i = 1 / (1 - c4 w_{i-1})``, ``w_0 = 2``, written in residual form
(:func:`_chebyshev`): the operator is applied to the increment ``d``, which is held and updated
in ``DT`` (float16 arithmetic for 16-bit inputs), and that same ``DT`` increment is added to ``y``
and subtracted (times ``A``) from the residual (both float32), so ``r`` stays the residual of ``y``:
the rounding of ``d`` only perturbs the step, and later steps correct it. Applying ``A`` to ``y``
instead needs ``y`` as hi + lo (two dots per product): ``y`` is mostly orthogonal to the keys (up to
``1 / a`` times its key-space part), so one rounding of ``y`` puts ``u |y|`` into ``k . y``.

Forward kernel: fro, ``x = A^{-1} q`` and ``qm = q + alpha (x - q)``.
Backward (implicit differentiation, ``A_t`` symmetric), two kernels: the adjoint solve
``dqs = A^{-1} dx``, ``dx = alpha dqm`` (same iteration, saved fro), then a row kernel
(:func:`gka_adjoint_rows_kernel`) for the total ``dq = dqs + (1 - alpha) dqm``,
``dalpha = (x - q) . dqm`` and per row the scalars the key/decay gradients need:

    c_t    = bp_lambda * a (x_t . dqs_t) / fro_t                (lambda-path weight of H_t)
    dgp_t  = <dH_t, H_t> = -dqs_t . (H_t x_t) - c_t ||H_t||^2    (decay gradient, own-state part)
             with H_t x_t = q_t - lam_t x_t (x_t taken as the exact solution, as everywhere in the
             implicit backward; 0 where H_t = 0). Forming H_t x_t with the chunk operands instead cost
             0.65 ms and, through register pressure, 30% more per iteration of the adjoint solve
             (train-4k, H200, bench/exp_gka_solve.py, run 19).
    beta_t = sum_{s >= t in chunk} c_s exp(G_s - G_t + G_s)

Tiles: grid (chunks, B*H); one program holds ``H_c`` [K, K], the key chunk [BT, K], ``M`` [BT, BT]
and the iterates [BT, K] on-chip for all ``num_iter`` iterations. Every [BT, K] row tensor is kept
as two column halves [BT, BK/2] (``_l``/``_h``) so that each half of ``H_t y_t`` is consumed by
its update before the other half is formed: one [BT, BK/2] fp32 accumulator is live instead of
a [BT, BK] one. Per iteration: 8 dots of [64, 64] x [64, 64] (4.2 MFLOP at K = 128). Register use
is the limit of this kernel: compiled for sm_90 (Triton 3.6, bf16, K = 128) the 4-warp program
reloads some values from local memory every iteration (168 B of stack in the forward, 216 B in
the adjoint solve), the 8-warp one nothing (0 B) but repeats the score dots on both warpgroups;
the autotuner chooses between them on the GPU. At two programs per SM the solves cannot hide the
latency of their loads and stores: at num_iter 10 on an H200 (ncu, session 17) the forward spent
42% of its stall samples before the loop (loads and the Frobenius norms) and the adjoint solve,
which then also formed ``dq`` and the row scalars, 46% after it, mostly waiting on loads and
spilled registers. That row work is therefore a separate kernel of 96 registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype, next_power_of_2
from gka_kernels.gka._common import (
    CHUNK, chebyshev_constants, chunk_program, dot_precision, load_rows, solve_dot_dtype, store_rows,
)
from gka_kernels.gka.chunk_h import ChunkStates


@triton.jit
def _load_chunk(k, gcum, h, h_scale, tok, m_t, i_s, i_h, i_hk,
                H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
                ACC: tl.constexpr, DT: tl.constexpr):
    """Chunk operands (``tok``, ``m_t`` from :func:`chunk_program`): G [BT], M [BT, BT],
    ``||H_c||_F^2``, the state's scale ``s_c`` and, in the dot dtype, the key chunk's column halves
    [BT, BH] and the four [BH, BH] blocks of ``(H_c / s_c)^T`` as stored
    (``ht_xy[i, j] = H_c[y j, x i] / s_c``, so that rows(Y @ H_c^T) = (H_c y_t)^T / s_c). The norm
    is that of the stored (rounded) state; the adjoint solve does not use it."""
    o_t = tl.arange(0, BT)
    o_l = tl.arange(0, BH)
    o_h = BH + o_l
    p_h = h + (i_s * H + i_h) * K * K
    h_s = tl.load(h_scale + i_s * H + i_h).to(ACC)
    b_ht_ll = _load_block_t(p_h, o_l, o_l, K, DT)
    b_ht_lh = _load_block_t(p_h, o_l, o_h, K, DT)
    b_ht_hl = _load_block_t(p_h, o_h, o_l, K, DT)
    b_ht_hh = _load_block_t(p_h, o_h, o_h, K, DT)
    hn2 = (_square_sum(b_ht_ll, ACC) + _square_sum(b_ht_lh, ACC) + _square_sum(b_ht_hl, ACC)
           + _square_sum(b_ht_hh, ACC)) * (h_s * h_s)
    b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
    m_tt = (o_t[:, None] >= o_t[None, :]) & m_t[:, None] & m_t[None, :]
    b_m = tl.exp(tl.where(m_tt, b_g[:, None] - b_g[None, :], float("-inf")))
    p_k = k + (tok * HKV + i_hk)[:, None] * K
    b_kl = tl.load(p_k + o_l[None, :], mask=m_t[:, None] & (o_l[None, :] < K), other=0).to(ACC).to(DT)
    b_kh = tl.load(p_k + o_h[None, :], mask=m_t[:, None] & (o_h[None, :] < K), other=0).to(ACC).to(DT)
    return b_g, b_m, hn2, h_s, b_kl, b_kh, b_ht_ll, b_ht_lh, b_ht_hl, b_ht_hh


@triton.jit
def _load_block_t(p_h, o_i, o_j, K: tl.constexpr, DT: tl.constexpr):
    """``b[i, j] = h[o_j[j], o_i[i]]`` (a block of the stored state's transpose) in ``DT``."""
    return tl.load(p_h + o_i[:, None] + o_j[None, :] * K,
                   mask=(o_i[:, None] < K) & (o_j[None, :] < K), other=0).to(DT)


@triton.jit
def _square_sum(b, ACC: tl.constexpr):
    """Sum of the squares of a 2-D tile, in ``ACC``."""
    b = b.to(ACC)
    return tl.sum(tl.sum(b * b, axis=1), axis=0)


@triton.jit
def _scores(b_al, b_ah, b_bl, b_bh, ACC: tl.constexpr, PREC: tl.constexpr):
    """A @ B^T for A, B given as column halves in the dot dtype."""
    b_s = tl.dot(b_al, tl.trans(b_bl), input_precision=PREC, out_dtype=ACC)
    return tl.dot(b_ah, tl.trans(b_bh), b_s, input_precision=PREC, out_dtype=ACC)


@triton.jit
def _step_half(b_r, b_dl, b_dh, b_ht_l, b_ht_h, b_sd, b_kc, b_eg, b_inv, ridge, b_dc, w, step,
               ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """One column half of a Chebyshev step for the rows ``d`` (column halves in the dot dtype):
    the residual ``r - A d`` with ``A d = (b_eg * (d @ Hs^T[:, half]) + S @ K[:, half]) / fro +
    a d[:, half]`` (``Hs = H_c / s_c`` as stored, ``b_eg = exp(G) s_c``, ``S = (d @ K^T) * M`` in the
    dot dtype, ``b_dc`` = ``d[:, half]``; two multiply-subtracts per element), and the half's next
    increment ``(w - 1) d + step w r`` computed in the dot dtype from ``r`` rounded to it (packed
    float16 arithmetic for 16-bit inputs; ``d`` is only a step direction, see :func:`_chebyshev`)."""
    b_p = tl.dot(b_dl, b_ht_l, input_precision=PREC, out_dtype=ACC)
    b_p = tl.dot(b_dh, b_ht_h, b_p, input_precision=PREC, out_dtype=ACC) * b_eg[:, None]
    b_p = tl.dot(b_sd, b_kc, b_p, input_precision=PREC, out_dtype=ACC)
    b_r = b_r - b_p * b_inv[:, None] - ridge * b_dc.to(ACC)
    return b_r, (w - 1.0).to(DT) * b_dc + (step * w).to(DT) * b_r.to(DT)


@triton.jit
def _chebyshev(b_rl, b_rh, b_inv, b_eg, b_m, b_kl, b_kh, b_ht_ll, b_ht_lh, b_ht_hl, b_ht_hh,
               ridge, step, c4, num_iter, ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr):
    """``num_iter`` Chebyshev steps for ``(H_t / fro_t + a I) y_t = rhs_t`` on every row; returns
    the column halves of ``y``. ``b_eg`` = exp(G) s_c (the blocks hold H_c / s_c).

    Residual form of ``d_i = (w_i - 1) d_{i-1} + step w_i r_{i-1}``, ``y_i = y_{i-1} + d_i``,
    ``r_i = r_{i-1} - A d_i`` from ``d_0 = y_0 = step rhs``, ``r_{-1} = rhs``: ``d`` is carried
    and updated in the dot dtype (every use, ``y`` included, sees the same rounded value), ``y``
    and ``r`` in the accumulation dtype. Rounding ``d`` (or its coefficients) changes only the
    step taken: ``y`` and ``r`` accumulate the same ``d``, so ``r = rhs - A y`` holds up to the
    float32 accumulation and later steps correct the perturbation (CPU, fp16 operands on bf16
    inputs: the same 5e-5 error against the float64 Chebyshev reference as the float32 update).
    Each column half of ``A d`` updates its half of ``r`` (and its next ``d``) before the other
    half is formed (one [BT, BK/2] accumulator live). The right-hand side is first scaled per row
    to norm ``min(1, 1024 a)`` (float16 range of the iterates, see the module docstring); ``y`` is
    scaled back on return."""
    b_rn = tl.sqrt(tl.sum(b_rl * b_rl, axis=1) + tl.sum(b_rh * b_rh, axis=1))
    b_rs = tl.where(b_rn > 0, b_rn / tl.minimum(1.0, 1024.0 * ridge), 1.0)
    b_rl = b_rl / b_rs[:, None]
    b_rh = b_rh / b_rs[:, None]
    b_md = b_m.to(DT)
    b_dl = (step * b_rl).to(DT)
    b_dh = (step * b_rh).to(DT)
    b_yl = b_dl.to(ACC)
    b_yh = b_dh.to(ACC)
    w = tl.full([], 2.0, ACC)
    for _ in range(num_iter):
        # S = (d @ K^T) * M in the dot dtype (a float16 product: M is not widened, so no float32
        # copy of it is live across the loop; one more rounding of S, 2^-11 relative, measured
        # without effect on the solve's error on the CPU).
        b_sd = _scores(b_dl, b_dh, b_kl, b_kh, ACC, PREC).to(DT) * b_md
        w = 1.0 / (1.0 - c4 * w)
        b_rl, b_nl = _step_half(b_rl, b_dl, b_dh, b_ht_ll, b_ht_hl, b_sd, b_kl, b_eg, b_inv, ridge, b_dl,
                                w, step, ACC, DT, PREC)
        b_yl += b_nl.to(ACC)
        b_rh, b_dh = _step_half(b_rh, b_dl, b_dh, b_ht_lh, b_ht_hh, b_sd, b_kh, b_eg, b_inv, ridge, b_dh,
                                w, step, ACC, DT, PREC)
        b_yh += b_dh.to(ACC)
        b_dl = b_nl
    return b_yl * b_rs[:, None], b_yh * b_rs[:, None]


@triton.jit
def _frobenius(b_eg, b_m, hn2, h_s, b_kl, b_kh, b_ht_ll, b_ht_lh, b_ht_hl, b_ht_hh, ACC: tl.constexpr,
               PREC: tl.constexpr, FRO_PREC: tl.constexpr):
    """``fro_t = ||H_t||_F`` of every row (``b_eg = exp(G)``; the other operands from
    :func:`_load_chunk`; the norm of the stored, rounded state):

        ||H_t||^2 = exp(2G) ||H_c||^2 + 2 exp(G) (M @ diag(K H_c K^T)) + rowsum((M @ (K K^T)^2) * M)
    """
    b_p = tl.dot(b_kl, b_ht_ll, input_precision=PREC, out_dtype=ACC)
    b_p = tl.dot(b_kh, b_ht_hl, b_p, input_precision=PREC, out_dtype=ACC)
    b_khk = tl.sum(b_p * b_kl.to(ACC), axis=1)
    b_p = tl.dot(b_kl, b_ht_lh, input_precision=PREC, out_dtype=ACC)
    b_p = tl.dot(b_kh, b_ht_hh, b_p, input_precision=PREC, out_dtype=ACC)
    b_khk += tl.sum(b_p * b_kh.to(ACC), axis=1)
    b_khk = b_khk * h_s
    b_kk = _scores(b_kl, b_kh, b_kl, b_kh, ACC, PREC)
    b_f3 = tl.dot(b_m, b_kk * b_kk, input_precision=FRO_PREC, out_dtype=ACC) * b_m
    b_fro2 = b_eg * b_eg * hn2 + 2.0 * b_eg * tl.sum(b_m * b_khk[None, :], axis=1) + tl.sum(b_f3, axis=1)
    return tl.sqrt(tl.maximum(b_fro2, 0.0))


# 4 warps = one warpgroup per 64-row chunk (every dot on one warpgroup, some register spills);
# 8 warps split the column halves over two warpgroups (few spills, but Triton replicates the
# score dots over both). Which wins is measured by the autotuner on the GPU.
_CONFIGS = [triton.Config({}, num_warps=w, num_stages=1) for w in (4, 8)]


@autotune(configs=_CONFIGS, key=["K", "H", "HAS_ALPHA", "IS_VARLEN"])
@triton.jit
def gka_solve_fwd_kernel(
    q, k, gcum, h, h_scale, alpha, x, qm, fro, cu_seqlens, chunk_indices, T, NT,
    ridge, step, c4, num_iter,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    HAS_ALPHA: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr, FRO_PREC: tl.constexpr,
):
    """Grid (chunks, B*H): fro (three-term formula), x = (H_t + a fro_t I)^{-1} q_t by
    Chebyshev, qm = q + alpha (x - q)."""
    BH: tl.constexpr = BK // 2
    i_h, i_hk, i_s, tok, m_t = chunk_program(cu_seqlens, chunk_indices, T, NT, H, HKV, BT, IS_VARLEN)
    b_g, b_m, hn2, h_s, b_kl, b_kh, b_ht_ll, b_ht_lh, b_ht_hl, b_ht_hh = _load_chunk(
        k, gcum, h, h_scale, tok, m_t, i_s, i_h, i_hk, H, HKV, K, BT, BH, ACC, DT)
    b_eg = tl.exp(b_g)
    b_fro = _frobenius(b_eg, b_m, hn2, h_s, b_kl, b_kh, b_ht_ll, b_ht_lh, b_ht_hl, b_ht_hh,
                       ACC, PREC, FRO_PREC)
    b_inv = 1.0 / tl.where(b_fro > 0, b_fro, 1.0)
    tl.store(fro + tok * H + i_h, b_fro.to(fro.dtype.element_ty), mask=m_t)

    o_l = tl.arange(0, BH)
    o_h = BH + o_l
    p_q = q + (tok * H + i_h) * K
    b_yl, b_yh = _chebyshev(load_rows(p_q, o_l, m_t, K, ACC), load_rows(p_q, o_h, m_t, K, ACC),
                            b_inv, b_eg * h_s, b_m, b_kl, b_kh, b_ht_ll, b_ht_lh, b_ht_hl,
                            b_ht_hh, ridge, step, c4, num_iter, ACC, DT, PREC)
    b_yl = b_yl * b_inv[:, None]
    b_yh = b_yh * b_inv[:, None]
    p_x = x + (tok * H + i_h) * K
    store_rows(p_x, o_l, m_t, b_yl, K)
    store_rows(p_x, o_h, m_t, b_yh, K)
    if HAS_ALPHA:
        b_a = tl.load(alpha + tok * H + i_h, mask=m_t, other=0).to(ACC)
        b_q = load_rows(p_q, o_l, m_t, K, ACC)
        b_yl = b_q + b_a[:, None] * (b_yl - b_q)
        b_q = load_rows(p_q, o_h, m_t, K, ACC)
        b_yh = b_q + b_a[:, None] * (b_yh - b_q)
    p_qm = qm + (tok * H + i_h) * K
    store_rows(p_qm, o_l, m_t, b_yl, K)
    store_rows(p_qm, o_h, m_t, b_yh, K)


@autotune(configs=_CONFIGS, key=["K", "H", "HAS_ALPHA", "IS_VARLEN"])
@triton.jit
def gka_solve_bwd_kernel(
    k, gcum, h, h_scale, alpha, fro, dqm, dqs, cu_seqlens, chunk_indices, T, NT, ridge, step, c4,
    num_iter,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    HAS_ALPHA: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, B*H): the adjoint solve dqs = A^{-1} (alpha dqm). The row work on ``dqs``
    (``dq``, ``dalpha`` and the per-row scalars) is :func:`gka_adjoint_rows_kernel`'s: here it took
    46% of the stall samples at num_iter 10, mostly waiting on loads and register spills (ncu, H200,
    session 17)."""
    BH: tl.constexpr = BK // 2
    i_h, i_hk, i_s, tok, m_t = chunk_program(cu_seqlens, chunk_indices, T, NT, H, HKV, BT, IS_VARLEN)
    b_g, b_m, hn2, h_s, b_kl, b_kh, b_ht_ll, b_ht_lh, b_ht_hl, b_ht_hh = _load_chunk(
        k, gcum, h, h_scale, tok, m_t, i_s, i_h, i_hk, H, HKV, K, BT, BH, ACC, DT)
    b_fro = tl.load(fro + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b_inv = 1.0 / tl.where(b_fro > 0, b_fro, 1.0)

    o_l = tl.arange(0, BH)
    o_h = BH + o_l
    p_row = (tok * H + i_h) * K
    if HAS_ALPHA:
        b_a = tl.load(alpha + tok * H + i_h, mask=m_t, other=0).to(ACC)
    else:
        b_a = tl.full([BT], 1.0, ACC)
    b_rl = load_rows(dqm + p_row, o_l, m_t, K, ACC) * b_a[:, None]
    b_rh = load_rows(dqm + p_row, o_h, m_t, K, ACC) * b_a[:, None]
    b_sl, b_sh = _chebyshev(b_rl, b_rh, b_inv, tl.exp(b_g) * h_s, b_m, b_kl, b_kh, b_ht_ll, b_ht_lh,
                            b_ht_hl, b_ht_hh, ridge, step, c4, num_iter, ACC, DT, PREC)
    store_rows(dqs + p_row, o_l, m_t, b_sl * b_inv[:, None], K)
    store_rows(dqs + p_row, o_h, m_t, b_sh * b_inv[:, None], K)


@autotune(configs=[triton.Config({"BC": bc}, num_warps=w, num_stages=2)
                   for bc, w in ((32, 4), (64, 4), (32, 8))],
          key=["K", "H", "HAS_ALPHA", "IS_VARLEN"])
@triton.jit
def gka_adjoint_rows_kernel(
    q, gcum, alpha, x, fro, dqm, dqs, dq, dalpha, lam_c, beta, dgp, cu_seqlens, chunk_indices, T, NT,
    ridge, bp_coef,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr,
    HAS_ALPHA: tl.constexpr, IS_VARLEN: tl.constexpr, ACC: tl.constexpr,
):
    """Grid (chunks, B*H): from the adjoint solution ``dqs``, the total ``dq = dqs + (1 - alpha) dqm``,
    ``dalpha = (x - q) . dqm`` and the per-row scalars ``c``, ``beta``, ``dgp`` of the key/decay
    gradients (see the module docstring). Rows [BT] of a chunk, columns in a loop over [BT, BC]
    blocks (row dots accumulated in [BT] vectors), so that few registers are live."""
    i_h, i_hk, i_s, tok, m_t = chunk_program(cu_seqlens, chunk_indices, T, NT, H, HKV, BT, IS_VARLEN)
    o_s = tok * H + i_h
    p_row = o_s * K
    if HAS_ALPHA:
        b_a = tl.load(alpha + o_s, mask=m_t, other=0).to(ACC)
    else:
        b_a = tl.full([BT], 1.0, ACC)
    b_sx = tl.zeros([BT], ACC)
    b_sq = tl.zeros([BT], ACC)
    b_da = tl.zeros([BT], ACC)
    for c0 in range(0, K, BC):
        o_c = c0 + tl.arange(0, BC)
        b_s = load_rows(dqs + p_row, o_c, m_t, K, ACC)
        b_x = load_rows(x + p_row, o_c, m_t, K, ACC)
        b_q = load_rows(q + p_row, o_c, m_t, K, ACC)
        b_g = load_rows(dqm + p_row, o_c, m_t, K, ACC)
        b_sx += tl.sum(b_x * b_s, axis=1)
        b_sq += tl.sum(b_q * b_s, axis=1)
        b_da += tl.sum((b_x - b_q) * b_g, axis=1)
        store_rows(dq + p_row, o_c, m_t, b_s + (1.0 - b_a[:, None]) * b_g, K)
    if HAS_ALPHA:
        tl.store(dalpha + o_s, b_da.to(dalpha.dtype.element_ty), mask=m_t)
    # x_t is treated as the exact solution of A_t x = q_t (SPEC 5), so H_t x_t = q_t - lam_t x_t
    # (0 where H_t = 0): no product with H_t is formed here.
    b_fro = tl.load(fro + o_s, mask=m_t, other=0).to(ACC)
    b_shx = tl.where(b_fro > 0, b_sq - ridge * b_fro * b_sx, 0.0)
    b_c = bp_coef * b_sx / tl.where(b_fro > 0, b_fro, 1.0)
    b_dgp = -b_shx - b_c * b_fro * b_fro
    o_t = tl.arange(0, BT)
    m_st = (o_t[None, :] >= o_t[:, None]) & m_t[:, None] & m_t[None, :]
    b_g = tl.load(gcum + o_s, mask=m_t, other=0).to(ACC)
    b_e = tl.exp(tl.where(m_st, 2.0 * b_g[None, :] - b_g[:, None], float("-inf")))
    tl.store(lam_c + o_s, b_c.to(lam_c.dtype.element_ty), mask=m_t)
    tl.store(beta + o_s, tl.sum(b_e * b_c[None, :], axis=1).to(beta.dtype.element_ty), mask=m_t)
    tl.store(dgp + o_s, b_dgp.to(dgp.dtype.element_ty), mask=m_t)


def _padded(K: int) -> int:
    """Padded key dim: a power of two >= 32, so that its halves are valid ``tl.dot`` sizes."""
    return max(32, next_power_of_2(K))


def _grid(NT: int, B: int, H: int, chunk_indices: torch.Tensor | None) -> tuple[int, int]:
    if chunk_indices is not None:
        return (chunk_indices.shape[0], H)
    return (NT, B * H)


def gka_solve_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    gcum: torch.Tensor,
    states: ChunkStates,
    alpha: torch.Tensor | None,
    ridge_ratio: float,
    num_iter: int,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward solve. ``q [B,T,H,K]``, ``k [B,T,HKV,K]``, ``gcum [B,T,H]`` (chunk-local cumsum of
    ``gk``), ``states`` the chunk-start states (:func:`chunk_gka_fwd_h`), ``alpha [B,T,H]`` or None.

    Returns ``x``, ``qm`` (``[B,T,H,K]``) and ``fro [B,T,H]``, all float32 (float64 for float64
    inputs; ``fro`` is the true norm, 0 where ``H_t = 0``)."""
    B, T, H, K = q.shape
    NT = triton.cdiv(T, CHUNK)
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    x = q.new_empty(B, T, H, K, dtype=acc_dtype)
    qm = torch.empty_like(x)
    fro = q.new_empty(B, T, H, dtype=acc_dtype)
    step, c4 = chebyshev_constants(ridge_ratio)
    gka_solve_fwd_kernel[_grid(NT, B, H, chunk_indices)](
        q, k, gcum, states.h, states.scale, alpha, x, qm, fro, cu_seqlens, chunk_indices, T, NT,
        ridge_ratio, step, c4, num_iter,
        H=H, HKV=k.shape[2], K=K, BT=CHUNK, BK=_padded(K),
        HAS_ALPHA=alpha is not None, IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(q.dtype), DT=solve_dot_dtype(q.dtype), PREC=dot_precision(q.dtype),
        FRO_PREC="ieee" if q.dtype == torch.float64 else "tf32x3",
    )
    return x, qm, fro


def gka_solve_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    gcum: torch.Tensor,
    states: ChunkStates,
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
    grid = _grid(NT, B, H, chunk_indices)
    common = dict(H=H, HKV=k.shape[2], K=K, BT=CHUNK, HAS_ALPHA=alpha is not None,
                  IS_VARLEN=cu_seqlens is not None, ACC=compute_dtype(q.dtype))
    gka_solve_bwd_kernel[grid](
        k, gcum, states.h, states.scale, alpha, fro, dqm, dqs, cu_seqlens, chunk_indices, T, NT,
        ridge_ratio, step, c4, num_iter, BK=_padded(K), DT=solve_dot_dtype(q.dtype),
        PREC=dot_precision(q.dtype), **common)
    gka_adjoint_rows_kernel[grid](
        q, gcum, alpha, x, fro, dqm, dqs, dq, dalpha, lam_c, beta, dgp, cu_seqlens, chunk_indices, T, NT,
        ridge_ratio, ridge_ratio if bp_lambda else 0.0, **common)
    return dq, dqs, dalpha, lam_c, beta, dgp


_AOT_TYPES = {"q": "*bf16", "k": "*bf16", "gcum": "*fp32", "h": "*fp16", "h_scale": "*fp32",
              "alpha": "*bf16",
              "x": "*fp32", "fro": "*fp32", "cu_seqlens": "*i32", "chunk_indices": "*i32",
              "T": "i32", "NT": "i32", "ridge": "fp32", "step": "fp32", "c4": "fp32", "num_iter": "i32"}
_AOT_CONST = {"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BK": 128, "HAS_ALPHA": True,
              "ACC": tl.float32, "DT": tl.float16, "PREC": "ieee"}
register_aot(AotSpec(
    name="gka.adjoint_rows[bf16,k128,varlen]",
    kernel=gka_adjoint_rows_kernel,
    types={**{n: _AOT_TYPES[n] for n in ("q", "gcum", "alpha", "x", "fro", "cu_seqlens", "chunk_indices",
                                         "T", "NT", "ridge")},
           "dqm": "*fp32", "dqs": "*fp32", "dq": "*bf16", "dalpha": "*fp32", "lam_c": "*fp32",
           "beta": "*fp32", "dgp": "*fp32", "bp_coef": "fp32"},
    constexprs={**{n: _AOT_CONST[n] for n in ("H", "HKV", "K", "BT", "HAS_ALPHA", "ACC")},
                "BC": 32, "IS_VARLEN": True},
    num_warps=4, num_stages=2,
))
for _w in (4, 8):
    register_aot(AotSpec(
        name=f"gka.solve_fwd[bf16,k128,w{_w}]",
        kernel=gka_solve_fwd_kernel,
        types={**_AOT_TYPES, "qm": "*fp32"},
        constexprs={**_AOT_CONST, "IS_VARLEN": False, "FRO_PREC": "tf32x3"},
        num_warps=_w, num_stages=1,
    ))
    register_aot(AotSpec(
        name=f"gka.solve_bwd[bf16,k128,w{_w}]",
        kernel=gka_solve_bwd_kernel,
        types={n: t for n, t in {**_AOT_TYPES, "dqm": "*fp32", "dqs": "*fp32"}.items()
               if n not in ("q", "x")},
        constexprs={**_AOT_CONST, "IS_VARLEN": True},
        num_warps=_w, num_stages=1,
    ))
