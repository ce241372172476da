"""Gated DeltaNet decode step with the fused CUDA kernel in ``csrc/gdn_decode.cu``."""

from __future__ import annotations

from typing import Any

import torch

from gka_kernels.common.checks import check_scale
from gka_kernels.cuda import _args as ca
from gka_kernels.cuda._dtypes import dtype_tag


def gdn_decode_launch_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor,
    state_pool: torch.Tensor, state_indices: torch.Tensor | None = None,
    dst_state_indices: torch.Tensor | None = None, scale: float | None = None, use_qk_l2norm: bool = True,
    out: torch.Tensor | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Validate the inputs of :func:`gdn_decode` (metadata only) and build the launcher arguments.

    Returns ``(kwargs for gka_kernels._C.gdn_decode without stream, output tensor)``.
    """
    q, k, v, g = ca.qkv_decay(q, k, v, g)
    B, Tn, Hq, K = q.shape
    H = g.shape[2]
    beta = ca.gate("beta", beta, (B, Tn, H), q.device)
    for name, t in (("q", q), ("k", k), ("v", v)):
        ca.divides(name, t.shape[2], H, "heads of g (state heads)")
    V = v.shape[3]
    ca.head_dim("q", K, 1, 256)
    ca.head_dim("v", V, 4, 1 << 20, multiple=4)
    pool = ca.state_pool("state_pool", state_pool, (None, H, K, V), q.device)
    args = ca.indices(state_indices, dst_state_indices, B, pool.shape[0], q.device)
    scale = check_scale(scale, K)
    l2norm = ca.flag("use_qk_l2norm", use_qk_l2norm)
    o = ca.output(out, (B, Tn, H, V), q.dtype, q.device)
    args.update(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), g=g.data_ptr(), beta=beta.data_ptr(),
        state=pool.data_ptr(), out=o.data_ptr(), q_strides=ca.strides3(q), k_strides=ca.strides3(k),
        v_strides=ca.strides3(v), g_strides=g.stride(), beta_strides=beta.stride(), out_strides=ca.strides3(o),
        B=B, Tn=Tn, H=H, q_heads=Hq, k_heads=k.shape[2], v_heads=v.shape[2], K=K, V=V,
        dtype=dtype_tag("q", q), g_dtype=dtype_tag("g", g), beta_dtype=dtype_tag("beta", beta),
        scale=scale, l2norm=l2norm)
    return args, o


def gdn_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor | None = None,
    dst_state_indices: torch.Tensor | None = None,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Gated DeltaNet decode step of ``Tn`` (1..8) tokens per sequence, state updated in place.

    Per state head ``h`` and token (SPEC 3)::

        S = exp(g) (I - beta k k^T) S + beta k v^T ;  o = scale S^T q

    with ``q, k`` divided by ``sqrt(sum(x^2) + 1e-6)`` first when ``use_qk_l2norm``.

    Args:
        q: ``[B, Tn, Hq, K]``, ``k: [B, Tn, Hk, K]``, ``v: [B, Tn, Hv, V]`` (float32/float16/bfloat16,
            same dtype, last dim contiguous; any other strides). ``Hq, Hk, Hv`` divide ``H``; head
            ``h`` reads input head ``h // (H // Hx)``. ``K <= 256``, ``V`` a multiple of 4.
        g, beta: ``[B, Tn, H]`` log-decay and step size (float32/float16/bfloat16, any strides).
        state_pool: float32 ``[slots, H, K, V]``, contiguous; updated in place.
        state_indices: ``[B]`` int32/int64 slot of each sequence; ``-1`` skips the sequence (its
            state is neither read nor written and its output rows are 0). ``None``: slot ``b``.
        dst_state_indices: ``[B]`` slots to write the new states to (default ``state_indices``), so
            the pre-step state can be kept; ``-1`` skips the write only. Destination slots must be
            distinct and must not be the source slot of another sequence.
        scale: default ``K ** -0.5``.
        out: optional preallocated ``[B, Tn, H, V]`` output in the dtype of ``q``.

    Returns:
        ``o [B, Tn, H, V]`` in the dtype of ``q``.

    Only metadata is checked (index values are not: no host synchronization), the kernel runs on
    the current CUDA stream, and with ``out`` given nothing is allocated: the call can be captured
    in a CUDA graph.
    """
    args, o = gdn_decode_launch_args(q, k, v, g, beta, state_pool, state_indices, dst_state_indices,
                                     scale, use_qk_l2norm, out)
    ca.launch("gdn_decode", args, q.device)
    return o
