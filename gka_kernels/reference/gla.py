"""Simple gated linear attention, token by token (the oracle for ``gka_kernels.gla``).

Per head ``h`` (``H = max(HQ, HK, HV)``), with a ``[K, V]`` state ``S``:

    S_t = exp(g_t) S_{t-1} + k_t v_t^T
    o_t = scale * S_t^T q_t

Head ``h`` reads query head ``h // (H // HQ)``, key head ``h // (H // HK)`` and value head
``h // (H // HV)``.
"""

from __future__ import annotations

import torch

from gka_kernels.reference._common import compute_dtype, spans


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    """``[..., Hx, D] -> [..., H, D]`` by repeating each head ``H // Hx`` times (reference only)."""
    return x.repeat_interleave(H // x.shape[-2], dim=-2)


def simple_gla_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference simple GLA.

    Args:
        q: ``[B, T, HQ, K]``; k: ``[B, T, HK, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, H]`` log decays.
        scale: defaults to ``K ** -0.5``.
        initial_state: ``[N, H, K, V]`` (``N = B``, or the number of sequences with ``cu_seqlens``).
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (``B == 1``).

    Computes in float64 when any input is float64, else float32; differentiable with autograd.
    Returns ``o [B, T, H, V]`` in ``q``'s dtype and the final states ``[N, H, K, V]`` (compute
    dtype) when ``output_final_state``.
    """
    B, T, _, K = q.shape
    H = max(q.shape[2], k.shape[2], v.shape[2], g.shape[2])
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dt = compute_dtype(q, k, v, g, initial_state)
    qe = _expand_heads(q.to(dt), H)
    ke = _expand_heads(k.to(dt), H)
    ve = _expand_heads(v.to(dt), H)
    ge = g.to(dt)
    outs, finals = [], []
    for i, (b, start, end) in enumerate(spans(B, T, cu_seqlens)):
        if initial_state is not None:
            S = initial_state[i].to(dt)
        else:
            S = torch.zeros(H, K, V, dtype=dt, device=q.device)
        o_seq = []
        for t in range(start, end):
            S = torch.exp(ge[b, t])[:, None, None] * S + ke[b, t][:, :, None] * ve[b, t][:, None, :]
            o_seq.append(scale * torch.einsum("hkv,hk->hv", S, qe[b, t]))
        outs.append(torch.stack(o_seq, 0) if o_seq else qe.new_zeros(0, H, V))
        finals.append(S)
    if cu_seqlens is None:
        o = torch.stack(outs, 0)
    else:
        o = torch.cat(outs, 0)[None]
    final = torch.stack(finals, 0) if output_final_state else None
    return o.to(q.dtype), final
