"""Chunked Mamba-2 SSD on the simple-GLA kernels (drop-in for ``mamba_ssm``'s
``mamba_chunk_scan_combined``).

Per head, Mamba-2's recurrence ``s_t = exp(dt'_t A) s_{t-1} + dt'_t x_t B_t^T`` (state
``[P, N]``), ``y_t = s_t C_t`` is simple GLA with ``q = C``, ``k = B`` (G heads each),
``v = dt' * x`` (H heads), ``g = dt' * A``, ``scale = 1`` and the state transposed (GLA keeps
``[K, V] = [N, P]``). The GLA kernels take ``dt'`` as a per-token value scale (so ``dt' * x`` is
never written to memory) and fuse ``+ D * x`` and ``* silu(z)`` into the output tile. The
effective step ``dt'`` and ``g`` come from one fused elementwise kernel (``mamba2.dt``).
"""

from __future__ import annotations

import math

import torch

from gka_kernels.common.checks import (
    check_activation, check_cu_seqlens, check_head_dim, check_head_groups, check_positive_int,
    check_same_dtype, check_shape_in, check_state, check_tensor,
)
from gka_kernels.gla.chunk import MAX_HEAD_DIM, gla_backward, gla_forward, make_plan
from gka_kernels.mamba2.dt import dt_prep
from gka_kernels.mamba2.gate import gate_backward

#: dtypes accepted for dt and the per-head parameters (A, D, dt_bias).
PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class SSDFunction(torch.autograd.Function):
    """``y, final = SSD(x, dt', g = dt' A, B, C, D, z, h0)`` with ``h0``/``final`` in GLA layout
    ``[Ns, H, N, P]``; inputs validated and contiguous."""

    @staticmethod
    def forward(ctx, x, dtp, g, Bm, Cm, D, z, h0, cu_seqlens, output_final_state):
        plan = make_plan(x.shape[0], x.shape[1], cu_seqlens)
        y, ht, gc, ypre = gla_forward(Cm, Bm, x, g, scale=1.0, initial_state=h0,
                                      output_final_state=output_final_state, plan=plan,
                                      v_scale=dtp, D=D, z=z)
        ctx.save_for_backward(x, dtp, gc, Bm, Cm, D, z, ypre, h0)
        ctx.plan = plan
        return y, ht

    @staticmethod
    def backward(ctx, dy, dht):
        x, dtp, gc, Bm, Cm, D, z, ypre, h0 = ctx.saved_tensors
        dz = None
        if z is not None:
            dy, dz = gate_backward(dy, z, ypre)
        dht = dht.contiguous() if dht is not None else None
        grads = gla_backward(Cm, Bm, x, gc, dy.contiguous(), dht=dht, scale=1.0, initial_state=h0,
                             plan=ctx.plan, v_scale=dtp, D=D)
        dD = grads["dD"].to(D.dtype) if D is not None else None
        dh0 = grads["dh0"].to(h0.dtype) if h0 is not None else None
        return (grads["dv"], grads["dvs"], grads["dg"], grads["dk"], grads["dq"], dD, dz, dh0,
                None, None)


