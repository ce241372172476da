"""Key and decay gradients of a chunk's own tokens and of its start state, one chunk per program
(backward).

With ``D_t = sum_{s >= t} exp(Gc_s - Gc_t) dH_s`` (``dH_s = -dqs_s x_s^T - c_s H_s``) the key
gradient through ``k_t k_t^T`` is ``dk_t = (D_t + D_t^T) k_t``. For row t of chunk c (``S_c`` the
symmetric adjoint ``D + D^T`` of the later chunks at the chunk's last token, ``H_c`` the
chunk-start state, ``G`` the chunk-local cumsum):

    dk_t = exp(G_last - G_t) S_c k_t                                             (later chunks)
           - sum_{s >= t} exp(G_s - G_t) [ (k_t . x_s) dqs_s + (k_t . dqs_s) x_s ] (-dqs x^T, this chunk)
           - 2 beta_t H_c k_t - 2 sum_j Mw[t, j] (k_t . k_j) k_j                   (-c H, this chunk)

    Mw[t, j] = exp((G_m - G_t) + (G_m - G_j)) b'_m,  m = max(t, j),
    b'_m = sum_{s >= m} c_s exp(2 (G_s - G_m))

(every exponent is <= 0; ``H_c`` symmetric, see :mod:`gka_kernels.gka.chunk_dh`). This kernel
writes every term but the first, which the reverse scan over chunks adds in place
(:mod:`gka_kernels.gka.chunk_dh`). The log-decay gradient w.r.t. the global cumsum ``Gc_t`` is

    dGc_t = <dH_t, H_t> - k_t^T D_t k_t = dgp_t - 0.5 k_t . dk_t

(here with this kernel's part of ``dk``; the scan adds the rest), and ``dgk`` is its reverse
cumulative sum over the sequence (done by the caller).

Tiles: grid (chunks, B*H); [BT, K] rows, [BT, BT] masks, and dk is produced in [BT, BJ] column
blocks by a (not unrolled) loop. Only the three [BT, BT] weight tiles stay live across that loop;
``x``, ``dqs``, ``k`` and ``H_c`` column blocks are read per block; the prologue forms each weight
tile right after loading what it needs.

Precision: ``x`` is ~20x ``q`` and its terms cancel in ``dGc``; with bf16 dot operands ``dgk`` was
off by 2-4e-2 (rounding ``x`` dominated). Every dot therefore takes ``DX`` operands (float16 for
16-bit inputs, :func:`gka_kernels.gka._common.solve_dot_dtype`) on normalized data: ``x`` and
``dqs`` rows are divided by their norms (folded into the fp32 weights), and each weight tile is
divided by its largest magnitude (:func:`tile_scale`), multiplied back after the dot; ``H_c``
enters as stored (``H_c / s_c`` in the dot dtype, :mod:`gka_kernels.gka.chunk_h`), ``s_c`` folded
into the row weights.
``k . x``, ``k . dqs`` and the ``x`` rows of the ``(k . dqs) x`` term take hi + lo operands
(:func:`split_hi_lo`): each is later projected onto keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype, next_power_of_2
from gka_kernels.gka._common import (
    CHUNK, chunk_program, dot_precision, row_norms, solve_dot_dtype, split_hi_lo, tile_scale,
)
from gka_kernels.gka.chunk_h import ChunkStates


# Not offered: BJ 32. With 8 warps Triton 3.6 compiles it (sm_90) into an out-of-bounds shared
# memory read in the [BT, BT] x [BT, BJ] dots (compute-sanitizer on an H200: illegal address); with
# 4 warps the GPU config sweep got a wrong dk (relative error 2.8). BJ 64 passes both.
@autotune(
    configs=[triton.Config({"BJ": 64}, num_warps=w, num_stages=1) for w in (8, 4)],
    key=["K", "H", "IS_VARLEN"],
)
@triton.jit
def chunk_gka_bwd_dk_kernel(
    k, x, dqs, gcum, lam_c, beta, h, h_scale, dgp, dk, dgc, cu_seqlens, chunk_indices, T, NT,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
    BJ: tl.constexpr, IS_VARLEN: tl.constexpr, ACC: tl.constexpr, DX: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (chunks, B*H): dk and dGc of one chunk's own tokens and start state (per query head).
    The [BT, BT] weight matrices are formed once; the output columns are produced in blocks of BJ
    to bound register use."""
    i_h, i_hk, i_s, tok, m_t = chunk_program(cu_seqlens, chunk_indices, T, NT, H, HKV, BT, IS_VARLEN)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    m_tt = m_t[:, None] & m_t[None, :]
    p_row = (tok * H + i_h) * K
    p_k = (tok * HKV + i_hk) * K
    p_state = (i_s * H + i_h) * K * K

    b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b_c = tl.load(lam_c + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b_beta = tl.load(beta + tok * H + i_h, mask=m_t, other=0).to(ACC)
    b_hbeta = -2.0 * b_beta * tl.load(h_scale + i_s * H + i_h).to(ACC)
    b_kd = tl.load(k + p_k[:, None] + o_k[None, :], mask=m_tk, other=0).to(ACC).to(DX)
    # Symmetric lambda-path weights 2 Mw[t, j] (k_t . k_j) (formed first: they need only k).
    m_up = (o_t[None, :] >= o_t[:, None]) & m_tt
    b_e2 = tl.exp(tl.where(m_up, 2.0 * (b_g[None, :] - b_g[:, None]), float("-inf")))
    b_bp = tl.sum(b_e2 * b_c[None, :], axis=1)
    m_lo = o_t[:, None] >= o_t[None, :]
    b_gm = tl.where(m_lo, b_g[:, None], b_g[None, :])
    b_bm = tl.where(m_lo, b_bp[:, None], b_bp[None, :])
    b_mw = tl.exp(tl.where(m_tt, 2.0 * b_gm - b_g[:, None] - b_g[None, :], float("-inf"))) * b_bm
    b_a3 = 2.0 * tl.dot(b_kd, tl.trans(b_kd), input_precision=PREC, out_dtype=ACC) * b_mw
    s_a3 = tile_scale(b_a3)
    b_a3 = (b_a3 / s_a3).to(DX)
    # k . x (x dies here), then k . dqs; both weighted below once both row norms are known.
    b_x = tl.load(x + p_row[:, None] + o_k[None, :], mask=m_tk, other=0).to(ACC)
    b_xn, b_xr = row_norms(b_x)
    b_xhi, b_xlo = split_hi_lo(b_x * b_xr[:, None], DX)
    b_a1 = tl.dot(b_kd, tl.trans(b_xhi), input_precision=PREC, out_dtype=ACC)
    if DX.primitive_bitwidth == 16:  # k . x is a small key-space part of x: x as hi + lo
        b_a1 = tl.dot(b_kd, tl.trans(b_xlo), b_a1, input_precision=PREC, out_dtype=ACC)
    b_dq = tl.load(dqs + p_row[:, None] + o_k[None, :], mask=m_tk, other=0).to(ACC)
    b_dn, b_dr = row_norms(b_dq)
    b_dqhi, b_dqlo = split_hi_lo(b_dq * b_dr[:, None], DX)
    b_a2 = tl.dot(b_kd, tl.trans(b_dqhi), input_precision=PREC, out_dtype=ACC)
    if DX.primitive_bitwidth == 16:  # the same for dqs, another solution of the ridge system
        b_a2 = tl.dot(b_kd, tl.trans(b_dqlo), b_a2, input_precision=PREC, out_dtype=ACC)
    # Rows t, columns s >= t: Mt[t, s] = exp(G_s - G_t), times |x_s| |dqs_s| (operands are unit rows).
    b_mt = tl.exp(tl.where(m_up, b_g[None, :] - b_g[:, None], float("-inf"))) * (b_xn * b_dn)[None, :]
    b_a1 = b_a1 * b_mt
    s_a1 = tile_scale(b_a1)
    b_a1 = (b_a1 / s_a1).to(DX)
    b_a2 = b_a2 * b_mt
    s_a2 = tile_scale(b_a2)
    b_a2 = (b_a2 / s_a2).to(DX)

    b_dgc = tl.load(dgp + tok * H + i_h, mask=m_t, other=0).to(ACC)
    for j0 in tl.range(0, BK, BJ, num_stages=1):
        o_j = j0 + tl.arange(0, BJ)
        m_j = o_j < K
        m_tj = m_t[:, None] & m_j[None, :]
        # The start state's part, -2 beta_t (k_t H_c)[j]: the stored H_c / s_c straight into the dot.
        b_hc = tl.load(h + p_state + o_k[:, None] * K + o_j[None, :], mask=m_k[:, None] & m_j[None, :],
                       other=0).to(DX)
        b_dk = b_hbeta[:, None] * tl.dot(b_kd, b_hc, input_precision=PREC, out_dtype=ACC)
        # This chunk's tokens.
        b_dqj = tl.load(dqs + p_row[:, None] + o_j[None, :], mask=m_tj, other=0).to(ACC)
        b_dk -= s_a1 * tl.dot(b_a1, (b_dqj * b_dr[:, None]).to(DX), input_precision=PREC, out_dtype=ACC)
        # dGc projects this term onto k_t: x_j as hi + lo (split_hi_lo) for a 16-bit DX.
        b_xj = tl.load(x + p_row[:, None] + o_j[None, :], mask=m_tj, other=0).to(ACC)
        b_xjh, b_xjl = split_hi_lo(b_xj * b_xr[:, None], DX)
        b_xa = tl.dot(b_a2, b_xjh, input_precision=PREC, out_dtype=ACC)
        if DX.primitive_bitwidth == 16:
            b_xa = tl.dot(b_a2, b_xjl, b_xa, input_precision=PREC, out_dtype=ACC)
        b_dk -= s_a2 * b_xa
        b_kj = tl.load(k + p_k[:, None] + o_j[None, :], mask=m_tj, other=0).to(ACC).to(DX)
        b_dk -= s_a3 * tl.dot(b_a3, b_kj, input_precision=PREC, out_dtype=ACC)
        tl.store(dk + p_row[:, None] + o_j[None, :], b_dk.to(dk.dtype.element_ty), mask=m_tj)
        # dGc with the keys as given (a separate read: nothing of k stays live across the dots).
        b_kf = tl.load(k + p_k[:, None] + o_j[None, :], mask=m_tj, other=0).to(ACC)
        b_dgc -= 0.5 * tl.sum(b_kf * b_dk, axis=1)
    tl.store(dgc + tok * H + i_h, b_dgc.to(dgc.dtype.element_ty), mask=m_t)


def chunk_gka_bwd_dk(
    k: torch.Tensor,
    x: torch.Tensor,
    dqs: torch.Tensor,
    gcum: torch.Tensor,
    lam_c: torch.Tensor,
    beta: torch.Tensor,
    states: ChunkStates,
    dgp: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    chunk_indices: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key and decay gradients of each chunk's own tokens and start state.

    Args:
        k: ``[B,T,HKV,K]``; x: ``[B,T,H,K]`` forward solution; dqs: ``[B,T,H,K]`` adjoint solution.
        gcum: chunk-local cumsum of ``gk`` ``[B,T,H]``; lam_c, beta, dgp: ``[B,T,H]`` from the
            solve backward.
        states: the chunk-start states of ``H`` (:func:`gka_kernels.gka.chunk_h.chunk_gka_fwd_h`).
        cu_seqlens, chunk_indices: varlen bookkeeping (``gla.chunk.ChunkPlan``) or None.

    Returns:
        ``dk [B,T,H,K]`` per query head and ``dGc [B,T,H]`` without the later chunks' part, which
        :func:`gka_kernels.gka.chunk_dh.chunk_gka_bwd_dh` adds to ``dk`` in place and returns for
        ``dGc`` (float32/64).
    """
    B, T, HKV, K = k.shape
    H = x.shape[2]
    NT = triton.cdiv(T, CHUNK)
    dk = torch.empty_like(x)
    dgc = torch.empty_like(lam_c)
    grid = (chunk_indices.shape[0], H) if chunk_indices is not None else (NT, B * H)
    chunk_gka_bwd_dk_kernel[grid](
        k, x, dqs, gcum, lam_c, beta, states.h, states.scale, dgp, dk, dgc, cu_seqlens, chunk_indices,
        T, NT, H=H, HKV=HKV, K=K, BT=CHUNK, BK=next_power_of_2(K), IS_VARLEN=cu_seqlens is not None,
        ACC=compute_dtype(k.dtype), DX=solve_dot_dtype(k.dtype), PREC=dot_precision(k.dtype),
    )
    return dk, dgc


for _bj, _w in ((64, 8), (64, 4)):
    register_aot(AotSpec(
        name=f"gka.chunk_bwd_dk[bf16,k128,{_bj},w{_w}]",
        kernel=chunk_gka_bwd_dk_kernel,
        types={"k": "*bf16", "x": "*fp32", "dqs": "*fp32", "gcum": "*fp32", "lam_c": "*fp32",
               "beta": "*fp32", "h": "*fp16", "h_scale": "*fp32", "dgp": "*fp32", "dk": "*fp32",
               "dgc": "*fp32",
               "cu_seqlens": "*i32", "chunk_indices": "*i32", "T": "i32", "NT": "i32"},
        constexprs={"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BK": 128, "BJ": _bj, "IS_VARLEN": False,
                    "ACC": tl.float32, "DX": tl.float16, "PREC": "ieee"},
        num_warps=_w, num_stages=1,
    ))
