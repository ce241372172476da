"""``chunk_gated_delta_rule``: the chunked forward and backward as one ``autograd.Function``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from gka_kernels.common.cumsum import chunk_local_cumsum
from gka_kernels.common.group_sum import group_sum
from gka_kernels.common.triton_utils import compute_dtype
from gka_kernels.common.varlen import prepare_chunk_indices, prepare_chunk_offsets
from gka_kernels.gdn.inputs import check_inputs
from gka_kernels.gdn.l2norm import l2norm_backward, l2norm_scale
from gka_kernels.gdn.output import dqkw, dv_local, output_forward
from gka_kernels.gdn.state import state_backward, state_forward
from gka_kernels.gdn.wy import wy_forward
from gka_kernels.gdn.wy_backward import wy_backward


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that is fixed by its shapes and dtypes."""

    BT: int
    N: int
    n_chunks: int  # chunks over all sequences (per head)
    n_chunks_seq: int  # grid size along chunks: chunks per sequence, or all chunks when varlen
    acc: tl.dtype  # accumulation dtype (float32, float64 for float64 inputs)
    dot: tl.dtype  # tl.dot operand dtype (the input dtype when 16-bit)
    store: torch.dtype  # dtype of stored intermediates (w, u, h, v_new, ...)
    state: torch.dtype  # dtype of returned final states


def _plan(q: torch.Tensor, N: int, chunk_size: int, chunk_indices: torch.Tensor | None) -> _Plan:
    B, T = q.shape[:2]
    acc = compute_dtype(q.dtype)
    sixteen = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    dot = sixteen.get(q.dtype, acc)
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    store = q.dtype if q.dtype in sixteen else wide
    if chunk_indices is not None:
        n_chunks = n_chunks_seq = chunk_indices.shape[0]
    else:
        n_chunks_seq = triton.cdiv(T, chunk_size)
        n_chunks = B * n_chunks_seq
    return _Plan(BT=chunk_size, N=N, n_chunks=n_chunks, n_chunks_seq=n_chunks_seq, acc=acc, dot=dot,
                 store=store, state=wide)