def _segments_from_seq_idx(seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed-sequence boundaries of ``seq_idx [B, T]`` flattened to one row of ``B*T`` tokens:
    a segment starts at every row start and wherever ``seq_idx`` changes. Returns
    ``(cu_seqlens [S+1] int64, row_of_segment [S])`` on the host."""
    Bsz, T = seq_idx.shape
    host = seq_idx.detach().to("cpu", torch.int64)
    change = torch.ones(Bsz, T, dtype=torch.bool)
    change[:, 1:] = host[:, 1:] != host[:, :-1]
    starts = torch.nonzero(change.reshape(-1)).flatten()
    cu = torch.cat([starts, torch.tensor([Bsz * T])])
    return cu, starts // T


def mamba_chunk_scan_combined(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
):
    """Mamba-2 SSD over whole sequences (differentiable in every tensor argument).

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]`` (negative); B, C: ``[B, T, G, N]``
            with ``H % G == 0``; D: ``[H]`` or ``[H, P]``; z: ``[B, T, H, P]``; dt_bias: ``[H]``.
        chunk_size: a power of two (mamba_ssm uses 64/128/256). The result does not depend on it:
            the kernels always work on 64-token chunks.
        initial_states: float32 ``[B, H, P, N]``, or ``[Ns, H, P, N]`` (one per sequence) with
            ``cu_seqlens``.
        seq_idx: ``[B, T]`` sequence id of every token (mamba_ssm's packing). Without
            ``cu_seqlens`` the state restarts from zero wherever the id changes inside a row;
            ``initial_states[b]`` seeds row ``b``'s first sequence and ``final_states[b]`` is the
            state at the end of row ``b``. With ``cu_seqlens`` it must agree with it.
        cu_seqlens: ``[Ns + 1]`` offsets of sequences packed along T (``B == 1``).
        dt_softplus, dt_limit: ``dt' = clamp(softplus?(dt + dt_bias), *dt_limit)``.

    Returns ``y [B, T, H, P]`` (x's dtype), plus ``final_states`` (float32 ``[B, H, P, N]``, or
    ``[Ns, H, P, N]`` per sequence with ``cu_seqlens``) when ``return_final_states``, plus
    ``varlen_states [Ns, H, P, N]`` when ``return_varlen_states`` (requires ``cu_seqlens``), in
    mamba_ssm's order ``(y, final_states, varlen_states)``.
    """
    x = check_activation("x", x, ndim=4)
    dev = x.device
    Bsz, T, H, P = x.shape
    B = check_activation("B", B, ndim=4, device=dev)
    C = check_activation("C", C, ndim=4, device=dev)
    check_same_dtype("x", x, B=B, C=C)
    G, N = B.shape[2], B.shape[3]
    if tuple(B.shape[:2]) != (Bsz, T):
        raise ValueError(f"B: expected shape [{Bsz}, {T}, G, N] to match x, got {list(B.shape)}")
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(f"C: expected shape {list(B.shape)} (the shape of B), got {list(C.shape)}")
    check_head_groups(H, G, "x", "B")
    check_head_dim("x", P, MAX_HEAD_DIM)
    check_head_dim("B", N, MAX_HEAD_DIM)
    check_tensor("dt", dt, shape=(Bsz, T, H), dtypes=PARAM_DTYPES, device=dev)
    check_shape_in("A", A, [(H,)], dtypes=PARAM_DTYPES, device=dev)
    if D is not None:
        check_shape_in("D", D, [(H,), (H, P)], dtypes=PARAM_DTYPES, device=dev)
    if dt_bias is not None:
        check_shape_in("dt_bias", dt_bias, [(H,)], dtypes=PARAM_DTYPES, device=dev)
    if z is not None:
        z = check_activation("z", z, ndim=4, device=dev)
        check_same_dtype("x", x, z=z)
        if tuple(z.shape) != tuple(x.shape):
            raise ValueError(f"z: expected shape {list(x.shape)} (the shape of x), got {list(z.shape)}")
    chunk_size = check_positive_int("chunk_size", chunk_size)
    if chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size: expected a power of two, got {chunk_size}")
    if not (isinstance(dt_limit, (tuple, list)) and len(dt_limit) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in dt_limit)
            and dt_limit[0] <= dt_limit[1]):
        raise ValueError(f"dt_limit: expected a pair (lo, hi) of numbers with lo <= hi, got {dt_limit!r}")

    rows = None  # row of every segment when seq_idx packs several sequences per row
    if seq_idx is not None:
        check_tensor("seq_idx", seq_idx, shape=(Bsz, T), dtypes=(torch.int32, torch.int64), device=dev)
    if cu_seqlens is not None:
        Ns = check_cu_seqlens(cu_seqlens, batch=Bsz, total_len=T, device=dev)
        if seq_idx is not None:
            derived, _ = _segments_from_seq_idx(seq_idx)
            given = torch.unique_consecutive(cu_seqlens.detach().to("cpu", torch.int64))
            if not torch.equal(derived, given):
                raise ValueError(f"seq_idx: sequence boundaries {derived.tolist()} disagree with "
                                 f"cu_seqlens {cu_seqlens.tolist()}")
    elif seq_idx is not None:
        if return_varlen_states:
            raise ValueError("return_varlen_states: requires cu_seqlens")
        cu_seqlens, rows = _segments_from_seq_idx(seq_idx)
        cu_seqlens = cu_seqlens.to(dev)
        Ns = Bsz
    else:
        if return_varlen_states:
            raise ValueError("return_varlen_states: requires cu_seqlens")
        Ns = Bsz
    if initial_states is not None:
        check_state("initial_states", initial_states, (Ns, H, P, N), device=dev)

    if T == 0:
        final = initial_states.clone() if initial_states is not None else \
            x.new_zeros(Ns, H, P, N, dtype=torch.float32)
        return _pack(x.new_zeros(x.shape), final, return_final_states, return_varlen_states)
    fdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    dtp, g = dt_prep(dt.to(fdt) if fdt == torch.float64 else dt, dt_bias, A.contiguous(),
                     dt_softplus, dt_limit)
    h0 = initial_states.transpose(-1, -2) if initial_states is not None else None
    want_final = bool(return_final_states or return_varlen_states)
    xs, Bs, Cs, zs, dts, gs = x, B, C, z, dtp, g
    if rows is not None:
        # seq_idx packing: one row of B*T tokens, one segment per (row, sequence id) run
        S = cu_seqlens.numel() - 1
        flat = lambda t: t.reshape(1, Bsz * T, *t.shape[2:]) if t is not None else None  # noqa: E731
        xs, Bs, Cs, zs, dts, gs = (flat(t) for t in (x, B, C, z, dtp, g))
        if h0 is not None:  # row b's state seeds its first segment; later segments start at 0
            first = torch.searchsorted(rows, torch.arange(Bsz)).to(dev)
            h0 = h0.new_zeros(S, H, N, P).index_copy(0, first, h0)
    y, ht = SSDFunction.apply(
        xs.contiguous(), dts.contiguous(), gs.contiguous(), Bs.contiguous(), Cs.contiguous(),
        D.contiguous() if D is not None else None, zs.contiguous() if zs is not None else None,
        h0.contiguous() if h0 is not None else None, cu_seqlens, want_final)
    y = y.view(x.shape)
    final = None
    if want_final:
        if rows is not None:
            last = torch.searchsorted(rows, torch.arange(Bsz), right=True) - 1
            ht = ht.index_select(0, last.to(dev))
        final = ht.transpose(-1, -2).contiguous()
    return _pack(y, final, return_final_states, return_varlen_states)


def _pack(y, final, return_final_states, return_varlen_states):
    """mamba_ssm's return convention: ``y``, or a tuple ``(y, [final_states], [varlen_states])``."""
    if not return_final_states and not return_varlen_states:
        return y
    out = (y,)
    if return_final_states:
        out += (final,)
    if return_varlen_states:
        out += (final,)
    return out
