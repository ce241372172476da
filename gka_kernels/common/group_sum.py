"""Sum over groups of rows: ``out[n] = base[n] + sum_g x[n, g]`` (for example the query heads of
one key/value head in a grouped-query backward)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import compute_dtype

#: Elements per program tile (``BN * BD``).
_TILE = 4096


@triton.jit
def group_sum_kernel(
    x, base, out, N,
    G: tl.constexpr, D: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, HAS_BASE: tl.constexpr,
    ACC: tl.constexpr,
):
    """out[n, :] = base[n, :] (with ``HAS_BASE``) + sum_{g < G} x[n, g, :].

    ``x`` [N, G, D], ``base``/``out`` [N, D], all contiguous. Grid (cdiv(N, BN),); one ``[BN, BD]``
    tile (``BD >= D``, a power of two) per program, accumulated in ``ACC``; 64-bit offsets.
    """
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    o_d = tl.arange(0, BD)
    m = (o_n[:, None] < N) & (o_d[None, :] < D)
    o_out = o_n[:, None] * D + o_d[None, :]
    if HAS_BASE:
        acc = tl.load(base + o_out, mask=m, other=0).to(ACC)
    else:
        acc = tl.zeros([BN, BD], dtype=ACC)
    for g in range(G):
        acc += tl.load(x + (o_n[:, None] * G + g) * D + o_d[None, :], mask=m, other=0).to(ACC)
    tl.store(out + o_out, acc.to(out.dtype.element_ty), mask=m)


def group_sum(x: torch.Tensor, base: torch.Tensor | None = None,
              out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum ``x [..., G, D]`` over its group axis ``G``, plus ``base [..., D]`` when given.

    Accumulates in float32 (float64 for float64 ``x``); returns ``[..., D]`` in ``out_dtype``
    (default ``x.dtype``).
    """
    *lead, G, D = x.shape
    out = torch.empty(*lead, D, device=x.device, dtype=out_dtype or x.dtype)
    if base is not None and tuple(base.shape) != tuple(out.shape):
        raise ValueError(f"group_sum: base must have shape {tuple(out.shape)}, got {tuple(base.shape)}")
    if out.numel() == 0:
        return out
    N = out.numel() // D
    BD = triton.next_power_of_2(D)
    BN = max(1, _TILE // BD)
    group_sum_kernel[(triton.cdiv(N, BN),)](
        x.contiguous(), base.contiguous() if base is not None else None, out, N,
        G=G, D=D, BN=BN, BD=BD, HAS_BASE=base is not None, ACC=compute_dtype(x.dtype),
    )
    return out


register_aot(AotSpec(
    name="group_sum[fp32->bf16,g4,d128]",
    kernel=group_sum_kernel,
    types={"x": "*fp32", "base": "*fp32", "out": "*bf16"},
    constexprs={"G": 4, "D": 128, "BN": _TILE // 128, "BD": 128, "HAS_BASE": True, "ACC": tl.float32},
))
