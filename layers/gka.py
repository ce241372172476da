"""``GatedKalmaNet``: the GKA layer in its attention-compatible (primed) form, SPEC 6.

Dataflow for ``x [B, T, hidden]`` with ``H`` query heads, ``HKV`` key/value heads, head dim ``D``:

    q = silu(conv(q_proj x))  [B,T,H,D]      k = silu(conv(k_proj x)),  v = silu(conv(v_proj x))  [B,T,HKV,D]
    q, k <- q, k / sqrt(|.|^2 + 1e-6)  per head
    beta  = sigmoid(b_proj x)  [B,T,H];  k_h, v_h <- (beta_h + 1e-6) * k, v of kv head h // (H/HKV)
    alpha = sigmoid(alpha_proj x)           g = -exp(A_log) * softplus(a_proj x + dt_bias)   (gk = g)
    o = chunk_gka(q, k, v, g, alpha, scale=D^-1/2, ridge_ratio, num_iter)     [B,T,H,D]
    out = o_proj( o_norm(o) * silu(g_proj x) )

Because beta is per query head, the beta-scaled keys/values are formed at ``H`` heads before the
kernel call (the kernel API takes k, v already scaled, SPEC 5).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from gka_kernels.common.checks import check_positive_int
from gka_kernels.layers import dispatch
from gka_kernels.layers.base import QKVMixerLayer, acc_dtype, check_positive_float, decay
from gka_kernels.layers.cache import GKACache
from gka_kernels.layers.norm import l2_norm


class GatedKalmaNet(QKVMixerLayer):
    """Gated KalmaNet layer with the parameter names of the published primed checkpoints.

    Args:
        hidden_size: model width.
        num_heads, num_kv_heads, head_dim: attention geometry (``num_heads % num_kv_heads == 0``).
        num_iter: Chebyshev iterations (runtime attribute; may be lowered for serving).
        ridge_ratio: ``lambda_t = ridge_ratio * ||H_t||_F``.
        conv_size: short-convolution width.
        norm_eps: eps of ``o_norm``.
        layer_idx: position in the model (for the model's cache bookkeeping).
        backend: ``"auto" | "triton" | "cuda" | "torch"`` (see ``gka_kernels.layers.dispatch``).
    """

    cache_class = GKACache

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 num_iter: int = 30, ridge_ratio: float = 0.02, conv_size: int = 4, norm_eps: float = 1e-6,
                 layer_idx: int | None = None, backend: str = "auto", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__(hidden_size, num_heads, num_kv_heads, head_dim, conv_size, norm_eps, layer_idx, backend)
        self.num_iter = check_positive_int("num_iter", num_iter)
        self.ridge_ratio = check_positive_float("ridge_ratio", ridge_ratio)
        H = num_heads
        f = {"device": device, "dtype": dtype}
        self._init_qkv_proj(f)
        self.a_proj = nn.Linear(hidden_size, H, bias=False, **f)
        self.b_proj = nn.Linear(hidden_size, H, bias=True, **f)
        self.alpha_proj = nn.Linear(hidden_size, H, bias=True, **f)
        self._init_decay_conv_out(f)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        H, HKV, D, W = self.num_heads, self.num_kv_heads, self.head_dim, self.conv_size - 1
        return {"q_conv": (H * D, W), "k_conv": (HKV * D, W), "v_conv": (HKV * D, W),
                "h_kk": (H, D, D), "h_kv": (H, D, D)}

    def _mix(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None, cache: GKACache | None,
             impl: str) -> torch.Tensor:
        B, T, _ = x.shape
        H, HKV, D = self.num_heads, self.num_kv_heads, self.head_dim
        acc = acc_dtype(x)
        q, k, v, convs = self._conv_qkv(x, cu_seqlens, cache)
        q = l2_norm(q.view(B, T, H, D), 1e-6)
        k = l2_norm(k.view(B, T, HKV, D), 1e-6)
        v = v.view(B, T, HKV, D)
        w = (torch.sigmoid(self.b_proj(x).to(acc)) + 1e-6).unsqueeze(-1)  # [B,T,H,1]
        group = H // HKV
        k = (k.repeat_interleave(group, dim=2).to(acc) * w).to(q.dtype)
        v = (v.repeat_interleave(group, dim=2).to(acc) * w).to(q.dtype)
        alpha = torch.sigmoid(self.alpha_proj(x).to(acc))
        g = decay(self.a_proj(x), self.A_log, self.dt_bias)
        initial = None if cache is None else (self.state_in(cache.h_kk), self.state_in(cache.h_kv))
        o, final = dispatch.gka(impl, q, k, v, g, alpha, scale=D ** -0.5, ridge_ratio=self.ridge_ratio,
                                num_iter=self.num_iter, initial_state=initial,
                                output_final_state=cache is not None, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.q_conv, cache.k_conv, cache.v_conv = convs
            cache.h_kk = final[0].to(cache.h_kk.dtype)
            cache.h_kv = final[1].to(cache.h_kv.dtype)
        return self._gated_out(o, x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_iter={self.num_iter}, ridge_ratio={self.ridge_ratio}"
