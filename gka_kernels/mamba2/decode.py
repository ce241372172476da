"""One-token Mamba-2 step on a state pool, in place (drop-in for ``mamba_ssm``'s
``selective_state_update``)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.checks import (
    check_activation, check_head_dim, check_head_groups, check_index_tensor, check_same_dtype,
    check_shape_in, check_tensor,
)
from gka_kernels.mamba2.chunk import PARAM_DTYPES
from gka_kernels.common.triton_utils import next_power_of_2
from gka_kernels.mamba2.dt import softplus



@triton.jit
def selective_state_update_kernel(
    state, x, dt, dt_bias, A, Bm, Cm, D, z, y, slots,
    s_dt_b, s_dt_h, s_dt_p, s_bias_h, s_bias_p, s_a_h, s_a_p, s_a_n, s_d_h, s_d_p,
    H: tl.constexpr, G: tl.constexpr, P: tl.constexpr, N: tl.constexpr,
    BP: tl.constexpr, BN: tl.constexpr,
    HAS_SLOTS: tl.constexpr, HAS_DT_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    A_FULL: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, ACC: tl.constexpr,
):
    """Per (row b, head h), state s = pool[slot_b, h] ([P, N], float32):

        d = dt[b,h,p] (+ dt_bias[h,p]) (softplus) ;  s = exp(d A[h,p,n]) s + d x[b,h,p] B[b,g,n]
        y[b,h,p] = sum_n s C[b,g,n] + D[h,p] x ;  y *= silu(z)

    (dt/dt_bias/A/D broadcast through their strides: 0 strides give mamba_ssm's per-head form.)
    slot = slots[b] (or b); slot -1 skips the row: the pool is neither read nor written, y = 0.
    1-D grid over (P block, row * head); one program updates a [BP, BN] tile of one state.
    Not autotuned: it writes its input.
    """
    NP = tl.cdiv(P, BP)
    i_p = tl.program_id(0) % NP
    i_bh = tl.program_id(0) // NP
    i_b = i_bh // H
    i_h = i_bh % H
    i_g = i_h // (H // G)
    if HAS_SLOTS:
        slot = tl.load(slots + i_b).to(tl.int64)
    else:
        slot = i_b.to(tl.int64)
    o_p = i_p * BP + tl.arange(0, BP)
    o_n = tl.arange(0, BN)
    m_p = o_p < P
    m_n = o_n < N
    # The slot test as a [BP] block: a scalar boolean in a mask is rejected by Triton 3.9's interpreter.
    valid = o_p * 0 + slot >= 0
    m_s = (m_p & valid)[:, None] & m_n[None, :]
    slot = tl.maximum(slot, 0)
    s_ptr = state + (slot * H + i_h) * (P * N) + (o_p[:, None] * N + o_n[None, :])
    s = tl.load(s_ptr, mask=m_s, other=0).to(ACC)

    row = i_b.to(tl.int64) * H + i_h
    bx = tl.load(x + row * P + o_p, mask=m_p, other=0).to(ACC)
    d = tl.load(dt + i_b.to(tl.int64) * s_dt_b + i_h * s_dt_h + o_p * s_dt_p, mask=m_p,
                other=0).to(ACC)
    if HAS_DT_BIAS:
        d += tl.load(dt_bias + i_h * s_bias_h + o_p * s_bias_p, mask=m_p, other=0).to(ACC)
    if SOFTPLUS:
        d = softplus(d)
    if A_FULL:
        a = tl.load(A + i_h * s_a_h + o_p[:, None] * s_a_p + o_n[None, :] * s_a_n,
                    mask=m_p[:, None] & m_n[None, :], other=0).to(ACC)
    else:
        a = tl.load(A + i_h * s_a_h).to(ACC)
    bb = tl.load(Bm + (i_b.to(tl.int64) * G + i_g) * N + o_n, mask=m_n, other=0).to(ACC)
    bc = tl.load(Cm + (i_b.to(tl.int64) * G + i_g) * N + o_n, mask=m_n, other=0).to(ACC)

    s = s * tl.exp(a * d[:, None]) + (d * bx)[:, None] * bb[None, :]
    tl.store(s_ptr, s.to(state.dtype.element_ty), mask=m_s)

    out = tl.sum(s * bc[None, :], axis=1)
    if HAS_D:
        out += bx * tl.load(D + i_h * s_d_h + o_p * s_d_p, mask=m_p, other=0).to(ACC)
    if HAS_Z:
        bz = tl.load(z + row * P + o_p, mask=m_p, other=0).to(ACC)
        out *= bz * tl.sigmoid(bz)
    out = tl.where(valid, out, 0)
    tl.store(y + row * P + o_p, out.to(y.dtype.element_ty), mask=m_p)


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def selective_state_update(
    state: torch.Tensor,
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Mamba-2 decode step; updates ``state`` in place and returns ``y [Bn, H, P]``.

    Args:
        state: float32 ``[S, H, P, N]``, contiguous (a pool of S slots; ``S == Bn`` without
            ``state_batch_indices``).
        x: ``[Bn, H, P]``; z: ``[Bn, H, P]``; B, C: ``[Bn, G, N]`` with ``H % G == 0``.
        dt: ``[Bn, H]`` (or mamba_ssm's ``[Bn, H, P]``); A: ``[H]`` (or ``[H, P, N]``);
        dt_bias: ``[H]`` (or ``[H, P]``); D: ``[H]`` or ``[H, P]``.
        state_batch_indices: ``[Bn]`` int32/int64 slot of every row; ``-1`` skips the row (its
            slot is neither read nor written, its ``y`` is 0). Values are checked on the host
            except while a CUDA graph is being captured.

    ``dt' = softplus(dt + dt_bias)`` when ``dt_softplus`` (no ``dt_limit`` clamp, as mamba_ssm).
    """
    x = check_activation("x", x, ndim=3)
    dev = x.device
    Bn, H, P = x.shape
    B = check_activation("B", B, ndim=3, device=dev)
    C = check_activation("C", C, ndim=3, device=dev)
    check_same_dtype("x", x, B=B, C=C)
    G, N = B.shape[1], B.shape[2]
    if B.shape[0] != Bn:
        raise ValueError(f"B: expected shape [{Bn}, G, N] to match x, got {list(B.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"C: expected shape {list(B.shape)} (the shape of B), got {list(C.shape)}")
    check_head_groups(H, G, "x", "B")
    check_head_dim("x", P, 256)
    check_head_dim("B", N, 256)
    state = check_tensor("state", state, ndim=4, dtypes=(torch.float32, torch.float64), device=dev)
    if tuple(state.shape[1:]) != (H, P, N):
        raise ValueError(f"state: expected shape [S, {H}, {P}, {N}], got {list(state.shape)}")
    if not state.is_contiguous():
        raise ValueError("state: expected a contiguous tensor (it is updated in place)")
    if state_batch_indices is not None:
        check_index_tensor("state_batch_indices", state_batch_indices, device=dev,
                           upper=state.shape[0], sync=not _capturing(dev))
        if state_batch_indices.shape[0] != Bn:
            raise ValueError(f"state_batch_indices: expected shape [{Bn}], "
                             f"got {list(state_batch_indices.shape)}")
    elif state.shape[0] != Bn:
        raise ValueError(f"state: expected {Bn} slots (one per row of x) without "
                         f"state_batch_indices, got {state.shape[0]}")
    dt = check_shape_in("dt", dt, [(Bn, H), (Bn, H, P)], dtypes=PARAM_DTYPES, device=dev)
    A = check_shape_in("A", A, [(H,), (H, P, N)], dtypes=PARAM_DTYPES, device=dev)
    if dt_bias is not None:
        dt_bias = check_shape_in("dt_bias", dt_bias, [(H,), (H, P)], dtypes=PARAM_DTYPES, device=dev)
    if D is not None:
        D = check_shape_in("D", D, [(H,), (H, P)], dtypes=PARAM_DTYPES, device=dev)
    if z is not None:
        z = check_activation("z", z, ndim=3, device=dev)
        check_same_dtype("x", x, z=z)
        if tuple(z.shape) != tuple(x.shape):
            raise ValueError(f"z: expected shape {list(x.shape)} (the shape of x), got {list(z.shape)}")

    y = torch.empty_like(x)
    if Bn == 0:
        return y
    s_dt = (dt.stride(0), dt.stride(1), dt.stride(2) if dt.dim() == 3 else 0)
    s_bias = (dt_bias.stride(0), dt_bias.stride(1) if dt_bias.dim() == 2 else 0) \
        if dt_bias is not None else (0, 0)
    a_full = A.dim() == 3 and (A.stride(1) != 0 or A.stride(2) != 0)
    s_a = (A.stride(0), A.stride(1), A.stride(2)) if A.dim() == 3 else (A.stride(0), 0, 0)
    s_d = (D.stride(0), D.stride(1) if D.dim() == 2 else 0) if D is not None else (0, 0)
    BN = next_power_of_2(N)
    BP = min(triton.next_power_of_2(P), max(1, 2048 // BN))  # 16 state elements per thread
    acc = tl.float64 if torch.float64 in (x.dtype, state.dtype) else tl.float32
    grid = (triton.cdiv(P, BP) * Bn * H,)
    selective_state_update_kernel[grid](
        state, x.contiguous(), dt, dt_bias, A, B.contiguous(), C.contiguous(), D,
        z.contiguous() if z is not None else None, y, state_batch_indices,
        *s_dt, *s_bias, *s_a, *s_d,
        H=H, G=G, P=P, N=N, BP=BP, BN=BN,
        HAS_SLOTS=state_batch_indices is not None, HAS_DT_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), A_FULL=a_full, HAS_D=D is not None, HAS_Z=z is not None,
        ACC=acc, num_warps=4,
    )
    return y


register_aot(AotSpec(
    name="mamba2_selective_state_update[bf16,p128,n128]",
    kernel=selective_state_update_kernel,
    types={"state": "*fp32", "x": "*bf16", "dt": "*fp32", "dt_bias": "*fp32", "A": "*fp32",
           "Bm": "*bf16", "Cm": "*bf16", "D": "*fp32", "z": "*bf16", "y": "*bf16", "slots": "*i32"},
    constexprs={"H": 32, "G": 8, "P": 128, "N": 128, "BP": 16, "BN": 128, "HAS_SLOTS": True,
                "HAS_DT_BIAS": True, "SOFTPLUS": True, "A_FULL": False, "HAS_D": True,
                "HAS_Z": True, "ACC": tl.float32},
    num_warps=4,
))
