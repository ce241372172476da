"""Normalizations used by the layers: gated RMSNorm and per-head L2 normalization.

Gated RMSNorm over groups of ``group_size`` channels (``rms(x) = sqrt(mean(x^2) + eps)`` per group),
computed in float32 and returned in the dtype of ``x``:

- ``norm_before_gate=True`` (GKA, GDN ``o_norm``; fla ``FusedRMSNormGated``):
  ``y = x / rms(x) * weight * silu(gate)``
- ``norm_before_gate=False`` (Mamba-2 ``norm``; mamba_ssm ``RMSNormGated``):
  ``u = x * silu(gate)``, ``y = u / rms(u) * weight``
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def l2_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (one head), in float32; returns ``x.dtype``."""
    xf = x.float() if x.dtype != torch.float64 else x
    return (xf * torch.rsqrt(xf.square().sum(-1, keepdim=True) + eps)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm with a SiLU output gate over the last dim (``weight [hidden_size]``, ones at init).

    Args:
        hidden_size: size of the last dim of ``x`` and ``gate``.
        eps: added to the mean square.
        group_size: channels normalized together (``hidden_size // group_size`` groups);
            default ``hidden_size``.
        norm_before_gate: see the module docstring.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        group_size = hidden_size if group_size is None else group_size
        if group_size < 1 or hidden_size % group_size:
            raise ValueError(f"group_size: expected a divisor of hidden_size={hidden_size}, got {group_size}")
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``x, gate: [..., hidden_size]`` -> ``[..., hidden_size]`` in ``x.dtype``."""
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        xf, gf = x.to(acc), gate.to(acc)
        if not self.norm_before_gate:
            xf = xf * F.silu(gf)
        groups = xf.unflatten(-1, (-1, self.group_size))
        xf = (groups * torch.rsqrt(groups.square().mean(-1, keepdim=True) + self.eps)).flatten(-2)
        xf = xf * self.weight.to(acc)
        if self.norm_before_gate:
            xf = xf * F.silu(gf)
        return xf.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[0]}, eps={self.eps}, group_size={self.group_size}, "
                f"norm_before_gate={self.norm_before_gate}")
