"""Chunked simple gated linear attention with grouped heads: forward/backward drivers and the
public autograd op ``chunk_simple_gla``.

Per head ``h`` of ``H = max(HQ, HK, HV)`` heads, state ``S`` of shape ``[K, V]`` (float32):

    S_t = exp(g_t) S_{t-1} + k_t v_t^T ;   o_t = scale * S_t^T q_t

Head ``h`` reads query head ``h // (H // HQ)``, key head ``h // (H // HK)``, value head
``h // (H // HV)``; nothing is repeated in memory.

Pipeline (chunks of ``BT = 64`` tokens):
forward  = chunk-local cumsum of g -> state pass (states at chunk starts) -> output kernel;
backward = state pass again (recompute) -> reverse state pass (dL/dstate per chunk, dh0)
           -> dv kernel -> dq/dk/dg kernel.
``gla_forward`` / ``gla_backward`` also take the Mamba-2 extras (per-token value scale ``vs``,
skip connection ``D``, output gate ``z``) so that ``gka_kernels.mamba2`` reuses these kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gka_kernels.common.checks import (
    check_activation, check_cu_seqlens, check_head_dim, check_head_groups, check_same_dtype,
    check_scale, check_state, check_tensor,
)
from gka_kernels.common.cumsum import chunk_local_cumsum
from gka_kernels.common.triton_utils import compute_dtype, is_interpreter
from gka_kernels.common.varlen import prepare_chunk_indices, prepare_chunk_offsets
from gka_kernels.gla.backward import chunk_bwd_dqkg, chunk_bwd_dv
from gka_kernels.gla.output import chunk_fwd_o
from gka_kernels.gla.state import chunk_state_pass

#: Tokens per chunk of every kernel.
BT = 64
#: Largest head dim (K and V) the kernels accept.
MAX_HEAD_DIM = 256
#: ``tl.dot`` input precisions offered for float32 inputs: 3xTF32 (the default, close to full
#: float32) or 3xBF16 (each operand split into bf16 hi + lo, three bf16 products: ~1e-5 relative
#: operand error, about twice the tensor-core rate of 3xTF32).
FP32_PRECISIONS = ("tf32x3", "bf16x3")
#: Internal mode of the GKA readout (not offered by ``chunk_simple_gla``): float32 queries, states and
#: scores enter the dots as bf16 hi + lo, keys, values and the output gradient once as bf16, so
#: those three must hold bf16 values whatever their storage dtype. A product with one exact side
#: costs two bf16 dots instead of 3xBF16's three.
BF16_HILO = "bf16_hilo"


@dataclass(frozen=True)
class ChunkPlan:
    """Chunk bookkeeping of one call: ``num_chunks`` chunks over ``num_seqs`` sequences."""

    num_chunks: int
    num_seqs: int
    chunk_indices: torch.Tensor | None  # [num_chunks, 2] (sequence, local chunk) when varlen
    chunk_offsets: torch.Tensor | None  # [num_seqs + 1] first global chunk of each sequence
    cu_seqlens: torch.Tensor | None


def make_plan(batch: int, T: int, cu_seqlens: torch.Tensor | None) -> ChunkPlan:
    if cu_seqlens is None:
        return ChunkPlan(batch * triton.cdiv(T, BT), batch, None, None, None)
    indices = prepare_chunk_indices(cu_seqlens, BT)
    return ChunkPlan(indices.shape[0], cu_seqlens.numel() - 1, indices,
                     prepare_chunk_offsets(cu_seqlens, BT), cu_seqlens)


@dataclass(frozen=True)
class Precision:
    """How the kernels compute for one input dtype: ``acc`` (float32, float64 for gradcheck),
    ``dot`` (tensor-core operand dtype: bf16/fp16 inputs stay 16-bit), ``prec`` (``tl.dot``
    input precision: fp32 inputs use 3xTF32, which is close to full fp32), ``states`` (storage
    dtype of the per-chunk states and state gradients), ``split`` (``BF16_HILO``: float32-sourced
    operands enter as bf16 hi + lo, see ``common.split_dot``)."""

    acc: object
    dot: object
    prec: str
    states: torch.dtype
    split: bool = False


def precision_for(dtype: torch.dtype, fp32_precision: str = "tf32x3") -> Precision:
    """Kernel precision for inputs of ``dtype``; ``fp32_precision`` (one of ``FP32_PRECISIONS`` or
    ``BF16_HILO``) applies to float32 inputs only. The interpreter computes float32 dots exactly
    ("ieee"), does not accept "bf16x3" and runs ``BF16_HILO`` on float32 parts."""
    if dtype == torch.bfloat16:
        return Precision(tl.float32, tl.bfloat16, "ieee", torch.bfloat16)
    if dtype == torch.float16:
        return Precision(tl.float32, tl.float16, "ieee", torch.float16)
    if dtype == torch.float64:
        return Precision(tl.float64, tl.float64, "ieee", torch.float64)
    if fp32_precision == BF16_HILO:
        # The interpreter (Triton 3.7) multiplies bf16 tiles wrongly: there the parts stay float32
        # (the split is then exact); the bf16 rounding is exercised by the GPU tests.
        dot = tl.float32 if is_interpreter() else tl.bfloat16
        return Precision(compute_dtype(dtype), dot, "ieee", torch.float32, split=True)
    prec = "ieee" if fp32_precision == "bf16x3" and is_interpreter() else fp32_precision
    return Precision(compute_dtype(dtype), tl.float32, prec, torch.float32)


def gla_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    plan: ChunkPlan,
    v_scale: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    fp32_precision: str = "tf32x3",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Forward on contiguous, validated inputs. Returns ``(o, final_state or None, gc, ypre)``:
    ``gc`` the chunk-local cumsum of ``g`` (kept for backward), ``ypre`` the pre-gate output
    when ``z`` is given. ``v_scale [B,T,H]`` scales value rows per head; ``D`` ([H] or [H,V])
    adds ``D * v``; ``z [B,T,H,V]`` gates the output with ``silu(z)``. ``fp32_precision``: see
    :func:`precision_for`."""
    p = precision_for(q.dtype, fp32_precision)
    cu = plan.cu_seqlens
    gc = chunk_local_cumsum(g, BT, cu_seqlens=cu, chunk_indices=plan.chunk_indices)
    hs, ht = chunk_state_pass(
        k, v, gc, BT=BT, reverse=False, scale=scale, state_in=initial_state,
        store_final=output_final_state, states_dtype=p.states, v_scale=v_scale, cu_seqlens=cu,
        chunk_offsets=plan.chunk_offsets, num_chunks=plan.num_chunks, num_seqs=plan.num_seqs,
        acc=p.acc, dot_dtype=p.dot, precision=p.prec, split=p.split)
    o, ypre = chunk_fwd_o(
        q, k, v, gc, hs, scale=scale, BT=BT, num_chunks=plan.num_chunks, v_scale=v_scale, D=D, z=z,
        cu_seqlens=cu, chunk_indices=plan.chunk_indices, acc=p.acc, dot_dtype=p.dot,
        precision=p.prec, split=p.split)
    return o, ht, gc, ypre


