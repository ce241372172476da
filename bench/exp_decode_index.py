"""What the slot index costs a CUDA decode-1 step (GPU experiment).

The CUDA decode kernels address a state pool through ``state_indices``: a step loads the slot
index, then the state. The suite's decode-1 cases give every rotated set its own index tensor, so
both loads come from DRAM. In a model, one index tensor serves every layer of a step and stays in
L2. This times each CUDA decode-1 step both ways, and without any index (the pool addressed by
batch row, as the Triton steps are timed), with the states (and inputs) rotated past L2 as in the
suite. For scale, it also times two copies of one decode-1 GDN / Mamba-2 state (2 MiB read
and written) over as many rotated sets: ``state_copy`` (a slot index, then the copy; one CTA
row per slot) and ``Tensor.copy_``. Prints one JSON object.

    python -m bench.exp_decode_index [--rounds 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.cases import decode_sets, gdn_decode, gka_decode, mamba2_decode
from bench.shapes import SHAPES
from bench.timing import rotating, time_ms


BUILDERS = {"gdn": gdn_decode, "mamba2": mamba2_decode, "gka": gka_decode}


INDEX_MODES = ("per set", "shared", "none")


def step_sets(op: str, n: int, index: str):
    """``n`` independent decode-1 steps of ``op`` (the suite's CUDA cases): an index tensor per set
    (``"per set"``), one shared by all of them (``"shared"``), or none (``"none"``: the kernel
    addresses the pool by batch row and loads no index, as the Triton steps are timed)."""
    sh = SHAPES["decode-1"]
    shared = torch.arange(sh.batch, device="cuda", dtype=torch.int32) if index == "shared" else None
    params = {"num_iter": 30} if op == "gka" else {}
    return [BUILDERS[op]("ours-cuda", sh, "decode", state_indices=shared, indexed=index != "none", **params)[0]
            for _ in range(n)]


def copy_sets(n: int, kind: str):
    """``n`` independent copies of a decode-1 state: slot 0 to slot 1 of a two-slot pool through
    the extension's ``state_copy`` launcher (the Python wrapper checks index values on the host,
    which a graph capture forbids), or a plain ``copy_`` between two tensors."""
    from gka_kernels.cuda import load_extension

    ext = load_extension()
    sh = SHAPES["decode-1"]
    fns = []
    for _ in range(n):
        pool = torch.randn(2, sh.heads, sh.head_dim, sh.head_dim, device="cuda")
        if kind == "state_copy":
            src = torch.zeros(1, device="cuda", dtype=torch.int64)
            dst = torch.ones(1, device="cuda", dtype=torch.int64)
            fns.append(lambda pool=pool, src=src, dst=dst: ext.state_copy(
                pool.data_ptr(), pool.data_ptr(), src.data_ptr(), dst.data_ptr(), 1, pool[0].numel(),
                torch.cuda.current_stream().cuda_stream))
        else:
            fns.append(lambda pool=pool: pool[1].copy_(pool[0]))
    return fns


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.exp_decode_index", description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args(argv)
    rows = []
    for rnd in range(args.rounds):
        for op in ("gdn", "mamba2", "gka"):
            n = decode_sets(op, SHAPES["decode-1"], {"num_iter": 30} if op == "gka" else {})
            for index in INDEX_MODES:
                ms, method = time_ms(rotating(step_sets(op, n, index)), graph=True)
                assert method == "cudagraph", method
                rows.append({"round": rnd, "op": op, "sets": n, "index": index, "us": ms * 1e3})
                print(f"round {rnd} {op} decode-1 ({n} sets) index {index}: {ms * 1e3:.2f} us", flush=True)
        n = decode_sets("gdn", SHAPES["decode-1"], {})
        for kind in ("state_copy", "copy_"):
            ms, method = time_ms(rotating(copy_sets(n, kind)), graph=True)
            assert method == "cudagraph", method
            rows.append({"round": rnd, "op": kind, "sets": n, "us": ms * 1e3})
            print(f"round {rnd} {kind} of a decode-1 GDN state ({n} sets): {ms * 1e3:.2f} us", flush=True)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
