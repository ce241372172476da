"""End-to-end decode throughput and cache memory of a converted hybrid vs its source Transformer.

    python -m bench.bench_e2e --out DIR [--ssm gka|gdn|mamba2] [--ratio 0.5] [--contexts 1024,...,32768]
    python -m bench.bench_e2e --smoke --out DIR          # tiny model on the CPU (checks the script)
    python -m bench.bench_e2e --plot RESULT.json         # (re)draw the PNG of a saved result

The source is a Llama-architecture model with random weights built from a config (default
``~0.9B``: hidden 2048, 16 layers, 16 query / 8 key-value heads of 128, MLP 5632, vocab 32000,
bf16), so nothing is downloaded. It is converted with ``gka_kernels.hybrid.convert_to_hybrid``
(``--ratio`` of the layers, placed uniformly). For every context length the benchmark prefills a
random prompt of that length (batch ``--batch``) into a fresh cache, then runs ``--new-tokens``
greedy decode steps through the model's ``forward`` with the cache (what ``generate`` does,
without its bookkeeping), timing the steps after ``--warmup`` untimed ones. One untimed prefill and
decode at the first context precedes the timed ones (kernel compilation and autotuning). It reports decode
tokens/s (all sequences), prefill tokens/s, the cache bytes after the prefill (the source's KV
cache grows in every layer; the hybrid's only in its attention layers, plus a fixed SSM state),
and the peak GPU memory. Writes ``e2e-<card>-<time>.json`` and a PNG plot (needs matplotlib; on a
machine without it, copy the JSON elsewhere and use ``--plot``) to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

DEFAULT_MODEL = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=65536, rms_norm_eps=1e-5, tie_word_embeddings=False)
SMOKE_MODEL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_e2e", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results", help="folder for the JSON and PNG")
    p.add_argument("--smoke", action="store_true", help="tiny model, short contexts, CPU allowed")
    p.add_argument("--ssm", default="gka", help="gka, gdn or mamba2")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of layers replaced (uniform placement)")
    p.add_argument("--contexts", default=None, help="comma-separated prompt lengths (default 1K..32K)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--dtype", default=None, help="bfloat16 (GPU default) or float32 (CPU default)")
    p.add_argument("--num-iter", type=int, default=None, help="GKA Chebyshev iterations (default 30)")
    p.add_argument("--model", default=None, help="JSON of LlamaConfig overrides for the source")
    p.add_argument("--tag", default="", help="suffix for the result file names")
    p.add_argument("--plot", default=None, help="only draw the PNG of this saved result JSON (next to it)")
    return p.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_bytes(cache) -> int:
    from gka_kernels.hybrid import HybridCache

    if isinstance(cache, HybridCache):
        return cache.memory_bytes()["total"]
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if getattr(layer, "keys", None) is not None)


@torch.no_grad()
def measure(model, new_cache, context: int, batch: int, new_tokens: int, warmup: int,
            vocab: int, device: torch.device) -> dict:
    """Prefill ``context`` random tokens, then time ``new_tokens`` greedy decode steps."""
    gen = torch.Generator(device="cpu").manual_seed(context)
    prompt = torch.randint(0, vocab, (batch, context), generator=gen).to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cache = new_cache()
    _sync(device)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    cache_after_prefill = _cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)
    step_ms = []
    for i in range(warmup + new_tokens):
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            step_ms.append((time.perf_counter() - t0) * 1e3)
    median = statistics.median(step_ms)
    row = {"context": context, "batch": batch, "prefill_s": prefill_s,
           "prefill_tokens_per_s": batch * context / prefill_s, "decode_step_ms_median": median,
           "decode_tokens_per_s": batch * 1e3 / median, "cache_bytes_after_prefill": cache_after_prefill,
           "cache_bytes_end": _cache_bytes(cache)}
    if device.type == "cuda":
        row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del cache, out
    gc.collect()
    return row


def summarize(result: dict) -> list[dict]:
    """Per context: hybrid / source decode speed and cache size ratios (contexts where both ran)."""
    src_rows, hyb_rows = result["models"].values()
    rows = []
    for s, h in zip(src_rows, hyb_rows):
        if "error" in s or "error" in h:
            continue
        rows.append({"context": s["context"],
                     "decode_speedup": h["decode_tokens_per_s"] / s["decode_tokens_per_s"],
                     "cache_ratio": h["cache_bytes_after_prefill"] / s["cache_bytes_after_prefill"]})
    return rows


def build_models(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from gka_kernels.hybrid.pattern import count_from_ratio, pattern_from_layers, uniform_layers
    from gka_kernels.hybrid.transfer import convert_to_hybrid

    spec = dict(SMOKE_MODEL if args.smoke else DEFAULT_MODEL)
    if args.model:
        spec.update(json.loads(args.model))
    config = LlamaConfig(**spec)
    torch.manual_seed(0)
    with torch.device(device):
        source = LlamaForCausalLM(config).to(dtype).eval()
    n = config.num_hidden_layers
    pattern = pattern_from_layers(n, uniform_layers(n, count_from_ratio(n, args.ratio)), args.ssm)
    ssm_config = {"GKA": {"num_iter": args.num_iter}} if args.num_iter is not None and "GKA" in pattern else None
    hybrid, _ = convert_to_hybrid(source, pattern, ssm_config=ssm_config, source_name="random Llama-like")
    return config, source, hybrid, pattern


def environment(device: torch.device) -> dict:
    import transformers
    import triton

    import gka_kernels

    env = {"torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "device": str(device),
           "gka_kernels_cuda_ext": gka_kernels.cuda_available()}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(card=prop.name, memory_gib=round(prop.total_memory / 2**30, 1))
    return env


def plot(result: dict, path: Path) -> bool:
    """Decode tokens/s and cache MiB against context; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in result["models"].items():
        ctx = [r["context"] for r in rows if "error" not in r]
        ax1.plot(ctx, [r["decode_tokens_per_s"] for r in rows if "error" not in r], marker="o", label=name)
        ax2.plot(ctx, [r["cache_bytes_after_prefill"] / 2**20 for r in rows if "error" not in r],
                 marker="o", label=name)
    for ax, title, ylabel in ((ax1, "decode throughput", "tokens / s"), (ax2, "cache after prefill", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{result['env'].get('card', result['env']['device'])}: source vs hybrid "
                 f"{result['pattern']} (batch {result['batch']}, {result['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.plot:
        path = Path(args.plot)
        result = json.loads(path.read_text())
        if not plot(result, path.with_suffix(".png")):
            raise SystemExit("--plot needs matplotlib (pip install matplotlib)")
        print(f"wrote {path.with_suffix('.png')}")
        return result
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("bench_e2e needs a GPU (the default model and contexts); use --smoke on a CPU")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: one thread is faster and steadier on a shared CPU
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    contexts = ([int(c) for c in args.contexts.split(",")] if args.contexts
                else ([16, 64] if args.smoke else [1024 * 2**i for i in range(6)]))
    new_tokens, warmup = (3, 1) if args.smoke else (args.new_tokens, args.warmup)
    config, source, hybrid, pattern = build_models(args, device, dtype)
    from transformers import DynamicCache

    from gka_kernels.hybrid.evaluate import count_parameters

    models = {"source": (source, lambda: DynamicCache(config=source.config)),
              f"hybrid {args.ssm}": (hybrid, hybrid.new_cache)}
    result = {"bench": "e2e", "pattern": pattern, "batch": args.batch, "dtype": str(dtype).replace("torch.", ""),
              "new_tokens": new_tokens, "model_config": config.to_dict(), "env": environment(device),
              "parameters": {name: count_parameters(m) for name, (m, _) in models.items()}, "models": {}}
    for name, (model, new_cache) in models.items():
        # Untimed pass first: the first prefill and decode step compile (and autotune) the kernels.
        measure(model, new_cache, contexts[0], args.batch, 1, 1, config.vocab_size, device)
        rows = []
        for ctx in contexts:
            try:
                row = measure(model, new_cache, ctx, args.batch, new_tokens, warmup, config.vocab_size, device)
            except torch.cuda.OutOfMemoryError as exc:
                row = {"context": ctx, "error": f"out of memory: {str(exc).splitlines()[0]}"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(row)
            if "error" in row:
                print(f"{name:>12} ctx {ctx:>6}: {row['error']}", flush=True)
            else:
                print(f"{name:>12} ctx {ctx:>6}: decode {row['decode_tokens_per_s']:9.1f} tok/s "
                      f"({row['decode_step_ms_median']:.2f} ms/step), "
                      f"prefill {row['prefill_tokens_per_s']:10.0f} tok/s, "
                      f"cache {row['cache_bytes_after_prefill'] / 2**20:9.2f} MiB", flush=True)
        result["models"][name] = rows
    result["summary"] = summarize(result)
    for row in result["summary"]:
        print(f"ctx {row['context']:>6}: hybrid/source decode speed x{row['decode_speedup']:.2f}, "
              f"cache x{row['cache_ratio']:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = result["env"].get("card", "cpu").replace(" ", "_")
    stem = f"e2e-{card}-{time.strftime('%Y%m%d-%H%M%S')}{('-' + args.tag) if args.tag else ''}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    png = out / f"{stem}.png"
    if plot(result, png):
        print(f"wrote {out / (stem + '.json')} and {png}")
    else:
        print(f"wrote {out / (stem + '.json')} (no PNG: matplotlib is not installed here; draw it elsewhere "
              f"with python -m bench.bench_e2e --plot {stem}.json)")
    return result


if __name__ == "__main__":
    main()
