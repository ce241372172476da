"""GPU timing: CUDA-event medians after warm-up (``triton.testing.do_bench``), CUDA-graph replay for
launch-bound decode steps, and input rotation so memory-bound ops are not timed out of L2."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

L2_BYTES = 64 * 2**20  # larger than the L2 of an H100 (50 MB) or H200 (60 MB)


def rotation_count(bytes_per_set: int) -> int:
    """How many input sets (at most 128) to cycle through so that the working set exceeds ~4x L2."""
    if bytes_per_set <= 0:
        return 1
    return max(1, min(128, -(-4 * L2_BYTES // bytes_per_set)))


def rotating(fns: Sequence[Callable[[], object]]) -> Callable[[], object]:
    """A callable that runs ``fns[0]``, ``fns[1]``, ... in turn (one input set per call)."""
    state = {"i": 0}

    def run():
        f = fns[state["i"] % len(fns)]
        state["i"] += 1
        return f()

    return run


def time_ms(fn: Callable[[], object], *, graph: bool = False, warmup: int = 25, rep: int = 100,
            grad_to_none: Sequence[torch.Tensor] | None = None) -> tuple[float, str]:
    """Median milliseconds per call of ``fn`` and the method used.

    ``graph=True`` captures ``fn`` in a CUDA graph and times replays (GPU time without Python
    launch overhead); if capture fails, falls back to event timing and says so.
    """
    import triton.testing as tt

    if graph:
        try:
            return float(tt.do_bench_cudagraph(fn, rep=rep, return_mode="median")), "cudagraph"
        except Exception as exc:  # noqa: BLE001 - report the fallback, do not hide it
            method = f"events (graph capture failed: {type(exc).__name__})"
            torch.cuda.synchronize()
            return float(tt.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")), method
    return float(tt.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                             return_mode="median")), "events"
