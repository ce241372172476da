"""Backend choice for the layers: which implementation runs each sequence-mixer call.

Backends (the ``backend=`` argument of every layer):

- ``"auto"``:  GPU tensors -> Triton kernels (chunked for prompts, fused recurrent for decode
  steps) and, when ``gka_kernels.cuda_available()``, the CUDA C++ kernels for decode steps;
  CPU tensors -> the PyTorch reference.
- ``"triton"``: Triton kernels always; CPU tensors raise ``ValueError`` (never a silent fallback).
- ``"cuda"``:  CUDA C++ kernels for decode steps (the extension must be built; checked when the
  layer is built), Triton for everything else; CPU tensors raise ``ValueError``.
- ``"torch"``: the PyTorch reference (``gka_kernels.reference``) always, on any device; the mixer
  runs in float32 (float64 for float64 inputs) whatever the activation dtype.

A decode step is a call with a cache, no padding and at most ``MAX_DECODE_TOKENS`` tokens per
sequence (one token, or a few for speculative decoding). In-place kernels (CUDA, Mamba-2's
recurrent step) update the cache's float32 state tensors directly.

``plan`` turns a backend, a device and the kind of call into an implementation name; the op
functions below run it. They are opaque to ``torch.compile`` (``torch.compiler.disable``): the
compiled graph breaks around the mixer call and the kernels run eagerly.
"""

from __future__ import annotations

import math

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")

#: implementation names returned by ``plan``
TORCH, CHUNK, RECURRENT, CUDA = "torch", "chunk", "recurrent", "cuda"
#: most tokens per sequence that the decode kernels (CUDA C++: 1..8) take in one step
MAX_DECODE_TOKENS = 8


def check_backend(backend: object) -> str:
    """Validate a layer's ``backend`` argument (checked when the layer is built)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        from gka_kernels.cuda import extension_available, extension_error

        if not extension_available():
            raise RuntimeError(f"backend='cuda' needs the compiled extension gka_kernels._C, which is not "
                               f"available ({extension_error()}); use backend='triton' or 'auto'")
    return backend


def plan(backend: str, device: torch.device, decode: bool) -> str:
    """Implementation for one call: ``"torch"``, ``"chunk"``, ``"recurrent"`` or ``"cuda"``.

    ``decode``: the call is a decode step (cache, ``[B, T <= MAX_DECODE_TOKENS]`` layout, no
    padding), which is what the recurrent and CUDA kernels take.
    """
    if backend == "torch":
        return TORCH
    if device.type != "cuda":
        if backend == "auto":
            return TORCH
        raise ValueError(f"backend={backend!r} runs on CUDA tensors only, got tensors on {device}; "
                         "use backend='torch' (or 'auto') for CPU tensors")
    if not decode:
        return CHUNK
    if backend == "cuda":
        return CUDA
    if backend == "auto":
        import gka_kernels

        return CUDA if gka_kernels.cuda_available() else RECURRENT
    return RECURRENT


def _ref_dtype(t: torch.Tensor) -> torch.dtype:
    """The references run in float64 for float64 inputs and in float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _cuda_pool(state: torch.Tensor) -> torch.Tensor:
    """The float32 contiguous state pool the decode kernels update in place (slot ``b`` = row ``b``)."""
    if state.dtype == torch.float32 and state.is_contiguous():
        return state
    return state.to(torch.float32).contiguous()