def gla_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gc: torch.Tensor,
    do: torch.Tensor,
    *,
    dht: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    plan: ChunkPlan,
    v_scale: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    fp32_precision: str = "tf32x3",
    dk_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor | None]:
    """Backward of ``gla_forward`` (without the ``z`` gate: ``do`` is the gradient of the
    pre-gate output). Returns a dict with ``dq, dk, dv, dg`` (float32 [B,T,H], gradient of the
    raw ``g``), ``dh0`` (when ``initial_state`` is given), ``dvs`` (with ``v_scale``) and
    ``dD`` (with ``D``). ``dk`` is in ``dk_dtype`` (default: k's dtype; the GKA readout asks for
    float32 so that it can add the solve's key gradient before rounding)."""
    p = precision_for(q.dtype, fp32_precision)
    cu = plan.cu_seqlens
    common = dict(BT=BT, cu_seqlens=cu, acc=p.acc, dot_dtype=p.dot, precision=p.prec, split=p.split)
    hs, _ = chunk_state_pass(
        k, v, gc, reverse=False, scale=scale, state_in=initial_state, store_final=False,
        states_dtype=p.states, v_scale=v_scale, chunk_offsets=plan.chunk_offsets,
        num_chunks=plan.num_chunks, num_seqs=plan.num_seqs, **common)
    dhs, dh0 = chunk_state_pass(
        q, do, gc, reverse=True, scale=scale, state_in=dht, store_final=initial_state is not None,
        states_dtype=p.states, chunk_offsets=plan.chunk_offsets, num_chunks=plan.num_chunks,
        num_seqs=plan.num_seqs, **common)
    dv, dvs, dD = chunk_bwd_dv(
        q, k, v, gc, dhs, do, scale=scale, num_chunks=plan.num_chunks, v_scale=v_scale, D=D,
        chunk_indices=plan.chunk_indices, **common)
    dq, dk, dg = chunk_bwd_dqkg(
        q, k, v, gc, hs, dhs, do, scale=scale, num_chunks=plan.num_chunks, v_scale=v_scale,
        chunk_indices=plan.chunk_indices, dk_dtype=dk_dtype, **common)
    return {"dq": dq, "dk": dk, "dv": dv, "dg": dg, "dh0": dh0, "dvs": dvs, "dD": dD}


