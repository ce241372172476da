"""Mamba-2's effective step and log-decay, fused: ``dt' = clamp(softplus?(dt + dt_bias))`` and
``g = dt' * A`` in one pass, with a fused backward (one pass plus a deterministic reduction of the
per-program partial sums of ``dA`` and ``d dt_bias``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import compute_dtype

_ELEMS = 4096  # elements of [B*T, H] per program


@triton.jit
def softplus(x):
    """log(1 + exp(x)), identity above 20 (torch's threshold); log1p accurate for small exp(x)."""
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1 + e
    lp = tl.where(u == 1, e, tl.log(u) * e / (u - 1))
    return tl.where(x <= 20.0, lp, x)


@triton.jit
def dt_fwd_kernel(dt, dt_bias, A, dtp, g, rows, lo, hi, H: tl.constexpr, BH: tl.constexpr,
                  BR: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                  ACC: tl.constexpr):
    """dtp = clamp(softplus?(dt + bias), lo, hi) ; g = dtp * A.  Tiles [BR rows, BH heads]."""
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_h = tl.arange(0, BH)
    m_h = o_h < H
    m = (o_r < rows)[:, None] & m_h[None, :]
    off = o_r[:, None] * H + o_h[None, :]
    d = tl.load(dt + off, mask=m, other=0).to(ACC)
    if HAS_BIAS:
        d += tl.load(dt_bias + o_h, mask=m_h, other=0).to(ACC)[None, :]
    if SOFTPLUS:
        d = softplus(d)
    d = tl.minimum(tl.maximum(d, lo), hi)
    a = tl.load(A + o_h, mask=m_h, other=0).to(ACC)
    tl.store(dtp + off, d.to(dtp.dtype.element_ty), mask=m)
    tl.store(g + off, (d * a[None, :]).to(g.dtype.element_ty), mask=m)


@triton.jit
def dt_bwd_kernel(dt, dt_bias, A, ddtp, dg, ddt, dA_part, dbias_part, rows, lo, hi,
                  H: tl.constexpr, BH: tl.constexpr, BR: tl.constexpr, HAS_BIAS: tl.constexpr,
                  SOFTPLUS: tl.constexpr, ACC: tl.constexpr):
    """Recomputes dtp; d dtp_total = ddtp + dg * A ; ddt = d dtp_total * [lo <= dtp' <= hi] *
    softplus'(pre). Per program: dA_part = sum_rows dg * dtp, dbias_part = sum_rows ddt."""
    i_p = tl.program_id(0)
    o_r = i_p.to(tl.int64) * BR + tl.arange(0, BR)
    o_h = tl.arange(0, BH)
    m_h = o_h < H
    m = (o_r < rows)[:, None] & m_h[None, :]
    off = o_r[:, None] * H + o_h[None, :]
    pre = tl.load(dt + off, mask=m, other=0).to(ACC)
    if HAS_BIAS:
        pre += tl.load(dt_bias + o_h, mask=m_h, other=0).to(ACC)[None, :]
    if SOFTPLUS:
        sp = softplus(pre)
    else:
        sp = pre
    d = tl.minimum(tl.maximum(sp, lo), hi)
    a = tl.load(A + o_h, mask=m_h, other=0).to(ACC)
    b_dg = tl.load(dg + off, mask=m, other=0).to(ACC)
    grad = tl.load(ddtp + off, mask=m, other=0).to(ACC) + b_dg * a[None, :]
    grad = tl.where((sp >= lo) & (sp <= hi), grad, 0)
    if SOFTPLUS:
        grad = tl.where(pre <= 20.0, grad * tl.sigmoid(pre), grad)
    grad = tl.where(m, grad, 0)
    tl.store(ddt + off, grad.to(ddt.dtype.element_ty), mask=m)
    tl.store(dA_part + i_p * H + o_h, tl.sum(tl.where(m, b_dg * d, 0), axis=0), mask=m_h)
    if HAS_BIAS:
        tl.store(dbias_part + i_p * H + o_h, tl.sum(grad, axis=0), mask=m_h)


def _tiles(H: int) -> tuple[int, int]:
    BH = max(16, triton.next_power_of_2(H))
    return BH, max(16, _ELEMS // BH)


class DtPrep(torch.autograd.Function):
    """``(dtp, g) = DtPrep(dt [B,T,H], dt_bias [H] | None, A [H], softplus, lo, hi)``, both
    float32 (float64 when dt is float64), contiguous."""

    @staticmethod
    def forward(ctx, dt, dt_bias, A, dt_softplus, lo, hi):
        dt = dt.contiguous()
        fdt = torch.float64 if dt.dtype == torch.float64 else torch.float32
        dtp = torch.empty(dt.shape, device=dt.device, dtype=fdt)
        g = torch.empty_like(dtp)
        H = dt.shape[-1]
        rows = dt.numel() // H
        BH, BR = _tiles(H)
        if rows:
            dt_fwd_kernel[(triton.cdiv(rows, BR),)](
                dt, dt_bias, A, dtp, g, rows, lo, hi, H=H, BH=BH, BR=BR,
                HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus), ACC=compute_dtype(fdt))
        ctx.save_for_backward(dt, dt_bias, A)
        ctx.args = (bool(dt_softplus), lo, hi)
        return dtp, g

    @staticmethod
    def backward(ctx, ddtp, dg):
        dt, dt_bias, A = ctx.saved_tensors
        dt_softplus, lo, hi = ctx.args
        H = dt.shape[-1]
        rows = dt.numel() // H
        fdt = torch.float64 if dt.dtype == torch.float64 else torch.float32
        ddtp = torch.zeros(dt.shape, device=dt.device, dtype=fdt) if ddtp is None else ddtp.contiguous()
        dg = torch.zeros(dt.shape, device=dt.device, dtype=fdt) if dg is None else dg.contiguous()
        BH, BR = _tiles(H)
        nprog = triton.cdiv(rows, BR)
        ddt = torch.empty_like(dt)
        dA_part = torch.zeros(nprog, H, device=dt.device, dtype=fdt)
        dbias_part = torch.zeros(nprog, H, device=dt.device, dtype=fdt) if dt_bias is not None else None
        if rows:
            dt_bwd_kernel[(nprog,)](
                dt, dt_bias, A, ddtp, dg, ddt, dA_part, dbias_part, rows, lo, hi, H=H, BH=BH, BR=BR,
                HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, ACC=compute_dtype(fdt))
        dbias = dbias_part.sum(0).to(dt_bias.dtype) if dt_bias is not None else None
        return ddt, dbias, dA_part.sum(0).to(A.dtype), None, None, None


def dt_prep(dt: torch.Tensor, dt_bias: torch.Tensor | None, A: torch.Tensor, dt_softplus: bool,
            dt_limit: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``dt' [B,T,H]`` and ``g = dt' * A`` (float32, float64 for float64 ``dt``), differentiable
    in ``dt``, ``dt_bias``, ``A``."""
    return DtPrep.apply(dt, dt_bias, A, dt_softplus, float(dt_limit[0]), float(dt_limit[1]))


for _name, _bwd in (("fwd", False), ("bwd", True)):
    register_aot(AotSpec(
        name=f"mamba2_dt_{_name}[h32]",
        kernel=dt_bwd_kernel if _bwd else dt_fwd_kernel,
        types={"dt": "*fp32", "dt_bias": "*fp32", "A": "*fp32", "ddtp": "*fp32", "dg": "*fp32",
               "ddt": "*fp32", "dA_part": "*fp32", "dbias_part": "*fp32", "lo": "fp32",
               "hi": "fp32"} if _bwd else
              {"dt": "*fp32", "dt_bias": "*fp32", "A": "*fp32", "dtp": "*fp32", "g": "*fp32",
               "lo": "fp32", "hi": "fp32"},
        constexprs={"H": 32, "BH": 32, "BR": 128, "HAS_BIAS": True, "SOFTPLUS": True,
                    "ACC": tl.float32},
    ))
