"""Layer benchmark: whole ``GatedKalmaNet`` / ``GatedDeltaNet`` / ``Mamba2`` layers against a
grouped-query attention layer of the same geometry (projections + SDPA), on the PERF.md shapes.

Per shape: training/prefill shapes time ``fwd`` and ``fwdbwd`` (backward of the layer output with a
fixed random cotangent, gradients into the input and all parameters); decode shapes time one
``decode`` step with a cache (SSM layers: fixed-size state; attention: a KV cache holding
``context`` earlier tokens). Attention has no RoPE here (a few elementwise ops at these sizes).

Hooked into the bench CLI by the harness through ``run_layer_bench``; also runnable alone:
``python -m bench.bench_layers [--shapes train-4k,decode-64] [--out bench/results]``.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.shapes import SHAPES, Shape

HIDDEN = 4096


class GQAAttention(nn.Module):
    """Causal grouped-query attention layer (no bias, no RoPE) with SDPA; the baseline."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 dtype=None, device=None) -> None:
        super().__init__()
        f = {"dtype": dtype, "device": device}
        self.h, self.hkv, self.d = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False, **f)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **f)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False, **f)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False, **f)

    def _heads(self, t: torch.Tensor, n: int) -> torch.Tensor:
        return t.view(t.shape[0], t.shape[1], n, self.d).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (self._heads(p(x), n) for p, n in ((self.q_proj, self.h), (self.k_proj, self.hkv),
                                                      (self.v_proj, self.hkv)))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))

    def decode(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: int) -> torch.Tensor:
        """One token per sequence; ``k_cache, v_cache [B, HKV, >pos, D]`` hold ``pos`` earlier tokens."""
        q = self._heads(self.q_proj(x), self.h)
        k_cache[:, :, pos] = self.k_proj(x).view(x.shape[0], self.hkv, self.d)
        v_cache[:, :, pos] = self.v_proj(x).view(x.shape[0], self.hkv, self.d)
        o = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1], enable_gqa=True)
        return self.o_proj(o.transpose(1, 2).reshape(x.shape[0], 1, -1))


def _layers(sh: Shape, dtype, device, gka_num_iters: Sequence[int]):
    """(name, params, constructor) of every layer timed at this shape."""
    from gka_kernels.layers import GatedDeltaNet, GatedKalmaNet, Mamba2

    geo = (HIDDEN, sh.heads, sh.kv_heads, sh.head_dim)
    f = {"dtype": dtype, "device": device}
    out = [("gka", {"num_iter": n}, (lambda n=n: GatedKalmaNet(*geo, num_iter=n, **f))) for n in gka_num_iters]
    out += [("gdn", {}, lambda: GatedDeltaNet(*geo, **f)), ("mamba2", {}, lambda: Mamba2(*geo, **f))]
    return out


def _random_cache(layer, batch: int):
    """A cache with random (non-zero) states; GKA's h_kk symmetric positive semi-definite."""
    c = layer.init_cache(batch)
    for name, t in c.tensors().items():
        if name == "h_kk":
            k = torch.randn_like(t)
            setattr(c, name, k @ k.transpose(-1, -2) / t.shape[-1])
        else:
            setattr(c, name, torch.randn_like(t) * 0.1)
    return c


def _train_fn(module_call: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, params: list, mode: str):
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return module_call(x)
        return fwd, None
    x.requires_grad_(True)
    dy = torch.randn_like(module_call(x))

    def step():
        module_call(x).backward(dy)

    return step, [x, *params]