class ChunkSimpleGLAFunction(torch.autograd.Function):
    """Autograd wrapper of ``gla_forward`` / ``gla_backward`` (inputs already validated).

    The kernels convert every load, so callers may mix dtypes (float32 ``q, k`` with 16-bit ``v``:
    ``o`` and ``dv`` then take ``v``'s dtype); the kernels' dot precision follows ``q``'s dtype
    (``precision_for``). The GKA readout calls ``gla_forward`` / ``gla_backward`` directly (float32
    ``q``, ``k`` and ``v`` as given, float32 ``dk``) inside its own autograd node."""

    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, fp32_precision):
        plan = make_plan(q.shape[0], q.shape[1], cu_seqlens)
        o, ht, gc, _ = gla_forward(q, k, v, g, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, plan=plan,
                                   fp32_precision=fp32_precision)
        ctx.save_for_backward(q, k, v, gc, initial_state)
        ctx.plan, ctx.scale, ctx.g_dtype, ctx.fp32_precision = plan, scale, g.dtype, fp32_precision
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gc, initial_state = ctx.saved_tensors
        grads = gla_backward(q, k, v, gc, do.contiguous(),
                             dht=dht.contiguous() if dht is not None else None, scale=ctx.scale,
                             initial_state=initial_state, plan=ctx.plan,
                             fp32_precision=ctx.fp32_precision)
        dh0 = grads["dh0"].to(initial_state.dtype) if initial_state is not None else None
        return (grads["dq"], grads["dk"], grads["dv"], grads["dg"].to(ctx.g_dtype), None, dh0,
                None, None, None)


def _validate(q, k, v, g, initial_state, cu_seqlens) -> tuple[int, int]:
    """SPEC 2 checks; returns (H, N)."""
    q = check_activation("q", q, ndim=4)
    k = check_activation("k", k, ndim=4, device=q.device)
    v = check_activation("v", v, ndim=4, device=q.device)
    check_same_dtype("q", q, k=k, v=v)
    B, T, HQ, K = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != K:
        raise ValueError(f"k: expected shape [{B}, {T}, HK, {K}] to match q, got {list(k.shape)}")
    if v.shape[0] != B or v.shape[1] != T:
        raise ValueError(f"v: expected shape [{B}, {T}, HV, V] to match q, got {list(v.shape)}")
    H = max(HQ, k.shape[2], v.shape[2])
    check_head_groups(H, HQ, "the widest of q/k/v", "q")
    check_head_groups(H, k.shape[2], "the widest of q/k/v", "k")
    check_head_groups(H, v.shape[2], "the widest of q/k/v", "v")
    check_head_dim("q", K, MAX_HEAD_DIM)
    check_head_dim("v", v.shape[3], MAX_HEAD_DIM)
    check_tensor("g", g, ndim=3, device=q.device,
                 dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if tuple(g.shape) != (B, T, H):
        raise ValueError(f"g: expected shape [{B}, {T}, {H}] (H = max(HQ, HK, HV)), got {list(g.shape)}")
    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, batch=B, total_len=T, device=q.device)
    if initial_state is not None:
        check_state("initial_state", initial_state, (N, H, K, v.shape[3]), device=q.device)
    return H, N


def chunk_simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    fp32_precision: str = "tf32x3",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked simple gated linear attention (differentiable in every tensor argument).

    Args:
        q: ``[B, T, HQ, K]``; k: ``[B, T, HK, K]``; v: ``[B, T, HV, V]``, same dtype and device.
        g: ``[B, T, H]`` natural-log decays, ``H = max(HQ, HK, HV)``, each of HQ/HK/HV dividing H.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` float32 (``N = B``, or the number of sequences).
        output_final_state: also return the final states ``[N, H, K, V]`` (float32).
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of sequences packed along T (``B == 1``).
        fp32_precision: dot precision for float32 inputs, ``"tf32x3"`` (default) or ``"bf16x3"``
            (about twice as fast, ~1e-5 relative operand rounding); ignored for other dtypes.

    Returns ``(o [B, T, H, V] in q's dtype, final_state or None)``. Head dims up to 256.
    """
    H, N = _validate(q, k, v, g, initial_state, cu_seqlens)
    if fp32_precision not in FP32_PRECISIONS:
        raise ValueError(f"fp32_precision: expected one of {FP32_PRECISIONS}, got {fp32_precision!r}")
    K = q.shape[-1]
    scale = check_scale(scale, K)
    B, T = q.shape[:2]
    if T == 0:
        o = q.new_zeros(B, 0, H, v.shape[-1])
        if not output_final_state:
            return o, None
        final = initial_state.clone() if initial_state is not None else \
            q.new_zeros(N, H, K, v.shape[-1], dtype=torch.float32)
        return o, final
    g = g.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    o, ht = ChunkSimpleGLAFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), scale,
        initial_state.contiguous() if initial_state is not None else None,
        bool(output_final_state), cu_seqlens, fp32_precision)
    return o, ht
