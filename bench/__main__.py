"""Kernel benchmark suite: ``python -m bench [--ops ...] [--shapes ...] [--out DIR]``.

Measures the card's ceilings (copy bandwidth, bf16 matmul) in the same run, times every case
(ours and any importable peer, side by side), computes each case's floor and writes
``<out>/kernels-<card>-<time>.json`` and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

from bench.shapes import SHAPES

OPS = ["gdn", "gla", "mamba2", "gka", "attention"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    p.add_argument("--impls", default="", help="only these implementations (e.g. ours,fla); default all")
    p.add_argument("--out", default="bench/results", help="folder for the JSON and Markdown results")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--rep", type=int, default=100, help="timing repetitions in ms (do_bench rep)")
    return p.parse_args(argv)


def source_digest(root: Path | None = None) -> str:
    """First 12 hex digits of a SHA-256 over the kernel sources (``gka_kernels/**/*.py`` and
    ``csrc/*``, paths and contents, in path order). It names the tree a result came from where the
    copy's git history cannot (the GPU machine's checkout): compute it in a checkout of the
    candidate commit and compare."""
    root = root or Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*(root / "gka_kernels").rglob("*.py"), *(root / "csrc").glob("*")]):
        if path.is_file():
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def environment() -> dict:
    import torch
    import triton

    from bench import peers

    env = {"torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "peers": peers.versions(),
           "source_digest": source_digest()}
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env.update(card=prop.name, sm_count=prop.multi_processor_count,
                   memory_gib=round(prop.total_memory / 2**30, 1))
    import gka_kernels
    env["gka_kernels_cuda_ext"] = gka_kernels.cuda_available()
    return env


def run_case(case, ceilings: dict, rep: int) -> dict:
    import torch

    from bench.floors import floor_ms
    from bench.timing import time_ms

    row = {"case": case.name, "op": case.op, "impl": case.impl, "shape": case.shape.name,
           "mode": case.mode, **case.params}
    try:
        fn, leaves = case.build()
        ms, method = time_ms(fn, graph=case.mode == "decode", rep=rep, grad_to_none=leaves or None)
        row.update(ms=ms, method=method)
        kw = {k: v for k, v in case.params.items() if k in ("num_iter", "context")}
        if case.op == "mamba2":
            kw["chunk"] = 256
        fl = floor_ms(case.op, case.shape, case.mode, ceilings, **kw)
        row.update(fl)
        row["fraction_of_floor"] = fl["floor_ms"] / ms
        if case.mode != "decode":
            row["tflops"] = fl["flops"] / (ms * 1e-3) / 1e12
        else:
            row["bandwidth_fraction"] = fl["bytes"] / (ms * 1e-3) / ceilings["copy_bytes_per_s"]
    except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("python -m bench needs a CUDA device (timings are GPU timings); nothing to do on CPU.",
              file=sys.stderr)
        return 2
    from bench import ceilings as ceil
    from bench.cases import make_cases, peer_available
    from bench.report import markdown_table

    env = environment()
    ceilings = ceil.measure()
    print(f"card {env.get('card')}: copy {ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
          f"bf16 matmul {ceilings['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, "
          f"empty kernel (graph replay) {ceilings['graph_kernel_s'] * 1e6:.2f} us", flush=True)
    shapes = [SHAPES[s] for s in args.shapes.split(",") if s]
    impls = set(filter(None, args.impls.split(",")))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = (env.get("card") or "gpu").replace(" ", "_")
    stem = f"kernels-{card}-{time.strftime('%Y%m%d-%H%M%S')}{('-' + args.tag) if args.tag else ''}"
    rows = []
    result = {"environment": env, "ceilings": ceilings, "rows": rows}
    for case in make_cases(args.ops.split(","), shapes):
        if impls and case.impl not in impls:
            continue
        if not peer_available(case.impl):
            rows.append({"case": case.name, "op": case.op, "impl": case.impl, "shape": case.shape.name,
                         "mode": case.mode, **case.params, "error": "not available"})
            continue
        row = run_case(case, ceilings, args.rep)
        rows.append(row)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))  # partial results survive a kill
        msg = f"{row['ms']:.4f} ms ({row['fraction_of_floor']:.0%} of floor)" if "ms" in row else row["error"]
        print(f"{case.name:55s} {msg}", flush=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown_table(result))
    print(markdown_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