@torch.compiler.disable
def gated_delta_rule(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor, *, scale: float, initial_state: torch.Tensor | None,
                     output_final_state: bool, cu_seqlens: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GDN (SPEC 3) with in-kernel q/k L2 norm. ``q [B,T,H,K]``, ``k [B,T,HKV,K]``, ``v [B,T,HKV,V]``,
    ``g, beta [B,T,H]``, ``initial_state [N,H,K,V]``. Returns ``(o [B,T,H,V], final [N,H,K,V] | None)``."""
    if impl == TORCH:
        from gka_kernels.reference.gdn import gated_delta_rule_ref

        o, final = gated_delta_rule_ref(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                        output_final_state=output_final_state, use_qk_l2norm=True,
                                        cu_seqlens=cu_seqlens)
        return o.to(q.dtype), final
    if impl == CUDA:
        from gka_kernels.cuda import gdn_decode

        state = _cuda_pool(initial_state)
        return gdn_decode(q, k, v, g, beta, state, scale=scale, use_qk_l2norm=True), state
    from gka_kernels import gdn

    fn = gdn.chunk_gated_delta_rule if impl == CHUNK else gdn.fused_recurrent_gated_delta_rule
    return fn(q, k, v, g, beta, scale=scale, initial_state=initial_state,
              output_final_state=output_final_state, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)


@torch.compiler.disable
def gka(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
        alpha: torch.Tensor, *, scale: float, ridge_ratio: float, num_iter: int,
        initial_state: tuple[torch.Tensor, torch.Tensor] | None, output_final_state: bool,
        cu_seqlens: torch.Tensor | None
        ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """GKA (SPEC 5), tied decays. ``q, k, v [B,T,H,D]`` (k, v already beta-scaled), ``g, alpha [B,T,H]``,
    ``initial_state = (h_kk [N,H,D,D], h_kv [N,H,D,D])``. Returns ``(o [B,T,H,D], (h_kk, h_kv) | None)``."""
    if impl == TORCH:
        from gka_kernels.reference.gka import gka_ref

        acc = _ref_dtype(q)
        o, final = gka_ref(q.to(acc), k.to(acc), v.to(acc), g, alpha=alpha, scale=scale,
                           ridge_ratio=ridge_ratio, num_iter=num_iter, solver="chebyshev",
                           initial_state=initial_state, output_final_state=output_final_state,
                           cu_seqlens=cu_seqlens)
        return o.to(q.dtype), final
    if impl == CUDA:
        from gka_kernels.cuda import gka_decode

        h_kk, h_kv = (_cuda_pool(s) for s in initial_state)
        o = gka_decode(q, k, v, g, alpha, h_kk, h_kv, scale=scale, num_iter=num_iter, ridge_ratio=ridge_ratio)
        return o, (h_kk, h_kv)
    from gka_kernels import gka as gka_ops

    fn = gka_ops.chunk_gka if impl == CHUNK else gka_ops.fused_recurrent_gka
    return fn(q, k, v, g, alpha=alpha, scale=scale, ridge_ratio=ridge_ratio, num_iter=num_iter,
              initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


@torch.compiler.disable
def ssd(impl: str, x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
        *, D: torch.Tensor, dt_bias: torch.Tensor, chunk_size: int, initial_states: torch.Tensor | None,
        output_final_state: bool, cu_seqlens: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mamba-2 SSD (SPEC 4) with ``dt_softplus=True``, no ``z`` (the layer gates in its norm).
    ``x [B,T,H,P]``, ``dt [B,T,H]``, ``A, D, dt_bias [H]``, ``B, C [B,T,G,N]``,
    ``initial_states [N,H,P,N]``. Returns ``(y [B,T,H,P], final [N,H,P,N] | None)``."""
    if impl == TORCH:
        from gka_kernels.reference.mamba2 import ssd_ref

        acc = _ref_dtype(x)
        y, final = ssd_ref(x.to(acc), dt.to(acc), A, B.to(acc), C.to(acc), D=D, dt_bias=dt_bias,
                           initial_states=initial_states, cu_seqlens=cu_seqlens, dt_softplus=True,
                           dt_limit=(0.0, math.inf))
        return y.to(x.dtype), (final if output_final_state else None)
    if impl == CUDA:
        from gka_kernels.cuda import mamba2_decode

        state = _cuda_pool(initial_states)
        return mamba2_decode(state, x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True), state
    if impl == RECURRENT:
        from gka_kernels.mamba2 import selective_state_update

        state = _cuda_pool(initial_states)
        y = [selective_state_update(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D=D, dt_bias=dt_bias,
                                    dt_softplus=True) for t in range(x.shape[1])]
        return torch.stack(y, 1), state
    from gka_kernels.mamba2 import mamba_chunk_scan_combined

    kw = dict(D=D, dt_bias=dt_bias, initial_states=initial_states, cu_seqlens=cu_seqlens, dt_softplus=True)
    if not output_final_state:
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, **kw), None
    if cu_seqlens is None:
        return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, return_final_states=True, **kw)
    return mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, return_varlen_states=True, **kw)
