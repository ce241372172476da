"""Input validation shared by every op (SPEC section 2).

Every public op validates its arguments here before any kernel launches. Wrong types and dtypes
raise ``TypeError``; wrong rank, shape, device, head grouping, head dim or ``cu_seqlens`` raise
``ValueError``. Each message names the argument, what was expected and what was received.
Checks read only metadata, except ``cu_seqlens`` and index tensors, whose values are checked with
one small host copy (this is the documented cost of passing them; decode paths that must stay
free of host synchronization use ``check_index_tensor(..., sync=False)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

#: dtypes accepted for activations, per device type (SPEC 2).
FLOAT_DTYPES = {
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "cpu": (torch.float32, torch.float64),
}
#: dtypes accepted for recurrent states (float64 only alongside float64 inputs, for gradcheck).
STATE_DTYPES = (torch.float32, torch.float64)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    shape: Sequence[int | None] | None = None,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Check one tensor argument; ``None`` entries of ``shape`` match any size."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got {t.dim()} (shape {tuple(t.shape)})")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name}: expected at least {min_ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(e is not None and e != s for e, s in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if e is None else str(e) for e in shape) + "]"
            raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")
    return t


def check_shape_in(
    name: str,
    t: object,
    shapes: Sequence[Sequence[int]],
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """A tensor whose shape is one of ``shapes`` (e.g. a parameter given per head ``[H]`` or per
    channel ``[H, P]``)."""
    t = check_tensor(name, t, dtypes=dtypes, device=device)
    if tuple(t.shape) not in [tuple(s) for s in shapes]:
        want = " or ".join(str(list(s)) for s in shapes)
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    return t


def check_activation(name: str, t: object, *, ndim: int, device: torch.device | None = None) -> torch.Tensor:
    """A floating activation whose dtype is allowed on its device (float32/16/bf16 on GPU,
    float32/float64 on CPU)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    allowed = FLOAT_DTYPES.get(t.device.type)
    if allowed is None:
        raise ValueError(f"{name}: expected a CPU or CUDA tensor, got device {t.device}")
    return check_tensor(name, t, ndim=ndim, dtypes=allowed, device=device)


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` has the dtype of ``ref``."""
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {t.dtype}")


def check_head_groups(H: int, HKV: int, q_name: str = "q", kv_name: str = "k") -> int:
    """Grouped heads: ``H % HKV == 0``; returns the group size ``H // HKV``."""
    if HKV <= 0 or H % HKV != 0:
        raise ValueError(
            f"{kv_name}: number of heads {HKV} must divide the {H} heads of {q_name} (H % HKV == 0)")
    return H // HKV


def check_head_dim(name: str, dim: int, max_dim: int, *, power_of_two: bool = False) -> None:
    """Head dims between 1 and the kernel's limit."""
    if dim < 1 or dim > max_dim:
        raise ValueError(f"{name}: head dim must be in [1, {max_dim}] for this kernel, got {dim}")
    if power_of_two and dim & (dim - 1):
        raise ValueError(f"{name}: head dim must be a power of two for this kernel, got {dim}")


def check_cu_seqlens(cu_seqlens: object, *, batch: int, total_len: int, device: torch.device) -> int:
    """FlashAttention-style offsets ``[N+1]``: int32/int64, starts at 0, non-decreasing, ends at T.

    Requires ``batch == 1``. Returns the number of sequences ``N``.
    """
    t = check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
    if t.device != torch.device(device):
        raise ValueError(f"cu_seqlens: expected device {device} (the device of the inputs), got {t.device}")
    if batch != 1:
        raise ValueError(f"cu_seqlens: requires batch size 1 (sequences packed along T), got batch {batch}")
    if t.numel() < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 entries [0, ..., T], got {t.numel()}")
    host = t.detach().to("cpu", torch.int64)
    if int(host[0]) != 0:
        raise ValueError(f"cu_seqlens: must start at 0, got {int(host[0])}")
    if int(host[-1]) != total_len:
        raise ValueError(f"cu_seqlens: must end at T={total_len}, got {int(host[-1])}")
    if bool((host[1:] < host[:-1]).any()):
        raise ValueError(f"cu_seqlens: must be non-decreasing, got {host.tolist()}")
    return t.numel() - 1


def check_state(
    name: str,
    state: object,
    shape: Sequence[int],
    *,
    device: torch.device,
    dtypes: Sequence[torch.dtype] = STATE_DTYPES,
) -> torch.Tensor:
    """A recurrent state of exactly ``shape`` (float32; float64 allowed for gradcheck)."""
    return check_tensor(name, state, shape=shape, dtypes=dtypes, device=device)


def check_index_tensor(
    name: str, idx: object, *, device: torch.device, upper: int, sync: bool = True
) -> int:
    """Slot indices (int32/int64, 1-D) in ``[-1, upper)``; -1 marks a padding slot.

    With ``sync=False`` only metadata is checked (no host synchronization, CUDA-graph safe).
    Returns the number of entries.
    """
    t = check_tensor(name, idx, ndim=1, dtypes=(torch.int32, torch.int64))
    if t.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if sync and t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < -1 or hi >= upper:
            raise ValueError(f"{name}: entries must be in [-1, {upper}), got min {lo} max {hi}")
    return t.numel()


def check_positive_int(name: str, value: object, *, lo: int = 1, hi: int | None = None) -> int:
    """An ``int`` in ``[lo, hi]`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lo or (hi is not None and value > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}: expected an int in {rng}, got {value}")
    return value


