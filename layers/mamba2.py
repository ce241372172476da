"""``Mamba2``: the Mamba-2 (SSD) layer in its attention-compatible (primed) form, SPEC 6.

With ``H`` heads of size ``P = head_dim``, ``HKV`` key/value heads and state size ``N``
(``= head_dim`` by default), for ``x [B, T, hidden]``:

    [z (H*P), xs (HKV*P), Bs (HKV*N), Cs (H*N), dt (H)] = in_proj x
    xs, Bs, Cs = silu(conv1d([xs, Bs, Cs]))          (kernel 4, with bias)
    y = SSD(x = xs repeated to H heads, dt, A = -exp(A_log), B = Bs repeated to H groups,
            C = Cs [H groups], D, dt_bias, dt_softplus=True)                       [B,T,H,P]
    out = out_proj( norm(y, z) )      norm: gated RMSNorm, group size P, gate applied before the
                                       norm (mamba_ssm ``RMSNormGated(norm_before_gate=False)``)

Priming maps attention weights as ``xs <- V``, ``Bs <- K``, ``Cs <- Q``. The SSD op takes ``B`` and
``C`` with one group count ``G``; here ``C`` has one group per query head, so ``G = H`` and ``Bs``
(one group per kv head) is repeated over the ``H / HKV`` query heads of its group
(``B[:, :, h] = Bs[:, :, h // (H/HKV)]``), as is ``xs`` (the op's ``x`` has ``H`` heads).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gka_kernels.common.checks import check_positive_int
from gka_kernels.layers import dispatch
from gka_kernels.layers.base import MixerLayer, acc_dtype, init_A_log_, init_dt_bias_
from gka_kernels.layers.cache import Mamba2Cache
from gka_kernels.layers.conv import ShortConvolution
from gka_kernels.layers.norm import GatedRMSNorm


class Mamba2(MixerLayer):
    """Mamba-2 layer with the parameter names of the published primed checkpoints.

    Args:
        hidden_size: model width.
        num_heads, num_kv_heads, head_dim: attention geometry; ``P = head_dim``.
        state_size: ``N`` (default ``head_dim``, the size that takes attention's K and Q).
        conv_size: convolution width.
        norm_eps: eps of ``norm``.
        chunk_size: chunk length of the SSD kernel.
        layer_idx: position in the model.
        backend: ``"auto" | "triton" | "cuda" | "torch"`` (see ``gka_kernels.layers.dispatch``).
    """

    cache_class = Mamba2Cache

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 state_size: int | None = None, conv_size: int = 4, norm_eps: float = 1e-5,
                 chunk_size: int = 256, layer_idx: int | None = None, backend: str = "auto",
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, conv_size, norm_eps, layer_idx, backend)
        self.state_size = head_dim if state_size is None else check_positive_int("state_size", state_size)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        H, HKV, P, N = num_heads, num_kv_heads, head_dim, self.state_size
        f = {"device": device, "dtype": dtype}
        self.conv_dim = HKV * P + HKV * N + H * N
        self.in_proj = nn.Linear(hidden_size, H * P + self.conv_dim + H, bias=False, **f)
        self.conv1d = ShortConvolution(self.conv_dim, conv_size, bias=True, **f)
        self.dt_bias = nn.Parameter(torch.empty(H, **f))
        self.A_log = nn.Parameter(torch.empty(H, **f))
        self.D = nn.Parameter(torch.ones(H, **f))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        init_A_log_(self.A_log)
        init_dt_bias_(self.dt_bias)
        self.norm = GatedRMSNorm(H * P, eps=norm_eps, group_size=P, norm_before_gate=False, **f)
        self.out_proj = nn.Linear(H * P, hidden_size, bias=False, **f)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"conv": (self.conv_dim, self.conv_size - 1),
                "ssm": (self.num_heads, self.head_dim, self.state_size)}

    def _mix(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, cache: Mamba2Cache | None,
             impl: str) -> torch.Tensor:
        B, T, _ = x.shape
        H, HKV, P, N = self.num_heads, self.num_kv_heads, self.head_dim, self.state_size
        acc = acc_dtype(x)
        z, xBC, dt = self.in_proj(x).split([H * P, self.conv_dim, H], dim=-1)
        xBC, conv = self.conv1d(xBC, cache.conv if cache is not None else None, cu_seqlens)
        xs, Bs, Cs = xBC.split([HKV * P, HKV * N, H * N], dim=-1)
        group = H // HKV
        xs = xs.reshape(B, T, HKV, P).repeat_interleave(group, dim=2)
        Bs = Bs.reshape(B, T, HKV, N).repeat_interleave(group, dim=2)
        Cs = Cs.reshape(B, T, H, N)
        y, final = dispatch.ssd(
            impl, xs, dt, -torch.exp(self.A_log.to(acc)), Bs, Cs, D=self.D.to(acc),
            dt_bias=self.dt_bias.to(acc), chunk_size=self.chunk_size,
            initial_states=None if cache is None else self.state_in(cache.ssm),
            output_final_state=cache is not None, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.conv = conv
            cache.ssm = final.to(cache.ssm.dtype)
        y = self.norm(y.reshape(B, T, H * P), z)
        return self.out_proj(y)
