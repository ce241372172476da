"""Gated DeltaNet reference (SPEC 3): a token-by-token loop written from the math.

Per query head ``h`` (key/value head ``h // (H // HKV)``), with state ``S`` of shape ``[K, V]``::

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = scale * S_t^T q_t

Readable and slow: one step per token for all heads at once. It computes in float64 when ``q`` is
float64 and in float32 otherwise, is differentiable with autograd (no in-place updates), and is
the oracle every GDN test compares against.
"""

from __future__ import annotations

import torch

from gka_kernels.reference._common import spans

L2NORM_EPS = 1e-6


def l2norm_ref(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dimension."""
    return x / torch.sqrt((x * x).sum(-1, keepdim=True) + eps)


def _recurrence(q, k, v, g, beta, scale, state):
    """One sequence, all heads. q, k: [T, H, K]; v: [T, H, V]; g, beta: [T, H]; state: [H, K, V]."""
    outs = []
    for t in range(q.shape[0]):
        state = state * torch.exp(g[t])[:, None, None]
        kv = torch.einsum("hk,hkv->hv", k[t], state)
        state = state + (beta[t][:, None, None] * k[t][:, :, None]) * (v[t] - kv)[:, None, :]
        outs.append(torch.einsum("hk,hkv->hv", q[t], state) * scale)
    out = torch.stack(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    return out, state


def gated_delta_rule_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated delta rule, token by token.

    Args:
        q: ``[B, T, H, K]`` queries.
        k: ``[B, T, HKV, K]`` keys, ``H % HKV == 0``.
        v: ``[B, T, HKV, V]`` values.
        g: ``[B, T, H]`` natural-log decays (``<= 0``).
        beta: ``[B, T, H]`` delta-rule step sizes (post-sigmoid).
        scale: output scale, default ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``N = B``, or the number of sequences with ``cu_seqlens``).
        output_final_state: also return the ``[N, H, K, V]`` final states.
        use_qk_l2norm: divide ``q`` and ``k`` by ``sqrt(sum(x^2) + 1e-6)`` per head first.
        cu_seqlens: ``[N + 1]`` offsets of sequences packed along ``T`` (requires ``B == 1``).

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, T, H, V]``, ``final_state`` is ``[N, H, K, V]`` or ``None``.
        Both are float64 for float64 ``q`` and float32 otherwise.
    """
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, T, H, K = q.shape
    HKV, V = v.shape[2], v.shape[3]
    group = H // HKV
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm_ref(q), l2norm_ref(k)
    k = k.repeat_interleave(group, dim=2)
    v = v.repeat_interleave(group, dim=2)
    outs, finals = [], []
    for n, (b, start, end) in enumerate(spans(B, T, cu_seqlens)):
        if initial_state is None:
            state = q.new_zeros(H, K, V)
        else:
            state = initial_state[n].to(dtype)
        o, state = _recurrence(q[b, start:end], k[b, start:end], v[b, start:end],
                               g[b, start:end], beta[b, start:end], scale, state)
        outs.append(o)
        finals.append(state)
    if cu_seqlens is None:
        o = torch.stack(outs, 0)
    else:
        o = torch.cat(outs, 0)[None]
    final = torch.stack(finals, 0) if output_final_state else None
    return o, final