def _cases(sh: Shape, dtype, device, gka_num_iters, contexts):
    """(row fields, builder) pairs; a builder returns ``(fn, grad_to_none, graph)``."""
    B, T = sh.batch, sh.tokens
    modes = ["decode"] if sh.is_decode else ["fwd", "fwdbwd"]
    for mode in modes:
        for name, params, make in _layers(sh, dtype, device, gka_num_iters):
            def build(make=make, mode=mode):
                layer = make()
                x = torch.randn(B, T, HIDDEN, device=device, dtype=dtype)
                if mode == "decode":
                    cache = _random_cache(layer, B)

                    def step():
                        with torch.no_grad():
                            return layer(x, cache=cache)
                    return step, None, True
                fn, leaves = _train_fn(lambda t: layer(t)[0], x, list(layer.parameters()), mode)
                return fn, leaves, False
            yield {"layer": name, "impl": "ours", "mode": mode, **params}, build
        if mode == "decode":
            for ctx in contexts:
                def build(ctx=ctx):
                    att = GQAAttention(HIDDEN, sh.heads, sh.kv_heads, sh.head_dim, dtype=dtype, device=device)
                    kc = torch.randn(B, sh.kv_heads, ctx + 1, sh.head_dim, device=device, dtype=dtype)
                    vc = torch.randn_like(kc)
                    x = torch.randn(B, 1, HIDDEN, device=device, dtype=dtype)

                    def step():
                        with torch.no_grad():
                            return att.decode(x, kc, vc, ctx)
                    return step, None, True
                yield {"layer": "attention", "impl": "sdpa", "mode": mode, "context": ctx}, build
        else:
            def build(mode=mode):
                att = GQAAttention(HIDDEN, sh.heads, sh.kv_heads, sh.head_dim, dtype=dtype, device=device)
                x = torch.randn(B, T, HIDDEN, device=device, dtype=dtype)
                fn, leaves = _train_fn(att, x, list(att.parameters()), mode)
                return fn, leaves, False
            yield {"layer": "attention", "impl": "sdpa", "mode": mode}, build


def run_layer_bench(shapes: Sequence[Shape], dtype: torch.dtype = torch.bfloat16, device: str = "cuda",
                    timer: Callable | None = None, *, gka_num_iters: Sequence[int] = (30, 10),
                    contexts: Sequence[int] = (8192, 32768),
                    progress: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Time every layer at every shape; one row per case.

    ``timer(fn, graph=bool, grad_to_none=list | None)`` returns milliseconds, or ``(ms, method)``
    as ``bench.timing.time_ms`` does (the default). Decode steps ask for CUDA-graph timing.
    Rows: ``case, layer, impl, shape, mode, ms, method`` (+ ``num_iter`` / ``context``), and
    ``vs_attention`` (time / attention time at the same shape and mode; for decode, against the
    8K-context attention step when timed). A failing case gets ``error`` instead of ``ms``.
    ``progress(rows so far)`` is called after every case.
    """
    if timer is None:
        from bench.timing import time_ms as timer
    rows = []
    for sh in shapes:
        shape_rows = []
        for fields, build in _cases(sh, dtype, device, gka_num_iters, contexts):
            row = {"case": f"layer/{fields['layer']} {sh.name} {fields['mode']}", "shape": sh.name,
                   "hidden": HIDDEN, **fields}
            try:
                fn, leaves, graph = build()
                res = timer(fn, graph=graph, grad_to_none=leaves)
                ms, method = res if isinstance(res, tuple) else (res, "timer")
                row.update(ms=float(ms), method=method)
            except Exception as exc:  # noqa: BLE001 - one failing case must not hide the others
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            finally:
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            shape_rows.append(row)
            if progress is not None:
                progress(rows + shape_rows)
        for mode in {r["mode"] for r in shape_rows}:
            base = [r for r in shape_rows if r["layer"] == "attention" and r["mode"] == mode and "ms" in r]
            base = min(base, key=lambda r: r.get("context", 0), default=None)
            for r in shape_rows:
                if base is not None and r["mode"] == mode and "ms" in r:
                    r["vs_attention"] = r["ms"] / base["ms"]
        rows += shape_rows
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | shape | mode | params | ms | vs attention |", "|---|---|---|---|---|---|"]
    for r in rows:
        params = " ".join(f"{k}={r[k]}" for k in ("num_iter", "context") if k in r)
        ms = f"{r['ms']:.3f}" if "ms" in r else r.get("error", "")
        ratio = f"{r['vs_attention']:.2f}x" if "vs_attention" in r else ""
        lines.append(f"| {r['layer']} | {r['shape']} | {r['mode']} | {params} | {ms} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_layers", description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.bench_layers needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    env = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": triton.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"layers-{env['card'].replace(' ', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"

    def save(rows: list[dict]) -> None:
        (out / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))

    def progress(rows: list[dict]) -> None:  # after every case: a run cut short keeps what it measured
        save(rows)
        r = rows[-1]
        print(r["case"], r.get("num_iter", ""), r.get("context", ""), f"{r['ms']:.4f} ms" if "ms" in r
              else r.get("error"), flush=True)

    rows = run_layer_bench([SHAPES[s] for s in args.shapes.split(",") if s], progress=progress)
    save(rows)  # with the vs_attention ratios
    table = markdown(rows)
    (out / f"{stem}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
