"""Pieces shared by the GKA kernels: chunk coordinates, dot operand dtype, Chebyshev constants."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The key-gradient kernels split operands with ``split_hi_lo`` where a solution ``x`` (or the
# adjoint solution) is projected onto keys: ``x`` is dominated by its component orthogonal to the
# keys (up to ``1 / ridge_ratio`` times the rest), so rounding it once puts an error of ``u |x|``
# into ``k . x``, whose true value is only the small key-space part. Measured on GKA layer inputs
# (bf16, strong decays) with the solve's iterate rounded that way: 1.3e-2 output error. The solve
# itself avoids the split with its residual-form iteration (``solve._chebyshev``).
from gka_kernels.common.split_dot import split_hi_lo  # noqa: F401  (re-exported for the GKA kernels)

#: Chunk length of every chunked GKA kernel (rows solved together, tokens per stored state).
CHUNK = 64
#: Largest key head dim the kernels hold on-chip.
MAX_K = 128


def dot_dtype(torch_dtype: torch.dtype):
    """Operand dtype of ``tl.dot`` for inputs of ``torch_dtype``: half types run on tensor cores in
    their own dtype (fp32 accumulation); float32 inputs use float32 operands (tf32 on the GPU);
    float64 (CPU gradcheck) stays float64."""
    return {
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[torch_dtype]


def solve_dot_dtype(torch_dtype: torch.dtype):
    """Operand dtype of the ``tl.dot`` calls of the ridge solve and of the ``H`` recurrence.

    The solve's error is the operand rounding amplified by the condition number (up to
    ``1 + 1/ridge_ratio``, ~51), so 16-bit inputs (bf16 included) use float16 operands: 3 more
    mantissa bits than bf16 at the same tensor-core rate. The kernels keep every operand in
    float16 range: keys are unit-norm (beta-scaled), the chunk state is divided by its Frobenius
    norm, and iterates / right-hand sides are row-normalized before they enter a dot.
    float32 and float64 inputs as in :func:`dot_dtype`."""
    if torch_dtype in (torch.bfloat16, torch.float16):
        return tl.float16
    return dot_dtype(torch_dtype)


def state_dtype(torch_dtype: torch.dtype) -> torch.dtype:
    """Storage dtype of the scaled chunk states ``H_c / s_c`` (:mod:`gka_kernels.gka.chunk_h`): the
    torch dtype of :func:`solve_dot_dtype` (float16 for 16-bit inputs), so that the kernels load them
    straight into their dot operands."""
    return {torch.bfloat16: torch.float16, torch.float16: torch.float16}.get(torch_dtype, torch_dtype)


def dot_precision(torch_dtype: torch.dtype) -> str:
    """``input_precision`` of ``tl.dot``: float32 inputs use 3xTF32 (close to full fp32 on the GPU);
    16-bit operands are exact products anyway ("ieee"); float64 is exact."""
    return "tf32x3" if torch_dtype == torch.float32 else "ieee"


def chebyshev_constants(ridge_ratio: float) -> tuple[float, float]:
    """``(step, c4)`` of the iteration on the normalized system ``(H/fro + a I) y = rhs``:
    the spectrum lies in ``[a, 1 + a]``, so ``step = 2 / (1 + 2a)`` and
    ``c4 = rho^2 / 4`` with ``rho = 1 / (1 + 2a)``; ``w_i = 1 / (1 - c4 w_{i-1})``, ``w_0 = 2``."""
    rho = 1.0 / (1.0 + 2.0 * ridge_ratio)
    return 2.0 / (1.0 + 2.0 * ridge_ratio), 0.25 * rho * rho


@triton.jit
def chunk_program(cu_seqlens, chunk_indices, T, NT, H: tl.constexpr, HKV: tl.constexpr, BT: tl.constexpr,
                  IS_VARLEN: tl.constexpr):
    """Coordinates of this program of a chunk-parallel grid ``(chunks, B*H)`` (varlen: ``(chunks,
    H)``): ``(i_h, i_hk, i_s, tok, m_t)`` = query head, key head read by it, the chunk's slot in the
    stored chunk states ``[B*NT | NT_total, H, ...]`` (int64), the chunk's token indices [BT]
    (int64, into ``[B*T]``) and their validity mask [BT]."""
    i_c = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hk = i_h // (H // HKV)
    if IS_VARLEN:
        i_n = tl.load(chunk_indices + i_c * 2).to(tl.int64)
        i_t = tl.load(chunk_indices + i_c * 2 + 1).to(tl.int64)
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        i_s = i_c.to(tl.int64)
    else:
        i_t = i_c.to(tl.int64)
        bos = i_b.to(tl.int64) * T
        seq_len = T
        i_s = i_b.to(tl.int64) * NT + i_t
    o_t = tl.arange(0, BT)
    return i_h, i_hk, i_s, bos + i_t * BT + o_t, o_t < seq_len - i_t * BT


@triton.jit
def sequence_coords(i_n, cu_seqlens, chunk_offsets, T, NT, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """For a sequential (per sequence) program: ``(bos, seq_len, n_chunks, boh)`` with ``boh`` the
    slot of the sequence's first chunk in the stored chunk states."""
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        n_chunks = (seq_len + BT - 1) // BT
        boh = tl.load(chunk_offsets + i_n).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        seq_len = T
        n_chunks = NT
        boh = i_n.to(tl.int64) * NT
    return bos, seq_len, n_chunks, boh


@triton.jit
def load_rows(p, o_c, m_t, K: tl.constexpr, ACC: tl.constexpr):
    """Rows ``p[t]`` (row pointers [BT]), columns ``o_c``, as ``ACC``; zero outside ``m_t`` and
    ``o_c < K``."""
    return tl.load(p[:, None] + o_c[None, :], mask=m_t[:, None] & (o_c[None, :] < K), other=0).to(ACC)


@triton.jit
def store_rows(p, o_c, m_t, b, K: tl.constexpr):
    """Store ``b`` into rows ``p[t]``, columns ``o_c`` (the masks of :func:`load_rows`)."""
    tl.store(p[:, None] + o_c[None, :], b.to(p.dtype.element_ty), mask=m_t[:, None] & (o_c[None, :] < K))


@triton.jit
def row_norms(a):
    """``(n, 1/n)`` of the rows of ``a`` (``1/n = 0`` for zero rows): row scaling of dot operands."""
    n = tl.sqrt(tl.sum(a * a, axis=1))
    return n, tl.where(n > 0, 1.0 / n, 0.0)


@triton.jit
def tile_scale(a):
    """Largest ``|a|`` over a 2-D tile (1 for a zero tile): ``a / tile_scale(a)`` fits float16."""
    m = tl.max(tl.max(tl.abs(a), axis=1), axis=0)
    return tl.where(m > 0, m, 1.0)


@triton.jit
def column_scale(a):
    """Largest ``|a|`` of each column of a 2-D tile (1 for a zero column): ``a / column_scale(a)``
    fits float16; a dot ``b @ a`` gets it back by multiplying its output columns."""
    m = tl.max(tl.abs(a), axis=0)
    return tl.where(m > 0, m, 1.0)
