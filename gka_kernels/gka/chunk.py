"""Chunked Gated KalmaNet (SPEC 5): ``chunk_gka``.

Pipeline (chunks of 64 tokens, per query head):

forward
  1. ``G = chunk_local_cumsum(gk)``;
  2. chunk-start states ``H_c`` (one sequential pass, :mod:`gka_kernels.gka.chunk_h`);
  3. per chunk: ``fro_t`` (three-term formula), ``x_t`` by ``num_iter`` Chebyshev iterations,
     ``qm = q + alpha (x - q)`` (:mod:`gka_kernels.gka.solve`);
  4. readout ``o = scale U^T qm`` = simple GLA with queries ``qm`` (``gka_kernels.gla``).

backward (implicit differentiation, SPEC 5)
  1. recompute ``H_c`` (on a side stream, beside the readout's backward: :func:`recompute_states`);
  2. adjoint solve ``dqs = A^{-1} alpha dqm`` and per-row scalars (solve backward kernel);
  3. per chunk (parallel): the chunk's contribution to the adjoint of ``H``
     (:mod:`gka_kernels.gka.chunk_dh`), and the key and decay gradients of the chunk's own tokens
     and start state (:mod:`gka_kernels.gka.chunk_dk`);
  4. reverse scan over chunks carrying the symmetric part of that adjoint; it adds the later
     chunks' part of the key and decay gradients (:mod:`gka_kernels.gka.chunk_dh`);
  5. ``dgk`` = reverse cumulative sum of the per-token decay gradient over each sequence.
  The readout's gradients (``dqm``, ``dk``, ``dv``, ``dg``, ``dh0_kv``) come from the GLA
  backward (``gla_backward``, run first: ``dqm`` is the solve's output gradient). Solve and
  readout are one autograd node (:class:`ChunkGkaFunction`): both read ``k`` as given, and their
  key gradients are summed in float32 with the group sum over query heads (``group_sum``).

Saved for backward by the solve (beyond the inputs ``q, k, gk, alpha`` and ``h_kk``'s initial and
final states): ``x`` (``K`` values) and ``fro`` per token and query head, plus the cumsum ``G``,
all float32 (float64 for float64 inputs) — ``4K + 8`` bytes per token and head (520 B at K = 128).
Chunk states are recomputed, never saved. The readout keeps ``qm`` (float32, ``4K`` bytes per
token and head), the cumsum of ``g`` and ``v`` as given.

Precision: the readout ``U^T qm`` cancels heavily (``|x|`` is ~20x ``|q|`` at ridge_ratio 0.02),
so rounding ``qm`` to bf16 alone costs ~1e-2 relative error in ``o``. For 16-bit inputs the solve
therefore writes ``x``/``qm`` in float32, the chunk states ``H_c`` accumulate in float32 and are
stored as float16 ``H_c / s_c`` (the solve's operand rounding, :mod:`gka_kernels.gka.chunk_h`), the
solve's dot operands are float16 on normalized quantities (``_common.solve_dot_dtype``), and the readout runs
the GLA kernels on float32 ``qm``: for bf16 inputs ``qm``, the states and the scores enter
its dots as bf16 hi + lo (about 16 significant bits: ~2^-16 relative error per product, ~3e-4 in
``o`` after the ~20x cancellation) and the exact bf16 keys, values and output gradient once
(``gla.chunk.BF16_HILO``); fp16 inputs use 3xBF16 dots (every operand split: fp16 values are not
exact in bf16). ``k`` and ``v`` are read in their own dtype and ``o`` is written in ``v``'s
(the GLA kernels convert every load). With
near-low-rank states most of ``x`` is orthogonal to the keys, so wherever ``x``, the adjoint
solution or the scores ``(x . k) M`` are later projected onto keys they enter the dot as fp16
hi + lo (``_common.split_hi_lo``), and the solve's and the readout's key gradients (which cancel
~7x) are summed in float32 before one rounding to ``k``'s dtype.
fp32 inputs use 3xTF32 dots throughout (readout included); float64 runs in float64 (gradcheck on
the CPU).
"""

from __future__ import annotations

import torch

