"""Gated KalmaNet decode step with the fused CUDA kernel in ``csrc/gka_decode.cu``."""

from __future__ import annotations

from typing import Any

import torch

from gka_kernels.common.checks import check_positive_int, check_scale
from gka_kernels.cuda import _args as ca
from gka_kernels.cuda._dtypes import dtype_tag

#: Largest key / value head dim of the kernel (H of one head, 64 KiB fp32, stays in registers).
MAX_HEAD_DIM = 128
#: Largest runtime ``num_iter``.
MAX_NUM_ITER = 64


def gka_decode_launch_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor | None,
    h_kk_pool: torch.Tensor, h_kv_pool: torch.Tensor, state_indices: torch.Tensor | None = None,
    dst_state_indices: torch.Tensor | None = None, scale: float | None = None, num_iter: int = 30,
    ridge_ratio: float = 0.02, out: torch.Tensor | None = None,
) -> tuple[dict[str, Any], torch.Tensor]:
    """Validate the inputs of :func:`gka_decode` (metadata only) and build the launcher arguments.

    Returns ``(kwargs for gka_kernels._C.gka_decode without stream, output tensor)``.
    """
    q, k, v, g = ca.qkv_decay(q, k, v, g)
    B, Tn, Hq, K = q.shape
    H = g.shape[2]
    if alpha is not None:
        alpha = ca.gate("alpha", alpha, (B, Tn, H), q.device)
    for name, t in (("q", q), ("k", k), ("v", v)):
        ca.divides(name, t.shape[2], H, "heads of g (state heads)")
    V = v.shape[3]
    ca.head_dim("q", K, 4, MAX_HEAD_DIM, multiple=4)
    ca.head_dim("v", V, 4, MAX_HEAD_DIM, multiple=4)
    h_kk = ca.state_pool("h_kk_pool", h_kk_pool, (None, H, K, K), q.device)
    h_kv = ca.state_pool("h_kv_pool", h_kv_pool, (h_kk.shape[0], H, K, V), q.device)
    args = ca.indices(state_indices, dst_state_indices, B, h_kk.shape[0], q.device)
    scale = check_scale(scale, K)
    num_iter = check_positive_int("num_iter", num_iter, lo=1, hi=MAX_NUM_ITER)
    ridge_ratio = ca.real("ridge_ratio", ridge_ratio, lo=0.0)
    o = ca.output(out, (B, Tn, H, V), q.dtype, q.device)
    args.update(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), g=g.data_ptr(), alpha=ca.ptr(alpha),
        h_kk=h_kk.data_ptr(), h_kv=h_kv.data_ptr(), out=o.data_ptr(), q_strides=ca.strides3(q),
        k_strides=ca.strides3(k), v_strides=ca.strides3(v), g_strides=g.stride(),
        alpha_strides=ca.strides3(alpha), out_strides=ca.strides3(o), B=B, Tn=Tn, H=H, q_heads=Hq,
        k_heads=k.shape[2], v_heads=v.shape[2], K=K, V=V, dtype=dtype_tag("q", q),
        g_dtype=dtype_tag("g", g), alpha_dtype=ca.tag("alpha", alpha), num_iter=num_iter,
        ridge_ratio=ridge_ratio, scale=scale)
    return args, o


def gka_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    alpha: torch.Tensor | None,
    h_kk_pool: torch.Tensor,
    h_kv_pool: torch.Tensor,
    state_indices: torch.Tensor | None = None,
    dst_state_indices: torch.Tensor | None = None,
    scale: float | None = None,
    num_iter: int = 30,
    ridge_ratio: float = 0.02,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Gated KalmaNet decode step of ``Tn`` (1..8) tokens per sequence (tied decays, SPEC 5).

    Per state head and token::

        H = exp(g) H + k k^T ;  U = exp(g) U + k v^T ;  fro = ||H||_F (1 if 0) ;  lam = ridge_ratio * fro
        x = Chebyshev(H + lam I, q, num_iter) ;  qm = q + alpha (x - q) ;  o = scale U^T qm

    ``q`` and ``k`` arrive L2-normalized and ``k``, ``v`` beta-scaled by the layer.

    Args:
        q: ``[B, Tn, Hq, K]``, ``k: [B, Tn, Hk, K]``, ``v: [B, Tn, Hv, V]`` (float32/float16/bfloat16,
            same dtype, last dim contiguous). ``Hq, Hk, Hv`` divide ``H``; head ``h`` reads input
            head ``h // (H // Hx)``. ``K, V`` multiples of 4, at most 128.
        g: ``[B, Tn, H]`` log-decay of both states. alpha: ``[B, Tn, H]`` or ``None`` (alpha = 1).
        h_kk_pool: float32 ``[slots, H, K, K]``; h_kv_pool: float32 ``[slots, H, K, V]``; both
            contiguous, updated in place at the same slots.
        state_indices: ``[B]`` int32/int64 slot of each sequence; ``-1`` skips the sequence (states
            neither read nor written, output rows 0). ``None``: slot ``b``.
        dst_state_indices: ``[B]`` slots to write the new states to (default ``state_indices``);
            ``-1`` skips the write only. Destination slots must be distinct and must not be the
            source slot of another sequence.
        scale: default ``K ** -0.5``. num_iter: Chebyshev iterations, 1..64 (runtime).
        ridge_ratio: ``lam = ridge_ratio * ||H||_F`` (>= 0).
        out: optional preallocated ``[B, Tn, H, V]`` output in the dtype of ``q``.

    Returns:
        ``o [B, Tn, H, V]`` in the dtype of ``q``.

    Metadata-only checks, current CUDA stream, no allocation when ``out`` is given: CUDA-graph
    capturable.
    """
    args, o = gka_decode_launch_args(q, k, v, g, alpha, h_kk_pool, h_kv_pool, state_indices,
                                     dst_state_indices, scale, num_iter, ridge_ratio, out)
    ca.launch("gka_decode", args, q.device)
    return o
