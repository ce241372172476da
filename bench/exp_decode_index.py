"""What the slot index costs a CUDA decode-1 step (GPU experiment).

The CUDA decode kernels address a state pool through ``state_indices``: a step loads the slot
index, then the state. The suite's decode-1 cases give every rotated set its own index tensor, so
both loads come from DRAM. In a model, one index tensor serves every layer of a step and stays in
L2. This times each CUDA decode-1 step both ways, with the states (and inputs) rotated past L2 as
in the suite. For scale, it also times two copies of one decode-1 GDN / Mamba-2 state (2 MiB read
and written) over as many rotated sets: ``state_copy`` (a slot index, then the copy; one CTA
row per slot) and ``Tensor.copy_``. Prints one JSON object.

    python -m bench.exp_decode_index [--rounds 2]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.cases import _decay, _gate, _keys, _rand, decode_sets
from bench.shapes import SHAPES
from bench.timing import rotating, time_ms


def step_sets(op: str, n: int, shared_index: bool):
    """``n`` independent decode-1 steps of ``op`` (CUDA kernels), their index tensor per set or one
    shared by all of them."""
    from gka_kernels.cuda import gdn_decode, gka_decode, mamba2_decode

    sh = SHAPES["decode-1"]
    B, H, HKV, D = sh.batch, sh.heads, sh.kv_heads, sh.head_dim
    shared = torch.arange(B, device="cuda", dtype=torch.int32)
    fns = []
    for _ in range(n):
        idx = shared if shared_index else torch.arange(B, device="cuda", dtype=torch.int32)
        if op == "gdn":
            q, k, v = _rand(B, 1, H, D), _keys(B, 1, HKV, D), _rand(B, 1, HKV, D)
            g, beta = _decay(B, 1, H), _gate(B, 1, H)
            state = torch.randn(B, H, D, D, device="cuda") * 0.1
            fns.append(lambda q=q, k=k, v=v, g=g, beta=beta, s=state, i=idx:
                       gdn_decode(q, k, v, g, beta, s, i, use_qk_l2norm=True))
        elif op == "mamba2":
            x, Bm, Cm = _rand(B, H, D), _rand(B, HKV, D), _rand(B, HKV, D)
            dt = torch.rand(B, H, device="cuda") * 2 - 4
            A = -torch.rand(H, device="cuda") * 4 - 0.5
            Dp, bias = torch.ones(H, device="cuda"), torch.rand(H, device="cuda") - 2
            state = torch.randn(B, H, D, D, device="cuda") * 0.1
            fns.append(lambda x=x, dt=dt, A=A, Bm=Bm, Cm=Cm, Dp=Dp, bias=bias, s=state, i=idx:
                       mamba2_decode(s, x, dt, A, Bm, Cm, state_indices=i, D=Dp, dt_bias=bias, dt_softplus=True))
        else:
            q, k, v = _keys(B, 1, H, D), _keys(B, 1, HKV, D), _rand(B, 1, HKV, D)
            g, alpha = _decay(B, 1, H), _gate(B, 1, H)
            kk = torch.randn(B, H, D, D, device="cuda")
            h_kk, h_kv = (kk @ kk.transpose(-1, -2)) / D, torch.randn(B, H, D, D, device="cuda") * 0.1
            fns.append(lambda q=q, k=k, v=v, g=g, a=alpha, hk=h_kk, hv=h_kv, i=idx:
                       gka_decode(q, k, v, g, a, hk, hv, i, num_iter=30))
    return fns


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
            for shared_index in (False, True):
                ms, method = time_ms(rotating(step_sets(op, n, shared_index)), graph=True)
                assert method == "cudagraph", method
                rows.append({"round": rnd, "op": op, "sets": n, "shared_index": shared_index, "us": ms * 1e3})
                print(f"round {rnd} {op} decode-1 ({n} sets) index {'shared' if shared_index else 'per set'}: "
                      f"{ms * 1e3:.2f} us", flush=True)
        n = decode_sets("gdn", SHAPES["decode-1"], {})
        for kind in ("state_copy", "copy_"):
            ms, method = time_ms(rotating(copy_sets(n, kind)), graph=True)
            assert method == "cudagraph", method
            rows.append({"round": rnd, "op": kind, "sets": n, "us": ms * 1e3})
            print(f"round {rnd} {kind} of a decode-1 GDN state ({n} sets): {ms * 1e3:.2f} us", flush=True)
    print(json.dumps({"rows": rows}))


if __name__ == "__main__":
    main()
