"""What the three layers share: argument checks, padding/packing, cache handling, the decay gate,
and (``QKVMixerLayer``) the q/k/v projections, convolutions and gated output of GDN and GKA.

A layer subclass defines ``cache_class``, ``cache_shapes()`` and ``_mix(x, cu_seqlens, cache, impl)``,
which maps ``x [B', T', hidden]`` (packed ``[1, L, hidden]`` when ``cu_seqlens`` is given) to the
layer output of the same shape and writes the new states into ``cache`` (when not ``None``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from gka_kernels.common.checks import check_activation, check_head_groups, check_positive_int
from gka_kernels.layers import dispatch
from gka_kernels.layers.cache import LayerCache
from gka_kernels.layers.conv import ShortConvolution
from gka_kernels.layers.norm import GatedRMSNorm
from gka_kernels.layers.padding import Packing, normalize_mask


def check_positive_float(name: str, value: object) -> float:
    """A finite real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not (0.0 < float(value) < math.inf):
        raise ValueError(f"{name}: expected a finite number > 0, got {value}")
    return float(value)


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 activations (gradcheck), float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Log decay ``g = -exp(A_log) * softplus(a + dt_bias)`` (``<= 0``), ``[..., H]`` in float32/64."""
    acc = acc_dtype(a)
    return -torch.exp(A_log.to(acc)) * F.softplus(a.to(acc) + dt_bias.to(acc))


@torch.no_grad()
def init_A_log_(A_log: torch.Tensor, low: float = 1.0, high: float = 16.0) -> None:
    """``A_log = log(A)``, ``A ~ U(low, high)`` (published ``U(0, 16)``; the low end is 1 here, as in
    mamba_ssm's ``A_init_range``, so that ``log`` never sees 0)."""
    A_log.copy_(torch.empty_like(A_log, dtype=torch.float32).uniform_(low, high).log())


@torch.no_grad()
def init_dt_bias_(dt_bias: torch.Tensor, dt_min: float = 1e-3, dt_max: float = 0.1,
                  dt_floor: float = 1e-4) -> None:
    """``dt_bias = softplus^{-1}(dt)``, ``dt`` log-uniform in ``[dt_min, dt_max]``, floored at ``dt_floor``."""
    u = torch.rand_like(dt_bias, dtype=torch.float32)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))


