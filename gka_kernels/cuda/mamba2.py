"""Mamba-2 selective state update (decode step) with the fused CUDA kernel in ``csrc/mamba2_decode.cu``."""

from __future__ import annotations

import math
from typing import Any

import torch

from gka_kernels.common.checks import check_tensor
from gka_kernels.cuda import _args as ca
from gka_kernels.cuda._dtypes import dtype_tag


def _with_tokens(name: str, t: torch.Tensor | None, single: bool, ndim: int) -> torch.Tensor | None:
    """In single-token form (``x [B, H, P]``), insert the token dim into ``t``."""
    if t is None or not single:
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim - 1:
        raise ValueError(f"{name}: expected {ndim - 1} dimensions like x (single-token form), "
                         f"got shape {list(t.shape)}")
    return t.unsqueeze(1)


def mamba2_decode_launch_args(
    state_pool: torch.Tensor, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
    C: torch.Tensor, state_indices: torch.Tensor | None = None, dst_state_indices: torch.Tensor | None = None,
    D: torch.Tensor | None = None, z: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf), out: torch.Tensor | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Validate the inputs of :func:`mamba2_decode` (metadata only) and build the launcher arguments.

    Returns ``(kwargs for gka_kernels._C.mamba2_decode without stream, output tensor)``; the output
    is ``[B, Tn, H, P]`` (callers of the single-token form squeeze it).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    single = x.dim() == 3
    x = ca.activation("x", x.unsqueeze(1) if single else x, 4)
    Bsz, Tn, Hx, P = x.shape
    ca.tokens("x", x)
    dt = ca.gate("dt", _with_tokens("dt", dt, single, 3), (Bsz, Tn, None), x.device)
    H = dt.shape[2]
    Bm = ca.activation("B", _with_tokens("B", B, single, 4), 4, x.dtype, x.device)
    ca.expect_shape("B", Bm, (Bsz, Tn, None, None))
    N = Bm.shape[3]
    Cm = ca.activation("C", _with_tokens("C", C, single, 4), 4, x.dtype, x.device)
    ca.expect_shape("C", Cm, (Bsz, Tn, None, N))
    ca.divides("x", Hx, H, "heads of dt (state heads)")
    ca.divides("B", Bm.shape[2], H, "heads of dt (state heads)")
    ca.divides("C", Cm.shape[2], H, "heads of dt (state heads)")
    ca.head_dim("B", N, 4, 256, multiple=4)
    a = ca.gate("A", A, (H,), x.device)
    d_strides = (0, 0)
    if D is not None:
        D = check_tensor("D", D, dtypes=ca.KERNEL_DTYPES, device=x.device)
        if tuple(D.shape) == (H,):
            d_strides = (D.stride(0), 0)
        elif tuple(D.shape) == (H, P):
            d_strides = (D.stride(0), D.stride(1))
        else:
            raise ValueError(f"D: expected shape [{H}] or [{H}, {P}], got {list(D.shape)}")
    if z is not None:
        z = ca.activation("z", _with_tokens("z", z, single, 4), 4, x.dtype, x.device)
        ca.expect_shape("z", z, (Bsz, Tn, H, P))
    if dt_bias is not None:
        dt_bias = ca.gate("dt_bias", dt_bias, (H,), x.device)
    softplus = ca.flag("dt_softplus", dt_softplus)
    if (not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2
            or any(isinstance(e, bool) or not isinstance(e, (int, float)) for e in dt_limit)):
        raise TypeError(f"dt_limit: expected a (min, max) pair of floats, got {dt_limit!r}")
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if math.isnan(lo) or math.isnan(hi) or lo > hi:
        raise ValueError(f"dt_limit: expected min <= max, got {tuple(dt_limit)}")
    pool = ca.state_pool("state_pool", state_pool, (None, H, P, N), x.device)
    args = ca.indices(state_indices, dst_state_indices, Bsz, pool.shape[0], x.device)
    o = ca.output(_with_tokens("out", out, single, 4), (Bsz, Tn, H, P), x.dtype, x.device)
    args.update(
        x=x.data_ptr(), dt=dt.data_ptr(), A=a.data_ptr(), B_mat=Bm.data_ptr(), C_mat=Cm.data_ptr(),
        D=ca.ptr(D), z=ca.ptr(z), dt_bias=ca.ptr(dt_bias), state=pool.data_ptr(), out=o.data_ptr(),
        x_strides=ca.strides3(x), dt_strides=dt.stride(), B_strides=ca.strides3(Bm),
        C_strides=ca.strides3(Cm), z_strides=ca.strides3(z), out_strides=ca.strides3(o),
        D_stride_h=d_strides[0], D_stride_p=d_strides[1], B=Bsz, Tn=Tn, H=H, x_heads=Hx,
        B_groups=Bm.shape[2], C_groups=Cm.shape[2], P=P, N=N, dtype=dtype_tag("x", x),
        dt_dtype=dtype_tag("dt", dt), A_dtype=dtype_tag("A", a), D_dtype=ca.tag("D", D),
        dt_bias_dtype=ca.tag("dt_bias", dt_bias), softplus=softplus, dt_min=lo, dt_max=hi)
    return args, o


def mamba2_decode(
    state_pool: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state_indices: torch.Tensor | None = None,
    dst_state_indices: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Mamba-2 decode step of ``Tn`` (1..8) tokens per sequence, state updated in place (SPEC 4).

    Per state head ``h`` and token::

        dt = dt + dt_bias ; dt = softplus(dt) if dt_softplus ; dt = clamp(dt, *dt_limit)
        s = exp(dt A) s + dt x B^T ;  y = s C + D x ;  y = y * silu(z) if z is given

    The clamp to ``dt_limit`` is always applied, also for the default ``(0, inf)`` (SPEC 4, as the
    reference ``ssd_ref``).

    Args:
        state_pool: float32 ``[slots, H, P, N]``, contiguous; updated in place.
        x: ``[B, Tn, Hx, P]``, or ``[B, Hx, P]`` for one token (``selective_state_update`` form: then
            dt, B, C, z, out drop their token dim too). Hx divides H; head ``h`` reads ``h // (H // Hx)``.
        dt: ``[B, Tn, H]`` (any strides; H = number of state heads). A: ``[H]`` (negative).
        B, C: ``[B, Tn, G, N]`` with their own group counts dividing H, dtype of x, ``N`` a multiple
            of 4 up to 256.
        state_indices: ``[B]`` int32/int64 slot of each sequence; ``-1`` skips the sequence (state
            neither read nor written, output rows 0). ``None``: slot ``b``.
        dst_state_indices: ``[B]`` slots to write the new states to (default ``state_indices``);
            ``-1`` skips the write only. Destination slots must be distinct and must not be the
            source slot of another sequence.
        D: ``[H]`` or ``[H, P]`` skip weight. z: ``[B, Tn, H, P]`` gate. dt_bias: ``[H]``.
        out: optional preallocated output shaped like ``y``.

    Returns:
        ``y [B, Tn, H, P]`` (or ``[B, H, P]``) in the dtype of ``x``.

    Metadata-only checks, current CUDA stream, no allocation when ``out`` is given: CUDA-graph
    capturable.
    """
    args, o = mamba2_decode_launch_args(state_pool, x, dt, A, B, C, state_indices, dst_state_indices,
                                        D, z, dt_bias, dt_softplus, dt_limit, out)
    ca.launch("mamba2_decode", args, x.device)
    return o.squeeze(1) if x.dim() == 3 else o
