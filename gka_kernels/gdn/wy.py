"""The WY/UT representation of one chunk of the gated delta rule, forward and backward.

Within a chunk of ``BT`` tokens with chunk-local cumulative log-decays ``G`` (``G_i = sum_{s<=i} g_s``)::

    A  = strictly_lower(beta_i (k_i . k_j) exp(G_i - G_j))     [BT, BT]
    Tm = (I + A)^-1                                              (unit lower triangular)
    w  = Tm (beta exp(G) k) = (Tm diag(beta exp(G))) k           [BT, K]
    u  = Tm (beta v)        = (Tm diag(beta)) v                  [BT, V]

so that the chunk's delta-rule residuals are ``v_new = u - w h`` for the state ``h`` entering it.
``Tm`` is computed in float32 registers: the four ``BC = BT / 4`` diagonal sub-blocks are inverted
together (``D``, products of powers: exact float32), then ``Tm = (I - N)(I + N^2) D`` with ``N = D A_off`` (the
blocks below the diagonal; ``N^4 = 0``), which is block back-substitution written as four products.
The per-token factors (and, with ``QK_NORM``, the inverse key norms ``rk``: ``k`` stands for
``rk * k``) scale the columns of ``Tm`` rather than the keys/values, so the raw 16-bit inputs feed
the tensor cores unrounded. The backward is in ``wy_backward.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune
from gka_kernels.gdn.indexing import block_size, chunk_span


@triton.jit
def diagonal_block_inverses(a, BT: tl.constexpr, ACC: tl.constexpr):
    """``D`` [4, BC, BC] (``BC = BT / 4``): ``D[I] = (I + L_I)^-1`` for the four diagonal blocks
    ``L_I`` of the strictly lower ``a`` [BT, BT]. ``L_I`` is nilpotent (``L_I^BC = 0``), so
    ``(I + L)^-1 = (I - L)(I + L^2)(I + L^4) ... (I + L^(BC/2))``: log2(BC) - 1 squarings and as many
    products, batched ``[4, BC, BC]`` dots in exact float32 (``ieee``)."""
    BC: tl.constexpr = BT // 4
    o_b = tl.arange(0, 4)
    o_c = tl.arange(0, BC)
    # diag[I, i, j] = A[BC I + i, BC I + j], from the [4, BC, 4, BC] view of a
    blocks = tl.reshape(a, (4, BC, 4, BC))
    diag = tl.sum(tl.where((o_b[:, None, None, None] == o_b[None, None, :, None]), blocks, 0.0), axis=2)
    eye = tl.where((o_c[:, None] == o_c[None, :])[None, :, :], 1.0, 0.0) + tl.zeros([4, BC, BC], dtype=ACC)
    d = eye - diag
    power = diag
    for s in tl.static_range(4):  # BC <= 32
        if (2 << s) < BC:
            power = tl.dot(power, power, out_dtype=ACC, input_precision="ieee")
            d = tl.dot(d, eye + power, out_dtype=ACC, input_precision="ieee")
    return d


@triton.jit
def unit_lower_inverse(a, BT: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr):
    """``(I + a)^-1`` [BT, BT] for a strictly lower ``a``: with ``D`` the diagonal block inverses and
    ``N = D A_off`` (``A_off`` = the blocks below the diagonal, ``N^4 = 0``),
    ``(I + a)^-1 = (I - N)(I + N^2) D``. Block-diagonal products are batched ``[4, ., .]`` dots on
    reshaped tiles; the others are ``[BT, BT]`` dots at ``PREC``."""
    BC: tl.constexpr = BT // 4
    d = diagonal_block_inverses(a, BT, ACC)
    o_i = tl.arange(0, BT)
    a_off = tl.where(o_i[:, None] // BC > o_i[None, :] // BC, a, 0.0)
    n = tl.reshape(tl.dot(d, tl.reshape(a_off, (4, BC, BT)), out_dtype=ACC, input_precision=PREC), (BT, BT))
    eye = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0).to(ACC)
    n2 = tl.dot(n, n, out_dtype=ACC, input_precision=PREC)
    m = tl.dot(eye - n, eye + n2, out_dtype=ACC, input_precision=PREC)
    # m D: column block J of the result is m[:, J] D[J]
    m_cols = tl.permute(tl.reshape(m, (BT, 4, BC)), (1, 0, 2))  # [4, BT, BC]
    return tl.reshape(tl.permute(tl.dot(m_cols, d, out_dtype=ACC, input_precision=PREC), (1, 0, 2)), (BT, BT))


@autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)],
    key=["H", "HKV", "K", "V", "BT", "QK_NORM", "TM_MODE"],
)
@triton.jit
def wy_fwd_kernel(
    k, v, beta, G, rk, Tm, w, u, cu_seqlens, chunk_indices, T,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, IS_VARLEN: tl.constexpr, QK_NORM: tl.constexpr,
    TM_MODE: tl.constexpr, PREC: tl.constexpr, ACC: tl.constexpr, DOT: tl.constexpr,
):
    """Tm = (I + A)^-1, w = Tm (beta exp(G) k), u = Tm (beta v) for one chunk of one query head.

    Grid (chunks, B*H). ``k``/``v`` [B,T,HKV,*], ``beta``/``G`` [B,T,H], ``rk`` [B,T,HKV]
    (inverse key norms, read with ``QK_NORM``), ``w`` [B,T,H,K], ``u`` [B,T,H,V], ``Tm`` [B,T,H,BT]
    (rows of ``Tm``, upper triangle 0). ``TM_MODE``: 0 computes ``Tm`` in registers, 1 also stores
    it, 2 loads a stored ``Tm`` instead of computing it (``Tm`` unused with 0).

    1. ``A`` [BT, BT] from ``k k^T`` (one tensor-core product per ``BK`` block).
    2. ``Tm = (I + A)^-1`` by ``unit_lower_inverse`` (all in registers; products at ``PREC``:
       ``tf32`` on the GPU, whose error, ~1e-3 relative for strongly correlated keys, matches the
       16-bit rounding ``Tm`` gets anyway as a ``w``/``u`` operand; ``ieee`` for float64).
    3. ``w = (Tm diag(beta exp(G) rk)) k`` and ``u = (Tm diag(beta)) v`` in ``[BT, BK]`` / ``[BT, BV]``
       blocks, with the raw keys/values as tensor-core operands.
    """
    i_c, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, i_t, _ = chunk_span(i_c, i_b, T, cu_seqlens, chunk_indices, BT, IS_VARLEN)
    tok = bos + i_t * BT
    o_i = tl.arange(0, BT)
    m_t = i_t * BT + o_i < seq_len
    k += tok * HKV * K + i_hk * K
    v += tok * HKV * V + i_hk * V
    w += tok * H * K + i_h * K
    u += tok * H * V + i_h * V
    o_tm = (tok + o_i[:, None]) * (H * BT) + i_h * BT + o_i[None, :]

    b = tl.load(beta + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
    gc = tl.load(G + (tok + o_i) * H + i_h, mask=m_t, other=0).to(ACC)
    if QK_NORM:
        sk = tl.load(rk + (tok + o_i) * HKV + i_hk, mask=m_t, other=0).to(ACC)
    else:
        sk = tl.full([BT], 1.0, ACC)
    if TM_MODE == 2:
        tm = tl.load(Tm + o_tm, mask=m_t[:, None], other=0).to(ACC)
    else:
        kk = tl.zeros([BT, BT], dtype=ACC)
        for i_k in range((K + BK - 1) // BK):
            o_k = i_k * BK + tl.arange(0, BK)
            kb = tl.load(k + o_i[:, None] * (HKV * K) + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K),
                         other=0).to(DOT)
            kk += tl.dot(kb, tl.trans(kb), out_dtype=ACC)
        # A_ij = beta_i (k_i . k_j) exp(G_i - G_j), strictly lower; rows past the end are zero
        strict = (o_i[:, None] > o_i[None, :]) & m_t[:, None]
        a = tl.where(strict, kk * (b * sk)[:, None] * (sk[None, :] * tl.exp(gc[:, None] - gc[None, :])), 0.0)
        tm = unit_lower_inverse(a, BT, PREC, ACC)
        if TM_MODE == 1:
            tl.store(Tm + o_tm, tm.to(Tm.dtype.element_ty), mask=m_t[:, None])

    f = b * tl.exp(gc) * sk
    tw = (tm * f[None, :]).to(DOT)
    for i_k in range((K + BK - 1) // BK):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        kb = tl.load(k + o_i[:, None] * (HKV * K) + o_k[None, :], mask=m_tk, other=0).to(DOT)
        wb = tl.dot(tw, kb, out_dtype=ACC)
        tl.store(w + o_i[:, None] * (H * K) + o_k[None, :], wb.to(w.dtype.element_ty), mask=m_tk)
    tu = (tm * b[None, :]).to(DOT)
    for i_v in range((V + BV - 1) // BV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        vb = tl.load(v + o_i[:, None] * (HKV * V) + o_v[None, :], mask=m_tv, other=0).to(DOT)
        ub = tl.dot(tu, vb, out_dtype=ACC)
        tl.store(u + o_i[:, None] * (H * V) + o_v[None, :], ub.to(u.dtype.element_ty), mask=m_tv)


#: ``TM_MODE`` values of ``wy_fwd_kernel``.
TM_COMPUTE, TM_COMPUTE_STORE, TM_LOAD = 0, 1, 2


def wy_forward(k, v, beta, G, rk, cu_seqlens, chunk_indices, n_chunks_seq, chunk_size, store_dtype, acc, dot,
               store_t: bool = False, Tm: torch.Tensor | None = None, tm_dtype: torch.dtype | None = None):
    """Returns ``(Tm, w, u)``: ``w`` [B,T,H,K] and ``u`` [B,T,H,V] in ``store_dtype``; ``Tm``
    [B,T,H,BT] = rows of ``(I + A)^-1`` per chunk, stored in ``tm_dtype`` (default ``store_dtype``)
    when ``store_t``, else ``None``. A ``Tm`` passed in (stored by an earlier call on the same
    inputs) is used instead of being recomputed, and returned."""
    B, T, HKV, K = k.shape
    H, V = beta.shape[-1], v.shape[-1]
    mode = TM_COMPUTE
    if Tm is not None:
        mode = TM_LOAD
    elif store_t:
        mode = TM_COMPUTE_STORE
        Tm = torch.empty(B, T, H, chunk_size, device=k.device, dtype=tm_dtype or store_dtype)
    w = torch.empty(B, T, H, K, device=k.device, dtype=store_dtype)
    u = torch.empty(B, T, H, V, device=k.device, dtype=store_dtype)
    wy_fwd_kernel[(n_chunks_seq, B * H)](
        k, v, beta, G, rk, Tm, w, u, cu_seqlens, chunk_indices, T,
        H=H, HKV=HKV, K=K, V=V, BT=chunk_size, BK=block_size(K), BV=block_size(V),
        IS_VARLEN=cu_seqlens is not None, QK_NORM=rk is not None, TM_MODE=mode,
        PREC="ieee" if acc == tl.float64 else "tf32", ACC=acc, DOT=dot,
    )
    return Tm, w, u


AOT_SHAPES = {"H": 32, "HKV": 8, "K": 128, "V": 128, "BT": 64, "BK": 64, "BV": 64,
              "ACC": tl.float32, "DOT": tl.bfloat16}
AOT_TYPES = {"k": "*bf16", "v": "*bf16", "beta": "*bf16", "G": "*fp32", "rk": "*fp32", "Tm": "*fp32", "w": "*bf16",
             "u": "*bf16", "cu_seqlens": "*i32", "chunk_indices": "*i32"}
for _mode, _varlen in ((TM_COMPUTE, False), (TM_COMPUTE_STORE, True), (TM_LOAD, False)):
    register_aot(AotSpec(
        name=f"gdn.wy_fwd[bf16,k128,bt64,tm_mode={_mode},varlen={_varlen}]",
        kernel=wy_fwd_kernel,
        types={**AOT_TYPES, "Tm": "*bf16"},
        constexprs={**AOT_SHAPES, "IS_VARLEN": _varlen, "QK_NORM": True, "TM_MODE": _mode, "PREC": "tf32"},
        num_warps=4, num_stages=2,
    ))
