"""Where the time of the GKA ridge-solve kernels goes (GPU experiment, train-4k shape).

Times ``gka_solve_fwd`` and ``gka_solve_bwd`` alone with a fixed launch config (4 or 8 warps) at
``num_iter`` 0, 1 and 30: the 0-iteration time is each kernel's fixed cost (loads, the Frobenius
norms, the backward's per-row scalars, stores), ``(t30 - t0) / 30`` its cost per iteration.
``num_iter=1`` is a separately compiled kernel (Triton specializes integer arguments equal to 1),
so its time need not lie on that line. Prints one JSON object.

    python -m bench.exp_gka_solve
    python -m bench.exp_gka_solve --ncu 10   # one forward and one backward launch at num_iter 10
                                             # with the autotuned configs, after one warm-up each,
                                             # for ncu (--launch-skip 2 -k regex:gka_solve)
"""

from __future__ import annotations

import json
import sys

import torch
import triton

from bench.cases import _decay, _gate, _keys
from gka_kernels.common.cumsum import chunk_local_cumsum
from gka_kernels.gka import solve
from gka_kernels.gka._common import CHUNK
from gka_kernels.gka.chunk_h import chunk_gka_fwd_h

class _FixedConfig:
    """Stands in for an autotuned kernel: launches its JIT function with one config."""

    def __init__(self, kernel, num_warps: int):
        self.fn, self.num_warps = kernel.fn, num_warps

    def __getitem__(self, grid):
        return lambda *a, **kw: self.fn[grid](*a, num_warps=self.num_warps, num_stages=1, **kw)


def main() -> None:
    torch.manual_seed(0)
    B, T, H, HKV, K = 4, 4096, 32, 8, 128
    q, k = _keys(B, T, H, K), _keys(B, T, HKV, K)
    gk, alpha = _decay(B, T, H), _gate(B, T, H)
    gcum = chunk_local_cumsum(gk.float(), CHUNK)
    h, _ = chunk_gka_fwd_h(k, gcum, H, B, B * triton.cdiv(T, CHUNK), None, False, None, None, None)
    x, _, fro = solve.gka_solve_fwd(q, k, gcum, h, alpha, 0.02, 30, None, None)
    dqm = torch.randn(B, T, H, K, device="cuda")
    if len(sys.argv) == 3 and sys.argv[1] == "--ncu":
        it = int(sys.argv[2])
        for _ in range(2):
            solve.gka_solve_fwd(q, k, gcum, h, alpha, 0.02, it, None, None)
            solve.gka_solve_bwd(q, k, gcum, h, alpha, x, fro, dqm, 0.02, it, True, None, None)
        torch.cuda.synchronize()
        return
    results = {"card": torch.cuda.get_device_name(), "triton": triton.__version__, "ms": {}}
    kernels = ("gka_solve_fwd_kernel", "gka_solve_bwd_kernel")
    for w in (4, 8):
        saved = {n: getattr(solve, n) for n in kernels}
        for n in kernels:
            setattr(solve, n, _FixedConfig(saved[n], w))
        try:
            for it in (0, 1, 30):
                calls = {"fwd": lambda: solve.gka_solve_fwd(q, k, gcum, h, alpha, 0.02, it, None, None),
                         "bwd": lambda: solve.gka_solve_bwd(q, k, gcum, h, alpha, x, fro, dqm, 0.02, it,
                                                            True, None, None)}
                for cname, call in calls.items():
                    ms = triton.testing.do_bench(call, warmup=25, rep=100)
                    results["ms"][f"{cname} w{w} it{it}"] = round(ms, 4)
                    print(f"{cname} w{w} it{it}", results["ms"][f"{cname} w{w} it{it}"], file=sys.stderr)
        finally:
            for n, kern in saved.items():
                setattr(solve, n, kern)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