def check_scale(scale: object, head_dim: int) -> float:
    """``scale`` defaults to ``head_dim ** -0.5``; otherwise a finite real number."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not (float(scale) == float(scale)) or abs(float(scale)) == float("inf"):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return float(scale)


@dataclass(frozen=True)
class SequenceDims:
    """Sizes of a ``[B, T, H, D]`` sequence op after validation."""

    B: int
    T: int
    H: int
    HKV: int
    K: int
    V: int
    N: int  # number of sequences: B, or len(cu_seqlens) - 1


def check_qkv(
    q: object,
    k: object,
    v: object,
    *,
    cu_seqlens: object = None,
    max_head_dim: int = 256,
    k_heads_like_v: bool = True,
) -> SequenceDims:
    """Validate the common ``q [B,T,H,K]``, ``k [B,T,HKV,K]``, ``v [B,T,HKV|H,V]`` triple.

    ``q`` fixes dtype and device; ``k`` and ``v`` must match them. When ``k_heads_like_v`` the
    value heads equal the key heads (``HKV``); otherwise values may have ``H`` or ``HKV`` heads.
    """
    q = check_activation("q", q, ndim=4)
    B, T, H, K = q.shape
    k = check_activation("k", k, ndim=4, device=q.device)
    v = check_activation("v", v, ndim=4, device=q.device)
    check_same_dtype("q", q, k=k, v=v)
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != K:
        raise ValueError(f"k: expected shape [{B}, {T}, HKV, {K}] to match q, got {list(k.shape)}")
    HKV = k.shape[2]
    check_head_groups(H, HKV)
    V = v.shape[3]
    v_heads_ok = v.shape[2] == HKV or (not k_heads_like_v and v.shape[2] == H)
    if v.shape[0] != B or v.shape[1] != T or not v_heads_ok:
        raise ValueError(f"v: expected shape [{B}, {T}, {HKV}, V] to match k, got {list(v.shape)}")
    check_head_dim("q", K, max_head_dim)
    check_head_dim("v", V, max_head_dim)
    N = B
    if cu_seqlens is not None:
        N = check_cu_seqlens(cu_seqlens, batch=B, total_len=T, device=q.device)
    return SequenceDims(B=B, T=T, H=H, HKV=HKV, K=K, V=V, N=N)


def check_gate(name: str, g: object, dims: SequenceDims, ref: torch.Tensor) -> torch.Tensor:
    """A per-query-head gate ``[B, T, H]`` on the device of ``ref`` (any floating dtype)."""
    g = check_tensor(name, g, ndim=3, device=ref.device,
                     dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
    if tuple(g.shape) != (dims.B, dims.T, dims.H):
        raise ValueError(f"{name}: expected shape [{dims.B}, {dims.T}, {dims.H}], got {list(g.shape)}")
    return g
