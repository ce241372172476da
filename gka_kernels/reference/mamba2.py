"""Mamba-2 SSD, token by token from the math (SPEC 4); the oracle for ``gka_kernels.mamba2``.

Per head ``h`` (group ``h // (H // G)`` for ``B`` and ``C``), state ``s`` of shape ``[P, N]``:

    dt_t = dt_t + dt_bias_h ; dt_t = softplus(dt_t) if dt_softplus ; dt_t = clamp(dt_t, *dt_limit)
    s_t  = exp(dt_t A_h) s_{t-1} + dt_t x_t B_t^T
    y_t  = s_t C_t + D_h x_t ;  y_t = y_t * silu(z_t) when z is given

(``softplus`` is torch's, identity above 20, as in mamba_ssm; the clamp is applied always, also
for the default ``dt_limit = (0, inf)``, as in mamba_ssm's chunked op.)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gka_kernels.reference._common import compute_dtype, spans


def ssd_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
           dt_limit: tuple[float, float]) -> torch.Tensor:
    """The effective step ``dt' [B, T, H]`` (bias, optional softplus, clamp)."""
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = F.softplus(dt)
    return dt.clamp(dt_limit[0], dt_limit[1])


def ssd_ref(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, math.inf),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference Mamba-2 SSD (differentiable with autograd).

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]``; B, C: ``[B, T, G, N]`` (``H % G == 0``).
        D: ``[H]`` or ``[H, P]``; z: ``[B, T, H, P]``; dt_bias: ``[H]``.
        initial_states: ``[Ns, H, P, N]`` (``Ns = B``, or the number of sequences in ``cu_seqlens``).
        cu_seqlens: ``[Ns + 1]`` offsets of sequences packed along T (``B == 1``).

    Computes in float64 when any input is float64, else float32. Returns ``y [B, T, H, P]`` in
    ``x``'s dtype and the final states ``[Ns, H, P, N]`` in the compute dtype.
    """
    Bsz, T, H, P = x.shape
    G, N = B.shape[2], B.shape[3]
    cd = compute_dtype(x, dt, A, B, C, D, z, dt_bias, initial_states)
    xc = x.to(cd)
    dtc = ssd_dt(dt.to(cd), dt_bias.to(cd) if dt_bias is not None else None, dt_softplus, dt_limit)
    Ac = A.to(cd)
    Be = B.to(cd).repeat_interleave(H // G, dim=2)
    Ce = C.to(cd).repeat_interleave(H // G, dim=2)
    rows, finals = [], []
    for i, (b, start, end) in enumerate(spans(Bsz, T, cu_seqlens)):
        if initial_states is not None:
            s = initial_states[i].to(cd)
        else:
            s = torch.zeros(H, P, N, dtype=cd, device=x.device)
        ys = []
        for t in range(start, end):
            d = dtc[b, t]
            s = torch.exp(d * Ac)[:, None, None] * s \
                + (d[:, None] * xc[b, t])[:, :, None] * Be[b, t][:, None, :]
            ys.append(torch.einsum("hpn,hn->hp", s, Ce[b, t]))
        rows.append(torch.stack(ys, 0) if ys else xc.new_zeros(0, H, P))
        finals.append(s)
    y = torch.stack(rows, 0) if cu_seqlens is None else torch.cat(rows, 0)[None]
    if D is not None:
        Dc = D.to(cd)
        y = y + xc * (Dc[:, None] if Dc.dim() == 1 else Dc)
    if z is not None:
        zc = z.to(cd)
        y = y * zc * torch.sigmoid(zc)
    return y.to(x.dtype), torch.stack(finals, 0)
