"""Per-head L2 normalization of queries/keys (``use_qk_l2norm_in_kernel``) and its backward.

    y  = x * r,   r = 1 / sqrt(sum(x^2) + eps)
    dx = r * (dy - y * sum(dy * y))

The forward only computes the inverse norms ``r`` (one float32 per token and head): the chunk
kernels apply them as row/column factors of their products, so normalized copies of ``q``/``k``
are never rounded to 16 bits nor written to memory. One program handles ``BR`` rows of ``D``
elements (tile ``[BR, BD]``, ``BD = pad(D)``); the backward recomputes ``r`` from ``x``.

With grouped heads the backward of the keys also sums the gradient over the query heads of each
key/value head first: ``dy = base + sum_g dy_g`` (``dy_g`` [B,T,H,D] per query head, ``base``
[B,T,HKV,D]), so the per-query-head key gradients are read once and never summed into a
separate buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import compute_dtype, next_power_of_2

EPS = 1e-6
_ROWS = 16


@triton.jit
def l2norm_scale_kernel(x, r, R, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, EPS: tl.constexpr,
                        ACC: tl.constexpr):
    """r = 1 / sqrt(sum(x^2) + EPS) for each row of ``x`` [R, D]."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    xv = tl.load(x + rows[:, None] * D + cols[None, :], mask=mask, other=0).to(ACC)
    tl.store(r + rows, (1.0 / tl.sqrt(tl.sum(xv * xv, axis=1) + EPS)).to(r.dtype.element_ty), mask=rows < R)


@triton.jit
def l2norm_bwd_kernel(x, dy, base, dx, R, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
                      GROUP: tl.constexpr, HAS_BASE: tl.constexpr, EPS: tl.constexpr, ACC: tl.constexpr):
    """dx = r (g - y sum(g * y)) with y = x r, r = 1 / sqrt(sum(x^2) + EPS) and
    g = base (with ``HAS_BASE``) + sum_{j < GROUP} dy[:, j], for the rows of ``x``/``base``/``dx``
    [R, D] and ``dy`` [R, GROUP, D]. Grid (cdiv(R, BR),), tile [BR, BD]; 64-bit offsets."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    cols = tl.arange(0, BD)
    offs = rows[:, None] * D + cols[None, :]
    mask = (rows[:, None] < R) & (cols[None, :] < D)
    xv = tl.load(x + offs, mask=mask, other=0).to(ACC)
    if HAS_BASE:
        dyv = tl.load(base + offs, mask=mask, other=0).to(ACC)
    else:
        dyv = tl.zeros([BR, BD], dtype=ACC)
    for j in range(GROUP):
        dyv += tl.load(dy + (rows[:, None] * GROUP + j) * D + cols[None, :], mask=mask, other=0).to(ACC)
    r = 1.0 / tl.sqrt(tl.sum(xv * xv, axis=1) + EPS)
    yv = xv * r[:, None]
    dxv = (dyv - yv * tl.sum(dyv * yv, axis=1)[:, None]) * r[:, None]
    tl.store(dx + offs, dxv.to(dx.dtype.element_ty), mask=mask)


def l2norm_scale(x: torch.Tensor) -> torch.Tensor:
    """Inverse L2 norms of the last dimension of the contiguous ``x`` (shape ``x.shape[:-1]``;
    float32, float64 for float64 ``x``)."""
    D = x.shape[-1]
    R = x.numel() // D
    r = torch.empty(x.shape[:-1], device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    if R:
        l2norm_scale_kernel[(triton.cdiv(R, _ROWS),)](x, r, R, D=D, BD=next_power_of_2(D), BR=_ROWS, EPS=EPS,
                                                      ACC=compute_dtype(x.dtype))
    return r


def l2norm_backward(x: torch.Tensor, dy: torch.Tensor, out_dtype: torch.dtype,
                    base: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient at ``x`` [..., HX, D] of the per-row L2 normalization, in ``out_dtype``.

    ``dy`` [..., H, D] (``H`` a multiple of ``HX``) holds output gradients per query head: heads
    ``h`` with ``h // (H // HX) == i`` are summed, together with ``base`` [..., HX, D] when given,
    into the gradient of row ``i`` before the backward. With ``H == HX`` and no ``base`` this is
    the plain backward. All tensors contiguous.
    """
    D = x.shape[-1]
    R = x.numel() // D
    group = dy.shape[-2] // x.shape[-2]
    if tuple(dy.shape) != (*x.shape[:-2], group * x.shape[-2], D) or group < 1:
        raise ValueError(f"l2norm_backward: dy must have shape (..., multiple of {x.shape[-2]}, {D}) matching "
                         f"x {tuple(x.shape)}, got {tuple(dy.shape)}")
    if base is not None and tuple(base.shape) != tuple(x.shape):
        raise ValueError(f"l2norm_backward: base must have shape {tuple(x.shape)}, got {tuple(base.shape)}")
    dx = torch.empty(x.shape, device=x.device, dtype=out_dtype)
    if R:
        l2norm_bwd_kernel[(triton.cdiv(R, _ROWS),)](x, dy, base, dx, R, D=D, BD=next_power_of_2(D), BR=_ROWS,
                                                    GROUP=group, HAS_BASE=base is not None, EPS=EPS,
                                                    ACC=compute_dtype(x.dtype))
    return dx


register_aot(AotSpec(
    name="gdn.l2norm_scale[bf16,d128]",
    kernel=l2norm_scale_kernel,
    types={"x": "*bf16", "r": "*fp32"},
    constexprs={"D": 128, "BD": 128, "BR": _ROWS, "EPS": EPS, "ACC": tl.float32},
))
for _group, _base in ((1, False), (4, True)):
    register_aot(AotSpec(
        name=f"gdn.l2norm_bwd[bf16,d128,group{_group},base={_base}]",
        kernel=l2norm_bwd_kernel,
        types={"x": "*bf16", "dy": "*fp32", "base": "*fp32", "dx": "*bf16"},
        constexprs={"D": 128, "BD": 128, "BR": _ROWS, "GROUP": _group, "HAS_BASE": _base, "EPS": EPS,
                    "ACC": tl.float32},
    ))