def _chunk_forward(k, v, g, beta, rk, initial_state, output_final_state, cu_seqlens, chunk_indices,
                   chunk_offsets, p: _Plan, store_t: bool = False, G=None, Tm=None):
    """Chunk-local quantities and chunk states: ``(G, Tm or None, w, u, h, v_new, final_state)``.
    ``G`` and ``Tm`` saved by the forward are reused rather than recomputed; ``store_t`` keeps
    ``Tm`` (in the 16-bit input dtype, like ``w`` and ``u``) for the backward."""
    if G is None:
        G = chunk_local_cumsum(g, p.BT, cu_seqlens=cu_seqlens, chunk_indices=chunk_indices)
    Tm, w, u = wy_forward(k, v, beta, G, rk, cu_seqlens, chunk_indices, p.n_chunks_seq, p.BT, p.store, p.acc,
                          p.dot, store_t=store_t, Tm=Tm)
    h, vn, ht = state_forward(k, w, u, G, rk, initial_state, output_final_state, cu_seqlens, chunk_offsets,
                              p.n_chunks, p.BT, p.N, p.state, p.acc, p.dot)
    return G, Tm, w, u, h, vn, ht


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Chunked gated delta rule. Saves the inputs, the chunk-local cumulative decays ``G``, the
    inverse norms ``rq``/``rk`` and ``Tm`` (the per-chunk ``(I + A)^-1``, the only part of the WY
    representation that needs a sequential solve); the backward recomputes ``w``, ``u`` and the
    chunk states from them. Saved bytes per token beyond the inputs, per query head: ``BT``
    (64) values of ``Tm`` in the input dtype (128 B in 16-bit) plus 12 B of ``G``/``rq``/``rk``
    (float32)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm, cu_seqlens,
                chunk_indices, chunk_offsets, plan):
        rq, rk = (l2norm_scale(q), l2norm_scale(k)) if use_qk_l2norm else (None, None)
        G, Tm, _, _, h, vn, ht = _chunk_forward(k, v, g, beta, rk, initial_state, output_final_state, cu_seqlens,
                                                chunk_indices, chunk_offsets, plan,
                                                store_t=any(ctx.needs_input_grad))
        o = output_forward(q, k, vn, h, G, rq, rk, scale, cu_seqlens, chunk_indices, plan.n_chunks_seq, plan.BT,
                           plan.acc, plan.dot)
        ctx.save_for_backward(q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, chunk_offsets, G, Tm,
                              rq, rk)
        ctx.scale, ctx.use_qk_l2norm, ctx.plan = scale, use_qk_l2norm, plan
        return o, ht

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state, cu_seqlens, chunk_indices, chunk_offsets, G, Tm, rq, rk = ctx.saved_tensors
        p, scale = ctx.plan, ctx.scale
        do = do.contiguous()
        dht = dht.contiguous() if dht is not None else None
        G, Tm, w, u, h, vn, _ = _chunk_forward(k, v, g, beta, rk, initial_state, False, cu_seqlens, chunk_indices,
                                               chunk_offsets, p, G=G, Tm=Tm)
        dvl = dv_local(q, k, G, rq, rk, do, scale, cu_seqlens, chunk_indices, p.n_chunks_seq, p.BT, p.store,
                       p.acc, p.dot)
        need_dh0 = initial_state is not None and ctx.needs_input_grad[6]
        dh, dvn, dh0 = state_backward(q, k, w, G, rq, rk, do, dvl, dht, initial_state, need_dh0, cu_seqlens,
                                      chunk_offsets, p.n_chunks, p.BT, p.N, scale, p.acc, p.dot)
        # with the L2 norm, dq/dk are first gradients w.r.t. the normalized vectors (kept in float32)
        dq_dtype = p.state if ctx.use_qk_l2norm else q.dtype
        dq, dk_part, dw, dG_part = dqkw(q, k, h, dh, vn, do, dvn, G, rq, rk, scale, cu_seqlens, chunk_indices,
                                        p.n_chunks_seq, p.BT, dq_dtype, p.store, p.acc, p.dot)
        dk_dtype = p.state if ctx.use_qk_l2norm else k.dtype
        dk, dv, dbeta, dg = wy_backward(k, v, beta, G, rk, Tm, w, u, dw, dvn, dk_part, dG_part, cu_seqlens,
                                        chunk_indices, p.n_chunks_seq, p.BT, dk_dtype, g.dtype, p.acc, p.dot)
        # with grouped heads dk is per query head [B,T,H,K] and still lacks dk_part: sum the groups
        # (inside the L2-norm backward when there is one)
        B, T, HKV, K = k.shape
        group = q.shape[2] // HKV
        base = dk_part if group > 1 else None
        if ctx.use_qk_l2norm:
            dq = l2norm_backward(q, dq, q.dtype)
            dk = l2norm_backward(k, dk, k.dtype, base)
        elif base is not None:
            dk = group_sum(dk.view(B, T, HKV, group, K), base, k.dtype)
        return dq, dk, dv, dg, dbeta, None, dh0, None, None, None, None, None, None


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    *,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule over whole sequences, chunked (SPEC 3); differentiable.

    Per query head ``h`` (key/value head ``h // (H // HKV)``), with a ``[K, V]`` state ``S``::

        S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t

    Args:
        q: ``[B, T, H, K]`` queries (float32/float16/bfloat16 on GPU, float32/float64 on CPU).
        k: ``[B, T, HKV, K]`` keys, ``H % HKV == 0``, same dtype as ``q``.
        v: ``[B, T, HKV, V]`` values, same dtype as ``q``. ``K, V <= 256``.
        g: ``[B, T, H]`` natural-log decays (``<= 0``), any float dtype (used in float32).
        beta: ``[B, T, H]`` step sizes (post-sigmoid), any float dtype.
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` float32 (float32 or float64 for float64 inputs), where
            ``N = B``, or the number of sequences when ``cu_seqlens`` is given. Receives gradients.
        output_final_state: also return the final states ``[N, H, K, V]`` (float32; float64 for
            float64 inputs); gradients flow back through them.
        use_qk_l2norm_in_kernel: divide ``q`` and ``k`` by ``sqrt(sum(x^2) + 1e-6)`` per head first.
        cu_seqlens: ``[N + 1]`` int32/int64 offsets of sequences packed along ``T`` (``B == 1``).
        chunk_size: tokens per chunk: 64 on the GPU; 16 or 32 are accepted on the CPU for tests.

    Returns:
        ``(o, final_state)``: ``o`` ``[B, T, H, V]`` in the dtype of ``q``; ``final_state`` or ``None``.
    """
    dims, scale, initial_state, cu_seqlens = check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens,
                                                          chunk_size)
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if dims.T == 0:
        o = q.new_zeros(dims.B, 0, dims.H, dims.V)
        if not output_final_state:
            return o, None
        if initial_state is None:
            return o, q.new_zeros(dims.N, dims.H, dims.K, dims.V, dtype=state_dtype)
        return o, initial_state.to(state_dtype, copy=True)
    chunk_indices = chunk_offsets = None
    if cu_seqlens is not None:
        chunk_indices = prepare_chunk_indices(cu_seqlens, chunk_size)
        chunk_offsets = prepare_chunk_offsets(cu_seqlens, chunk_size)
    plan = _plan(q, dims.N, chunk_size, chunk_indices)
    return ChunkGatedDeltaRuleFunction.apply(q, k, v, g, beta, scale, initial_state, bool(output_final_state),
                                             bool(use_qk_l2norm_in_kernel), cu_seqlens, chunk_indices,
                                             chunk_offsets, plan)
