"""Validation and argument marshaling shared by the CUDA decode wrappers.

The wrappers split into a pure validation/marshaling step (``*_launch_args``: metadata only, no
host synchronization, no device requirement) and the launch itself, which needs CUDA tensors and
the compiled extension. Everything here raises ``TypeError`` for wrong types/dtypes and
``ValueError`` for everything else, naming the argument (SPEC 2).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from gka_kernels.common.checks import check_index_tensor, check_tensor
from gka_kernels.cuda._dtypes import dtype_tag

#: dtypes the kernels read for activations and gates.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Most tokens per sequence in one decode step (csrc/common.cuh kMaxDecodeTokens).
MAX_TOKENS = 8
#: Most sequences per call (CUDA grid dimension y/z, csrc/common.cuh kMaxGridYZ).
MAX_SEQUENCES = 65535


def activation(name: str, t: object, ndim: int, dtype: torch.dtype | None = None,
               device: torch.device | None = None) -> torch.Tensor:
    """A float32/float16/bfloat16 tensor of ``ndim`` dims whose last dimension is contiguous."""
    t = check_tensor(name, t, ndim=ndim, dtypes=KERNEL_DTYPES, device=device)
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (the dtype of the other inputs), got {t.dtype}")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected the last dimension to be contiguous (stride 1), "
                         f"got strides {tuple(t.stride())}")
    return t


def expect_shape(name: str, t: torch.Tensor, shape: tuple[int | None, ...]) -> None:
    """``t.shape`` matches ``shape`` (``None`` matches any size)."""
    if t.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")


def tokens(name: str, t: torch.Tensor) -> int:
    """The number of tokens per sequence (dim 1), in ``[1, MAX_TOKENS]``; also bounds the number of
    sequences (dim 0) by the CUDA grid limit."""
    n = t.shape[1]
    if not 1 <= n <= MAX_TOKENS:
        raise ValueError(f"{name}: expected 1 to {MAX_TOKENS} tokens per sequence (dim 1), got {n}")
    if t.shape[0] > MAX_SEQUENCES:
        raise ValueError(f"{name}: at most {MAX_SEQUENCES} sequences (dim 0) per call, got {t.shape[0]}")
    return n


def divides(name: str, heads: int, H: int, what: str = "state heads") -> None:
    """Grouped heads: ``heads`` divides ``H``."""
    if heads < 1 or H % heads:
        raise ValueError(f"{name}: number of heads {heads} must divide the {H} {what} (H % heads == 0)")


def head_dim(name: str, dim: int, lo: int, hi: int, multiple: int = 1) -> None:
    """A head dim in ``[lo, hi]`` and a multiple of ``multiple``."""
    if dim < lo or dim > hi or dim % multiple:
        extra = f" and a multiple of {multiple}" if multiple > 1 else ""
        raise ValueError(f"{name}: head dim must be in [{lo}, {hi}]{extra} for the CUDA kernel, got {dim}")


def state_pool(name: str, pool: object, shape: tuple[int | None, ...], device: torch.device) -> torch.Tensor:
    """A contiguous, 16-byte aligned float32 pool ``[slots, ...]`` on ``device``."""
    pool = check_tensor(name, pool, dtypes=(torch.float32,), device=device)
    expect_shape(name, pool, shape)
    if not pool.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous state pool")
    if pool.data_ptr() % 16:
        raise ValueError(f"{name}: expected a 16-byte aligned data pointer (a view at an odd offset?)")
    return pool


def gate(name: str, t: object, shape: tuple[int | None, ...], device: torch.device) -> torch.Tensor:
    """A per-head scalar input (any strides) of ``shape`` (``None`` matches any size)."""
    t = check_tensor(name, t, dtypes=KERNEL_DTYPES, device=device)
    expect_shape(name, t, shape)
    return t


def qkv_decay(q: object, k: object, v: object, g: object
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inputs the GDN and GKA decode steps share: ``q [B, Tn, Hq, K]`` (``1 <= Tn <= MAX_TOKENS``),
    ``k [B, Tn, Hk, K]`` and ``v [B, Tn, Hv, V]`` of ``q``'s dtype and device, and the log-decay
    ``g [B, Tn, H]`` whose head count ``H`` is the number of state heads. Returns ``(q, k, v, g)``."""
    q = activation("q", q, 4)
    B, Tn, _, K = q.shape
    tokens("q", q)
    k = activation("k", k, 4, q.dtype, q.device)
    expect_shape("k", k, (B, Tn, None, K))
    v = activation("v", v, 4, q.dtype, q.device)
    expect_shape("v", v, (B, Tn, None, None))
    g = gate("g", g, (B, Tn, None), q.device)
    return q, k, v, g


