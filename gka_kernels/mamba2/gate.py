"""Backward of the output gate ``y = ypre * silu(z)`` (the forward is fused in the GLA output
kernel), as one elementwise pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import compute_dtype

_BLOCK = 2048


@triton.jit
def gate_bwd_kernel(dy, z, ypre, dypre, dz, numel, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """s = sigmoid(z):  dypre = dy * z * s ;  dz = dy * ypre * s * (1 + z * (1 - s)).
    Grid (numel / BLOCK,); flat 64-bit offsets."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    b_dy = tl.load(dy + offs, mask=m, other=0).to(ACC)
    b_z = tl.load(z + offs, mask=m, other=0).to(ACC)
    b_y = tl.load(ypre + offs, mask=m, other=0).to(ACC)
    s = tl.sigmoid(b_z)
    tl.store(dypre + offs, (b_dy * b_z * s).to(dypre.dtype.element_ty), mask=m)
    tl.store(dz + offs, (b_dy * b_y * s * (1 + b_z * (1 - s))).to(dz.dtype.element_ty), mask=m)


def gate_backward(dy: torch.Tensor, z: torch.Tensor, ypre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``ypre * silu(z)``: returns ``(d ypre, dz)`` in the dtypes of ``ypre`` / ``z``
    (all tensors contiguous, same shape)."""
    dy = dy.contiguous()
    dypre = torch.empty_like(ypre)
    dz = torch.empty_like(z)
    n = dy.numel()
    if n:
        gate_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dy, z, ypre, dypre, dz, n, BLOCK=_BLOCK,
                                                   ACC=compute_dtype(ypre.dtype), num_warps=8)
    return dypre, dz


register_aot(AotSpec(
    name="mamba2_gate_bwd[bf16]",
    kernel=gate_bwd_kernel,
    types={"dy": "*bf16", "z": "*bf16", "ypre": "*bf16", "dypre": "*bf16", "dz": "*bf16",
           "numel": "i64"},
    constexprs={"BLOCK": _BLOCK, "ACC": tl.float32},
    num_warps=8,
))