from gka_kernels.common.checks import (
    check_gate, check_head_dim, check_positive_int, check_qkv, check_scale, check_state,
)
from gka_kernels.common.cumsum import chunk_local_cumsum, sequence_reverse_cumsum
from gka_kernels.common.group_sum import group_sum
from gka_kernels.common.streams import Pending, beside
from gka_kernels.gka._common import CHUNK, MAX_K
from gka_kernels.gka.chunk_dh import chunk_gka_bwd_dh, chunk_gka_bwd_ds
from gka_kernels.gka.chunk_dk import chunk_gka_bwd_dk
from gka_kernels.gka.chunk_h import chunk_gka_fwd_h
from gka_kernels.gka.solve import gka_solve_bwd, gka_solve_fwd
from gka_kernels.gla.chunk import BT as GLA_CHUNK, BF16_HILO, ChunkPlan, gla_backward, gla_forward, make_plan

# The solve and the readout share one chunk plan (``make_plan``): their chunks must be the same.
assert CHUNK == GLA_CHUNK, "GKA solve and GLA readout chunk lengths differ"

#: Largest ``num_iter`` accepted.
MAX_NUM_ITER = 64

_STATES = tuple[torch.Tensor, torch.Tensor]


def check_gka_inputs(q, k, v, g, gk, alpha, scale, ridge_ratio, num_iter, bp_lambda, initial_state,
                     output_final_state, cu_seqlens):
    """SPEC 2 / SPEC 5 validation shared by ``chunk_gka`` and ``fused_recurrent_gka``.

    Returns ``(dims, scale)``."""
    dims = check_qkv(q, k, v, cu_seqlens=cu_seqlens, max_head_dim=MAX_K)
    check_head_dim("k", dims.K, MAX_K)
    check_gate("g", g, dims, q)
    if gk is not None:
        check_gate("gk", gk, dims, q)
    if alpha is not None:
        check_gate("alpha", alpha, dims, q)
    scale = check_scale(scale, dims.K)
    if isinstance(ridge_ratio, bool) or not isinstance(ridge_ratio, (int, float)):
        raise TypeError(f"ridge_ratio: expected a float, got {type(ridge_ratio).__name__}")
    if not (0.0 < float(ridge_ratio) < float("inf")):
        raise ValueError(f"ridge_ratio: expected a finite number > 0, got {ridge_ratio}")
    check_positive_int("num_iter", num_iter, lo=1, hi=MAX_NUM_ITER)
    for name, flag in (("bp_lambda", bp_lambda), ("output_final_state", output_final_state)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise TypeError("initial_state: expected a pair (h_kk [N,H,K,K], h_kv [N,H,K,V]), got "
                            f"{type(initial_state).__name__}")
        check_state("initial_state[0] (h_kk)", initial_state[0], (dims.N, dims.H, dims.K, dims.K),
                    device=q.device)
        check_state("initial_state[1] (h_kv)", initial_state[1], (dims.N, dims.H, dims.K, dims.V),
                    device=q.device)
    return dims, scale


def solve_forward(
    q: torch.Tensor, k: torch.Tensor, gk: torch.Tensor, alpha: torch.Tensor | None,
    h0: torch.Tensor | None, ridge_ratio: float, num_iter: int, output_final_state: bool,
    plan: ChunkPlan,
) -> tuple[torch.Tensor, torch.Tensor | None, tuple]:
    """The ridge-solve half of GKA on the chunks of ``plan`` (``make_plan``; its 64-token chunks
    are the solve's): ``qm`` ``[B,T,H,K]`` (float32 for 16-bit inputs), the final ``h_kk`` (or
    None) and the tensors :func:`solve_backward` needs. ``k`` is read in ``q``'s dtype."""
    k = k.to(q.dtype)
    gcum = chunk_local_cumsum(gk, CHUNK, cu_seqlens=plan.cu_seqlens, chunk_indices=plan.chunk_indices)
    states, ht = chunk_gka_fwd_h(k, gcum, q.shape[2], plan.num_seqs, plan.num_chunks, h0,
                                 output_final_state, plan.cu_seqlens, plan.chunk_indices, plan.chunk_offsets)
    x, qm, fro = gka_solve_fwd(q, k, gcum, states, alpha, ridge_ratio, num_iter, plan.cu_seqlens,
                               plan.chunk_indices)
    return qm, ht, (q, k, gcum, alpha, h0, x, fro, ht)


def recompute_states(saved: tuple, plan: ChunkPlan) -> Pending:
    """The chunk-start states of ``H`` for :func:`solve_backward` (``saved`` from
    :func:`solve_forward`), recomputed on the side stream: a sequential pass that the backward
    overlaps with independent kernels (the readout's state passes). Its value is
    :func:`chunk_gka_fwd_h`'s."""
    q, k, gcum, h0 = saved[0], saved[1], saved[2], saved[4]
    return beside(chunk_gka_fwd_h, k, gcum, q.shape[2], plan.num_seqs, plan.num_chunks, h0, False,
                  plan.cu_seqlens, plan.chunk_indices, plan.chunk_offsets)


def solve_backward(
    saved: tuple, plan: ChunkPlan, states: Pending, dqm: torch.Tensor, dht: torch.Tensor | None,
    ridge_ratio: float, num_iter: int, bp_lambda: bool, need_dh0: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`solve_forward` (``saved`` is its third output, ``plan`` the same,
    ``states`` from :func:`recompute_states`) for the output gradients ``dqm`` and ``dht`` (or
    None): ``dq`` (q's dtype), the key gradient per *query* head ``[B,T,H,K]`` (float32/64; the
    caller sums each key head's group), ``dgk [B,T,H]`` (float32/64), ``dalpha`` (float32/64 or
    None) and the gradient of the initial ``h_kk`` (or None)."""
    q, k, gcum, alpha, h0, x, fro, ht = saved
    cu_seqlens, chunk_indices = plan.cu_seqlens, plan.chunk_indices
    states, _ = states.result()
    dq, dqs, dalpha, lam_c, beta, dgp = gka_solve_bwd(
        q, k, gcum, states, alpha, x, fro, dqm.contiguous(), ridge_ratio, num_iter, bp_lambda,
        cu_seqlens, chunk_indices)
    if dht is not None:
        dht = dht.contiguous()
    ds, dw = chunk_gka_bwd_ds(k, x, dqs, gcum, lam_c, beta, states, need_dh0, cu_seqlens, chunk_indices)
    dk_h, dgc = chunk_gka_bwd_dk(k, x, dqs, gcum, lam_c, beta, states, dgp, cu_seqlens, chunk_indices)
    dh0, dgc_later = chunk_gka_bwd_dh(k, gcum, ds, dw, dk_h, dgc, dht, plan.num_seqs, cu_seqlens,
                                      plan.chunk_offsets)
    # <dht, H_T> belongs to the decay gradient of every token of the sequence.
    final_term = (dht.to(ht.dtype) * ht).sum((-2, -1)) if dht is not None else None   # [N, H]
    dgk = sequence_reverse_cumsum(dgc, dgc_later, final_term, cu_seqlens)
    return dq, dk_h, dgk, dalpha, dh0


def _group_key_grad(dk_h: torch.Tensor, HKV: int, base: torch.Tensor | None,
                    dtype: torch.dtype) -> torch.Tensor:
    """``dk_h [B,T,H,K]`` summed over the query heads of each key head (plus ``base``), in ``dtype``."""
    B, T, H, K = dk_h.shape
    return group_sum(dk_h.view(B, T, HKV, H // HKV, K), base, dtype)


class ChunkGkaSolveFunction(torch.autograd.Function):
    """``(q, k, gk, alpha, h0_kk) -> (qm, h_kk final)``: the ridge-solve half of GKA alone (the
    tests check it against the solve reference; :class:`ChunkGkaFunction` is the whole layer)."""

    @staticmethod
    def forward(ctx, q, k, gk, alpha, h0, ridge_ratio, num_iter, bp_lambda, output_final_state,
                cu_seqlens):
        plan = make_plan(q.shape[0], q.shape[1], cu_seqlens)
        qm, ht, saved = solve_forward(q, k, gk, alpha, h0, ridge_ratio, num_iter, output_final_state, plan)
        ctx.save_for_backward(*saved)
        ctx.meta = (ridge_ratio, num_iter, bp_lambda, plan, k.dtype, gk.dtype)
        return qm, ht

    @staticmethod
    def backward(ctx, dqm, dht):
        ridge_ratio, num_iter, bp_lambda, plan, k_dtype, gk_dtype = ctx.meta
        saved = ctx.saved_tensors
        dq, dk_h, dgk, dalpha, dh0 = solve_backward(
            saved, plan, recompute_states(saved, plan), dqm, dht, ridge_ratio, num_iter, bp_lambda,
            ctx.needs_input_grad[4])
        k, alpha, h0 = saved[1], saved[3], saved[4]
        dk = _group_key_grad(dk_h, k.shape[2], None, k_dtype)
        return (dq, dk, dgk.to(gk_dtype), dalpha.to(alpha.dtype) if alpha is not None else None,
                dh0.to(h0.dtype) if dh0 is not None else None, None, None, None, None, None)


class ChunkGkaFunction(torch.autograd.Function):
    """``(q, k, v, g, gk, alpha, h0_kk, h0_kv) -> (o, h_kk final, h_kv final)``: the ridge solve
    followed by the GLA readout of ``qm``, one autograd node.

    Both halves read ``k`` as given (no float32 copy); their key gradients (float32, they cancel
    heavily) are summed before the one rounding to ``k``'s dtype. With ``gk`` None the decay
    gradients of the readout and of the solve are summed in float32 as well.

    The backward recomputes the solve's chunk states on a side stream
    (:mod:`gka_kernels.common.streams`) while the readout's backward runs (its two state passes are
    sequential too); everything else runs on the current stream."""

    @staticmethod
    def forward(ctx, q, k, v, g, gk, alpha, h0_kk, h0_kv, scale, ridge_ratio, num_iter, bp_lambda,
                output_final_state, cu_seqlens):
        plan = make_plan(q.shape[0], q.shape[1], cu_seqlens)
        qm, ht_kk, saved = solve_forward(q, k, g if gk is None else gk, alpha, h0_kk, ridge_ratio,
                                         num_iter, output_final_state, plan)
        # qm is float32 for 16-bit inputs (see the module docstring): read out from float32
        # queries. k and v stay in their dtype (o and dv come out in v's). bf16 inputs: k, v and do
        # hold bf16 values, so only qm, the states and the scores need hi + lo (BF16_HILO); fp16
        # values are not exact in bf16 (3xBF16 splits everything); float32 inputs keep 3xTF32.
        mode = {torch.bfloat16: BF16_HILO, torch.float16: "bf16x3"}.get(q.dtype, "tf32x3")
        o, ht_kv, gc, _ = gla_forward(qm, k, v, g.to(qm.dtype), scale=scale, initial_state=h0_kv,
                                      output_final_state=output_final_state, plan=plan,
                                      fp32_precision=mode)
        ctx.save_for_backward(*saved, qm, v, gc, h0_kv)
        ctx.meta = (scale, ridge_ratio, num_iter, bp_lambda, mode, plan, g.dtype,
                    None if gk is None else gk.dtype)
        return o, ht_kk, ht_kv

    @staticmethod
    def backward(ctx, do, dht_kk, dht_kv):
        scale, ridge_ratio, num_iter, bp_lambda, mode, plan, g_dtype, gk_dtype = ctx.meta
        *saved, qm, v, gc, h0_kv = ctx.saved_tensors
        k, alpha, h0_kk = saved[1], saved[3], saved[4]
        states = recompute_states(saved, plan)
        readout = gla_backward(qm, k, v, gc, do.contiguous(),
                               dht=dht_kv.contiguous() if dht_kv is not None else None, scale=scale,
                               initial_state=h0_kv, plan=plan, fp32_precision=mode, dk_dtype=qm.dtype)
        dq, dk_h, dgk, dalpha, dh0_kk = solve_backward(saved, plan, states, readout["dq"], dht_kk,
                                                       ridge_ratio, num_iter, bp_lambda,
                                                       ctx.needs_input_grad[6])
        dk = _group_key_grad(dk_h, k.shape[2], readout["dk"], k.dtype)
        dg = readout["dg"]
        if gk_dtype is None:
            dg, dgk = dg + dgk, None
        else:
            dgk = dgk.to(gk_dtype)
        return (dq, dk, readout["dv"], dg.to(g_dtype), dgk,
                dalpha.to(alpha.dtype) if alpha is not None else None,
                dh0_kk.to(h0_kk.dtype) if dh0_kk is not None else None,
                readout["dh0"].to(h0_kv.dtype) if h0_kv is not None else None,
                None, None, None, None, None, None)


def chunk_gka(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    gk: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    scale: float | None = None,
    ridge_ratio: float = 0.02,
    num_iter: int = 30,
    bp_lambda: bool = True,
    initial_state: _STATES | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, _STATES | None]:
    """Gated KalmaNet, chunked (training and prefill; differentiable in every tensor argument).

    Per query head: ``H_t = exp(gk_t) H_{t-1} + k_t k_t^T``, ``U_t = exp(g_t) U_{t-1} + k_t v_t^T``,
    ``x_t = Chebyshev(H_t + ridge_ratio ||H_t||_F I, q_t, num_iter)``, ``qm = q + alpha (x - q)``,
    ``o_t = scale U_t^T qm_t`` (SPEC 5). The backward pass is implicit differentiation.

    Args:
        q: ``[B, T, H, K]`` queries (already L2-normalized), ``K <= 128``.
        k: ``[B, T, HKV, K]`` keys (normalized, beta-scaled), ``H % HKV == 0``.
        v: ``[B, T, HKV, V]`` values (beta-scaled), ``V <= 128``.
        g: ``[B, T, H]`` log-decay of ``U`` (``<= 0``).
        gk: ``[B, T, H]`` log-decay of ``H``; None: ``gk = g``.
        alpha: ``[B, T, H]``; None means 1 (``qm = x``).
        scale: default ``K ** -0.5``.
        ridge_ratio: ``> 0``; ``lam_t = ridge_ratio * ||H_t||_F``.
        num_iter: Chebyshev iterations, 1..64.
        bp_lambda: backpropagate through ``lam_t``'s dependence on ``H_t``.
        initial_state: ``(h_kk [N, H, K, K], h_kv [N, H, K, V])`` float32; ``h_kk`` symmetric.
        output_final_state: return the final ``(h_kk, h_kv)`` (float32).
        cu_seqlens: ``[N + 1]`` offsets of sequences packed along T (``B == 1``).

    Returns:
        ``o [B, T, H, V]`` (dtype of ``q``) and the final states or None.
    """
    dims, scale = check_gka_inputs(q, k, v, g, gk, alpha, scale, ridge_ratio, num_iter, bp_lambda,
                                   initial_state, output_final_state, cu_seqlens)
    h0_kk, h0_kv = initial_state if initial_state is not None else (None, None)
    if dims.T == 0:
        o = q.new_zeros(dims.B, 0, dims.H, dims.V)
        if not output_final_state:
            return o, None
        state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        if initial_state is not None:
            return o, (h0_kk.clone(), h0_kv.clone())
        return o, (q.new_zeros(dims.N, dims.H, dims.K, dims.K, dtype=state_dtype),
                   q.new_zeros(dims.N, dims.H, dims.K, dims.V, dtype=state_dtype))
    return chunk_gka_unchecked(q, k, v, g, gk, alpha, scale, float(ridge_ratio), num_iter, bp_lambda,
                               initial_state, output_final_state, cu_seqlens)


def chunk_gka_unchecked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, gk: torch.Tensor | None,
    alpha: torch.Tensor | None, scale: float, ridge_ratio: float, num_iter: int, bp_lambda: bool,
    initial_state: _STATES | None, output_final_state: bool, cu_seqlens: torch.Tensor | None,
) -> tuple[torch.Tensor, _STATES | None]:
    """:func:`chunk_gka` after its input checks (``T > 0``, ``scale`` resolved). Called directly only
    by tests that run the 16-bit path in the interpreter, which the public op refuses on CPU."""
    h0_kk, h0_kv = initial_state if initial_state is not None else (None, None)
    o, ht_kk, ht_kv = ChunkGkaFunction.apply(
        q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(),
        gk.contiguous() if gk is not None else None, alpha.contiguous() if alpha is not None else None,
        h0_kk.contiguous() if h0_kk is not None else None,
        h0_kv.contiguous() if h0_kv is not None else None,
        scale, ridge_ratio, num_iter, bp_lambda, output_final_state, cu_seqlens)
    return o, ((ht_kk, ht_kv) if output_final_state else None)
