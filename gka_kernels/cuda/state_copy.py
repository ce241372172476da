"""Copy state-pool slots on the GPU with the CUDA kernel in csrc/state_copy.cu."""

from __future__ import annotations

import torch

from gka_kernels.common.checks import check_index_tensor, check_tensor
from gka_kernels.cuda._loader import load_extension


def state_copy(src: torch.Tensor, dst: torch.Tensor, src_indices: torch.Tensor,
               dst_indices: torch.Tensor) -> None:
    """``dst[dst_indices[i]] = src[src_indices[i]]`` for every ``i``; pairs with a -1 are skipped.

    src, dst: float32 CUDA pools ``[slots, ...]`` with the same per-slot shape, contiguous.
    src_indices, dst_indices: int64 ``[n]`` on the same device. ``src`` and ``dst`` may be the same
    pool only if no destination slot is also a source slot.
    """
    ext = load_extension()
    check_tensor("src", src, dtypes=(torch.float32,), min_ndim=1, contiguous=True)
    check_tensor("dst", dst, dtypes=(torch.float32,), min_ndim=1, device=src.device, contiguous=True)
    if src.shape[1:] != dst.shape[1:]:
        raise ValueError(f"dst: expected slots of shape {tuple(src.shape[1:])}, got {tuple(dst.shape[1:])}")
    n = check_index_tensor("src_indices", src_indices, device=src.device, upper=src.shape[0])
    if check_index_tensor("dst_indices", dst_indices, device=src.device, upper=dst.shape[0]) != n:
        raise ValueError(f"dst_indices: expected {n} entries like src_indices, got {dst_indices.numel()}")
    if src.device.type != "cuda":
        raise ValueError(f"src: expected a CUDA tensor, got device {src.device}")
    ext.state_copy(src.data_ptr(), dst.data_ptr(), src_indices.data_ptr(), dst_indices.data_ptr(),
                   n, src[0].numel() if src.shape[0] else 0, torch.cuda.current_stream(src.device).cuda_stream)
