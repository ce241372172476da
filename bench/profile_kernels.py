"""Per-kernel GPU time of benchmark cases, ours and peers side by side (torch.profiler).

``python -m bench.profile_kernels --ops gdn --shapes train-4k [--modes fwd,fwdbwd] [--out DIR]``

Each case of the kernel suite (``bench.cases``) is warmed up (compilation, autotuning), then run
``--steps`` times under the profiler; the device time of every kernel is summed by kernel name and
divided by the number of steps. The table says where one implementation spends its time against
another: which kernels are slower, and how many launches each needs. Each case also gets its host
time per step (the Python, autograd and launch work, measured while a sleep kernel holds the GPU, so
no kernel finishes during the measurement) next to the kernel time: a case whose host time exceeds
its kernel time is launch-bound, and ``--cprofile N`` then lists the N functions with the most own
host time. Writes ``<out>/profile-<card>-<time>.json`` and prints one block per case.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from bench.shapes import SHAPES


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile_kernels", description=__doc__.splitlines()[0])
    p.add_argument("--ops", default="gdn")
    p.add_argument("--shapes", default="train-4k")
    p.add_argument("--modes", default="", help="only these modes (fwd, fwdbwd, decode); default all")
    p.add_argument("--impls", default="", help="only these implementations; default all available")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default="bench/results")
    p.add_argument("--tag", default="")
    p.add_argument("--cprofile", type=int, default=0, help="list the N functions with the most host time")
    return p.parse_args(argv)


def warmed_up_step(fn, leaves=()):
    """A step of ``fn`` that first resets the gradients of ``leaves`` (as the timed benchmark
    does), run three times (compilation, autotuning) and synchronized before it is returned."""
    import torch

    def step():
        for t in leaves:
            t.grad = None
        fn()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    return step


def kernel_times(fn, steps: int, leaves=()) -> tuple[list[dict], float]:
    """``([{name, calls_per_step, us_per_step}], total device us per step)``, slowest first. The
    gradients of ``leaves`` are reset before every step (as the timed benchmark does), so no
    gradient-accumulation kernels are counted."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    step = warmed_up_step(fn, leaves)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time
            calls[ev.name] += 1
    rows = [{"name": n, "calls_per_step": calls[n] / steps, "us_per_step": t / steps}
            for n, t in sorted(total.items(), key=lambda kv: -kv[1])]
    return rows, sum(r["us_per_step"] for r in rows)


def host_time(fn, steps: int, leaves=(), cprofile_rows: int = 0) -> dict:
    """Host microseconds per step of ``fn``, enqueued while ``torch.cuda._sleep`` holds the GPU.

    Returns ``{"host_us_per_step", "gpu_was_blocked", "top"}``. ``gpu_was_blocked`` is False when
    the sleep ended before the last step was enqueued (a host synchronization inside ``fn``, or a
    host time longer than the sleep): the number is then not a pure host time. ``top`` lists the
    ``cprofile_rows`` functions with the most own time (cProfile, a separate pass)."""
    import cProfile
    import pstats
    import time as _time

    import torch

    step = warmed_up_step(fn, leaves)
    torch.cuda._sleep(2_000_000_000)  # about one second at the H100/H200 clock
    blocked = torch.cuda.Event()
    blocked.record()
    t0 = _time.perf_counter()
    for _ in range(steps):
        step()
    host = (_time.perf_counter() - t0) / steps * 1e6
    still_blocked = not blocked.query()
    torch.cuda.synchronize()
    top = []
    if cprofile_rows:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(steps):
            step()
        prof.disable()
        torch.cuda.synchronize()
        stats = pstats.Stats(prof)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:cprofile_rows]
        top = [{"function": f"{path}:{line}({name})", "calls_per_step": nc / steps,
                "own_us_per_step": tt / steps * 1e6, "cum_us_per_step": ct / steps * 1e6}
               for (path, line, name), (_cc, nc, tt, ct, _callers) in rows]
    return {"host_us_per_step": host, "gpu_was_blocked": still_blocked, "top": top}


def autotuned_configs() -> dict[str, list[str]]:
    """The configs our autotuned kernels picked, per kernel and tuning key (``Autotuner.cache``)."""
    import sys

    from triton.runtime.autotuner import Autotuner

    found: dict[str, list[str]] = {}
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("gka_kernels.") or mod is None:
            continue
        for attr, obj in vars(mod).items():
            if isinstance(obj, Autotuner) and obj.cache:
                found[f"{mod_name}.{attr}"] = [f"{key}: {cfg}" for key, cfg in obj.cache.items()]
    return found


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.__main__ import environment
    from bench.cases import make_cases, peer_available

    shapes = [SHAPES[s] for s in args.shapes.split(",") if s]
    modes = set(filter(None, args.modes.split(",")))
    impls = set(filter(None, args.impls.split(",")))
    env = environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = (env.get("card") or "gpu").replace(" ", "_")
    path = out / f"profile-{card}-{time.strftime('%Y%m%d-%H%M%S')}{('-' + args.tag) if args.tag else ''}.json"
    result = {"environment": env, "cases": []}
    for case in make_cases(args.ops.split(","), shapes):
        if (modes and case.mode not in modes) or (impls and case.impl not in impls) or not peer_available(case.impl):
            continue
        fn, leaves = case.build()
        rows, total = kernel_times(fn, args.steps, leaves)
        host = host_time(fn, args.steps, leaves, args.cprofile)
        result["cases"].append({"case": case.name, "total_us_per_step": total, "kernels": rows, **host})
        path.write_text(json.dumps(result, indent=1))
        blocked = "" if host["gpu_was_blocked"] else " (GPU not blocked throughout: not a pure host time)"
        print(f"== {case.name}: {total:.1f} us of kernels, {host['host_us_per_step']:.1f} us of host time"
              f" per step{blocked}", flush=True)
        for r in rows:
            print(f"   {r['us_per_step']:9.1f} us  x{r['calls_per_step']:<4g} {r['name'][:110]}")
        for r in host["top"]:
            print(f"   host {r['own_us_per_step']:8.1f} us own {r['cum_us_per_step']:8.1f} us cum"
                  f" x{r['calls_per_step']:<5g} {r['function'][-110:]}")
        del fn
        torch.cuda.empty_cache()
    result["autotuned"] = autotuned_configs()
    path.write_text(json.dumps(result, indent=1))
    for name, cfgs in result["autotuned"].items():
        print(f"autotuned {name}: " + " | ".join(cfgs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
