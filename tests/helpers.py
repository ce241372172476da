"""Shared test utilities: the SPEC 9 error metric and tolerance table."""

from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` over the whole tensor, in float64; NaN/Inf anywhere gives inf."""
    out = out.detach().to(torch.float64)
    ref = ref.detach().to(torch.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape mismatch {tuple(out.shape)} vs {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    return num / denom if denom > 0 else num


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    """``rel_err(out, ref) <= tol``; the error is also printed (shown by ``pytest -rP``), so that
    GPU logs record the margin of every passing check."""
    err = rel_err(out, ref)
    print(f"{name}: relative error {err:.3e} (tolerance {tol:.1e})")
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


# SPEC 9 tolerances.
CPU_FWD = 1e-5
CPU_GRAD = 1e-4
GPU_FWD = 5e-3
GPU_GRAD = 1e-2
GPU_GATE_GRAD = 2e-2
GKA_GPU_FWD = 1e-2
GKA_GPU_GRAD = 2e-2
DECODE_FP32 = 1e-5
DECODE_BF16 = 5e-3
