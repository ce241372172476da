"""Input validation shared by the GDN ops (SPEC 2)."""

from __future__ import annotations

import torch

from gka_kernels.common.checks import SequenceDims, check_gate, check_qkv, check_scale, check_state

#: Chunk sizes accepted per device type: 64 on the GPU (four 16-row sub-blocks, the smallest
#: tensor-core tile); smaller chunks only under the CPU interpreter (fast tests).
CHUNK_SIZES = {"cuda": (64,), "cpu": (16, 32, 64)}
#: Largest head dim (K and V) the kernels accept.
MAX_HEAD_DIM = 256


def check_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size=None):
    """Validate the shared arguments of the GDN ops (SPEC 2). Returns
    ``(dims, scale, initial_state, cu_seqlens)`` with the state and offsets made contiguous."""
    dims: SequenceDims = check_qkv(q, k, v, cu_seqlens=cu_seqlens, max_head_dim=MAX_HEAD_DIM)
    check_gate("g", g, dims, q)
    check_gate("beta", beta, dims, q)
    scale = check_scale(scale, dims.K)
    if chunk_size is not None:
        allowed = CHUNK_SIZES.get(q.device.type, (64,))
        if isinstance(chunk_size, bool) or chunk_size not in allowed:
            raise ValueError(f"chunk_size: expected one of {allowed} on {q.device.type}, got {chunk_size!r}")
    if initial_state is not None:
        dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
        initial_state = check_state("initial_state", initial_state, (dims.N, dims.H, dims.K, dims.V),
                                    device=q.device, dtypes=dtypes).contiguous()
    if cu_seqlens is not None:
        cu_seqlens = cu_seqlens.contiguous()
    return dims, scale, initial_state, cu_seqlens