def strides3(t: torch.Tensor | None) -> tuple[int, int, int]:
    """Element strides of dims 0..2 (batch, token, head) of a ``[B, T, H, ...]`` tensor."""
    if t is None:
        return (0, 0, 0)
    return (t.stride(0), t.stride(1), t.stride(2))


def indices(state_indices: object, dst_state_indices: object, batch: int, slots: int,
            device: torch.device) -> dict[str, Any]:
    """Launcher arguments for the slot indices; ``None`` means slot ``b`` (dst defaults to src)."""
    args: dict[str, Any] = {"src_idx": 0, "dst_idx": 0, "src64": False, "dst64": False}
    if state_indices is None and slots < batch:
        raise ValueError(f"state_indices: required when the pool has fewer slots ({slots}) than "
                         f"sequences ({batch})")
    for key, name, idx in (("src", "state_indices", state_indices), ("dst", "dst_state_indices", dst_state_indices)):
        if idx is None:
            continue
        n = check_index_tensor(name, idx, device=device, upper=slots, sync=False)
        if n != batch:
            raise ValueError(f"{name}: expected {batch} entries (one per sequence), got {n}")
        args[f"{key}_idx"] = idx.data_ptr()
        args[f"{key}64"] = idx.dtype == torch.int64
    if dst_state_indices is None:
        args["dst_idx"], args["dst64"] = args["src_idx"], args["src64"]
    return args


def output(out: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The preallocated output (checked) or a new one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    out = check_tensor("out", out, dtypes=(dtype,), device=device)
    expect_shape("out", out, shape)
    if out.shape[-1] > 1 and out.stride(-1) != 1:
        raise ValueError(f"out: expected the last dimension to be contiguous, got strides {tuple(out.stride())}")
    return out


def real(name: str, value: object, lo: float = -math.inf, allow_lo: bool = True) -> float:
    """A finite real number (bools rejected) ``>= lo`` (``> lo`` unless ``allow_lo``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < lo or (v == lo and not allow_lo):
        bound = f">= {lo}" if allow_lo else f"> {lo}"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value}")
    return v


def flag(name: str, value: object) -> bool:
    """A real ``bool`` (ints rejected)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def tag(name: str, t: torch.Tensor | None) -> int:
    """dtype tag of an optional tensor (0 when absent)."""
    return 0 if t is None else dtype_tag(name, t)


def ptr(t: torch.Tensor | None) -> int:
    """Data pointer of an optional tensor (0 when absent)."""
    return 0 if t is None else t.data_ptr()


def launch(fn_name: str, args: dict[str, Any], device: torch.device) -> None:
    """Run ``gka_kernels._C.<fn_name>(**args)`` on the current stream of ``device`` (CUDA only)."""
    if device.type != "cuda":
        raise ValueError(f"{fn_name}: expected CUDA tensors, got device {device}")
    from gka_kernels.cuda._loader import load_extension

    fn = getattr(load_extension(), fn_name)
    if device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            fn(**args, stream=torch.cuda.current_stream(device).cuda_stream)
    else:
        fn(**args, stream=torch.cuda.current_stream(device).cuda_stream)