class MixerLayer(nn.Module):
    """Base of ``GatedKalmaNet``, ``GatedDeltaNet`` and ``Mamba2`` (attention geometry + backend)."""

    cache_class: type[LayerCache] = LayerCache

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 conv_size: int, norm_eps: float, layer_idx: int | None, backend: str) -> None:
        super().__init__()
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.num_kv_heads = check_positive_int("num_kv_heads", num_kv_heads)
        self.head_dim = check_positive_int("head_dim", head_dim)
        check_head_groups(num_heads, num_kv_heads, q_name="num_heads", kv_name="num_kv_heads")
        self.conv_size = check_positive_int("conv_size", conv_size)
        self.norm_eps = check_positive_float("norm_eps", norm_eps)
        if layer_idx is not None:
            check_positive_int("layer_idx", layer_idx, lo=0)
        self.layer_idx = layer_idx
        self.backend = dispatch.check_backend(backend)

    # -- cache -------------------------------------------------------------------------------
    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-row shape of every cache field."""
        raise NotImplementedError

    def init_cache(self, batch_size: int, *, device: torch.device | str | None = None,
                   state_dtype: torch.dtype = torch.float32,
                   conv_dtype: torch.dtype = torch.float32) -> LayerCache:
        """A zero cache (fresh sequences) for ``batch_size`` rows on ``device`` (default: the
        parameters' device). ``state_dtype`` float32 (default), bfloat16 (half the memory) or
        float64 (with float64 activations)."""
        check_positive_int("batch_size", batch_size)
        if state_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"state_dtype: expected float32, bfloat16, float16 or float64, got {state_dtype}")
        device = next(self.parameters()).device if device is None else torch.device(device)
        return self.cache_class.zeros(batch_size, self.cache_shapes(), device=device,
                                      conv_dtype=conv_dtype, state_dtype=state_dtype)

    @staticmethod
    def state_in(t: torch.Tensor) -> torch.Tensor:
        """A cached recurrent state as the kernels take it (float32, or float64 as stored)."""
        return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: LayerCache | None = None, use_cache: bool = False
                ) -> tuple[torch.Tensor, LayerCache | None]:
        """Mix a chunk of tokens.

        Args:
            hidden_states: ``[B, T, hidden_size]``.
            attention_mask: ``[B, T]`` or ``[B, S >= T]`` (last ``T`` columns used), 1 = token,
                0 = padding (any pattern; left and right padding are the usual ones). Padding
                positions do not touch the states and give zero outputs.
            cache: states of the ``B`` sequences from earlier calls; read and updated in place.
                A call with a cache, no padding, at most ``dispatch.MAX_DECODE_TOKENS`` tokens and
                no autograd recording (e.g. under ``torch.no_grad()``, as in ``generate()``) is a
                decode step and runs the decode kernels; every other call runs the chunked kernels.
            use_cache: create a fresh cache when ``cache`` is ``None``.

        Returns:
            ``(output [B, T, hidden_size], cache)``; ``cache`` is ``None`` when none was given and
            ``use_cache`` is false.
        """
        x = check_activation("hidden_states", hidden_states, ndim=3)
        B, T, C = x.shape
        if C != self.hidden_size:
            raise ValueError(f"hidden_states: expected last dim {self.hidden_size}, got {list(x.shape)}")
        if T < 1:
            raise ValueError(f"hidden_states: expected at least one token, got shape {list(x.shape)}")
        mask = normalize_mask(attention_mask, B, T)
        if cache is None and use_cache:
            state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            cache = self.init_cache(B, device=x.device, state_dtype=state_dtype, conv_dtype=state_dtype)
        if cache is not None:
            if not isinstance(cache, self.cache_class):
                raise TypeError(f"cache: expected {self.cache_class.__name__}, got {type(cache).__name__}")
            cache.check_shapes(B, self.cache_shapes(), x.device)
        packing = Packing.from_mask(mask) if mask is not None else None
        if packing is None:
            decode = cache is not None and T <= dispatch.MAX_DECODE_TOKENS and not self._needs_grad(x)
            impl = dispatch.plan(self.backend, x.device, decode=decode)
            return self._mix(x, None, cache, impl), cache
        impl = dispatch.plan(self.backend, x.device, decode=False)
        if packing.num_tokens == 0:
            return torch.zeros_like(x), cache
        out = self._mix(packing.pack(x), packing.cu_seqlens, cache, impl)
        return packing.unpack(out), cache

    def _needs_grad(self, x: torch.Tensor) -> bool:
        """Whether autograd records this call (the decode kernels are forward-only, so such calls
        take the differentiable chunked path)."""
        return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))

    def _mix(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, cache: LayerCache | None,
             impl: str) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, backend={self.backend!r}")


class QKVMixerLayer(MixerLayer):
    """Base of ``GatedKalmaNet`` and ``GatedDeltaNet``: the parts their bodies share.

    Parameters (names of the primed checkpoints), with ``H, HKV, D`` the layer's geometry:
    ``q_proj [H*D]``, ``k_proj, v_proj [HKV*D]`` (``_init_qkv_proj``); ``A_log, dt_bias [H]``,
    ``q_conv1d, k_conv1d, v_conv1d``, ``g_proj [H*D]``, ``o_norm``, ``o_proj`` (``_init_decay_conv_out``).
    A subclass calls the two in this order, with its gate projections in between (registration
    order fixes the parameter order and the random initialization under a seed).
    """

    def _init_qkv_proj(self, f: dict) -> None:
        """``q_proj``, ``k_proj``, ``v_proj`` (no bias); ``f``: ``device``/``dtype`` factory kwargs."""
        H, HKV, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(self.hidden_size, H * D, bias=False, **f)
        self.k_proj = nn.Linear(self.hidden_size, HKV * D, bias=False, **f)
        self.v_proj = nn.Linear(self.hidden_size, HKV * D, bias=False, **f)

    def _init_decay_conv_out(self, f: dict) -> None:
        """``A_log``, ``dt_bias`` (initialized, no weight decay), the q/k/v short convolutions,
        ``g_proj``, ``o_norm`` (eps ``norm_eps``) and ``o_proj``."""
        H, HKV, D, W = self.num_heads, self.num_kv_heads, self.head_dim, self.conv_size
        self.A_log = nn.Parameter(torch.empty(H, **f))
        self.dt_bias = nn.Parameter(torch.empty(H, **f))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        init_A_log_(self.A_log)
        init_dt_bias_(self.dt_bias)
        self.q_conv1d = ShortConvolution(H * D, W, bias=False, **f)
        self.k_conv1d = ShortConvolution(HKV * D, W, bias=False, **f)
        self.v_conv1d = ShortConvolution(HKV * D, W, bias=False, **f)
        self.g_proj = nn.Linear(self.hidden_size, H * D, bias=False, **f)
        self.o_norm = GatedRMSNorm(D, eps=self.norm_eps, **f)
        self.o_proj = nn.Linear(H * D, self.hidden_size, bias=False, **f)

    def _conv_qkv(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, cache: LayerCache | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                             tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``q [B,T,H*D]``, ``k, v [B,T,HKV*D]`` after projection and convolution, and the new conv
        states ``(q_conv, k_conv, v_conv)`` (read from ``cache`` when given, not written)."""
        q, q_conv = self.q_conv1d(self.q_proj(x), cache.q_conv if cache is not None else None, cu_seqlens)
        k, k_conv = self.k_conv1d(self.k_proj(x), cache.k_conv if cache is not None else None, cu_seqlens)
        v, v_conv = self.v_conv1d(self.v_proj(x), cache.v_conv if cache is not None else None, cu_seqlens)
        return q, k, v, (q_conv, k_conv, v_conv)

    def _gated_out(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``o_proj(o_norm(o) * silu(g_proj x))`` for ``o [B,T,H,D]`` -> ``[B,T,hidden]``."""
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, D))
        return self.o_proj(o.reshape(B, T, H * D))
