"""Ceilings measured on the card in the same run: device-to-device copy bandwidth (bytes read +
written), dense bf16 matmul rate, and the CUDA-graph replay time of a one-element kernel (the
floor under every decode step timed by graph replay)."""

from __future__ import annotations

import torch

from bench.timing import time_ms


def copy_bandwidth_bytes_per_s(nbytes: int = 2 * 2**30) -> float:
    """Bandwidth of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms, _ = time_ms(lambda: dst.copy_(src), warmup=10, rep=50)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def bf16_matmul_flops_per_s(n: int = 8192) -> float:
    """Rate of an n x n x n bf16 matmul on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms, _ = time_ms(lambda: a @ b, warmup=10, rep=50)
    return 2 * n**3 / (ms * 1e-3)


def graph_kernel_seconds() -> float:
    """GPU time per call of a one-element in-place add, timed like the decode steps (CUDA-graph
    replay of back-to-back calls): launch and completion cost with no work behind it."""
    x = torch.zeros(1, device="cuda")
    ms, _ = time_ms(lambda: x.add_(1.0), graph=True, rep=50)
    return ms * 1e-3


def measure() -> dict[str, float]:
    return {"copy_bytes_per_s": copy_bandwidth_bytes_per_s(), "bf16_flops_per_s": bf16_matmul_flops_per_s(),
            "graph_kernel_s": graph_kernel_seconds()}
