"""``GatedDeltaNet``: the Gated DeltaNet layer in its attention-compatible (primed) form, SPEC 6.

Dataflow for ``x [B, T, hidden]`` with ``H`` query heads, ``HKV`` key/value heads, head dim ``D``:

    q = silu(conv(q_proj x))  [B,T,H,D]      k = silu(conv(k_proj x)),  v = silu(conv(v_proj x))  [B,T,HKV,D]
    beta = sigmoid(b_proj x)  [B,T,H]        g = -exp(A_log) * softplus(gk_proj x + dt_bias)
    o = chunk_gated_delta_rule(q, k, v, g, beta, scale=D^-1/2, use_qk_l2norm_in_kernel=True)
    out = o_proj( o_norm(o) * silu(g_proj x) )          (o_norm eps 1e-5)

Keys and values stay at ``HKV`` heads: the kernel reads kv head ``h // (H/HKV)`` for query head ``h``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gka_kernels.layers import dispatch
from gka_kernels.layers.base import QKVMixerLayer, acc_dtype, decay
from gka_kernels.layers.cache import GDNCache


class GatedDeltaNet(QKVMixerLayer):
    """Gated DeltaNet layer with the parameter names of the published primed checkpoints.

    Args:
        hidden_size: model width.
        num_heads, num_kv_heads, head_dim: attention geometry (``num_heads % num_kv_heads == 0``).
        conv_size: short-convolution width.
        norm_eps: eps of ``o_norm``.
        layer_idx: position in the model.
        backend: ``"auto" | "triton" | "cuda" | "torch"`` (see ``gka_kernels.layers.dispatch``).
    """

    cache_class = GDNCache

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 conv_size: int = 4, norm_eps: float = 1e-5, layer_idx: int | None = None,
                 backend: str = "auto", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, conv_size, norm_eps, layer_idx, backend)
        H = num_heads
        f = {"device": device, "dtype": dtype}
        self._init_qkv_proj(f)
        self.b_proj = nn.Linear(hidden_size, H, bias=False, **f)
        self.gk_proj = nn.Linear(hidden_size, H, bias=False, **f)
        self._init_decay_conv_out(f)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        H, HKV, D, W = self.num_heads, self.num_kv_heads, self.head_dim, self.conv_size - 1
        return {"q_conv": (H * D, W), "k_conv": (HKV * D, W), "v_conv": (HKV * D, W), "state": (H, D, D)}

    def _mix(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, cache: GDNCache | None,
             impl: str) -> torch.Tensor:
        B, T, _ = x.shape
        H, HKV, D = self.num_heads, self.num_kv_heads, self.head_dim
        acc = acc_dtype(x)
        q, k, v, convs = self._conv_qkv(x, cu_seqlens, cache)
        beta = torch.sigmoid(self.b_proj(x).to(acc))
        g = decay(self.gk_proj(x), self.A_log, self.dt_bias)
        o, final = dispatch.gated_delta_rule(
            impl, q.view(B, T, H, D), k.view(B, T, HKV, D), v.view(B, T, HKV, D), g, beta, scale=D ** -0.5,
            initial_state=None if cache is None else self.state_in(cache.state),
            output_final_state=cache is not None, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.q_conv, cache.k_conv, cache.v_conv = convs
            cache.state = final.to(cache.state.dtype)
        return self._gated_out(o, x)
