"""Markdown rendering of a benchmark result (the JSON written by ``python -m bench``)."""

from __future__ import annotations


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown_table(result: dict) -> str:
    env, ceil = result["environment"], result["ceilings"]
    lines = [
        f"Card: {env.get('card')} | torch {env['torch']} | Triton {env['triton']} | CUDA {env['cuda']} | "
        f"peers {env['peers']}",
        f"Ceilings measured in this run: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
        f"bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s"
        + (f", empty kernel by graph replay {ceil['graph_kernel_s'] * 1e6:.2f} us" if "graph_kernel_s" in ceil else ""),
        "",
        "| case | impl | ms | floor ms | of floor | TFLOP/s | BW of copy | peer ms / ours ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ours = {}
    for r in result["rows"]:
        if r["impl"] == "ours" and "ms" in r:
            ours[(r["op"], r["shape"], r["mode"], r.get("num_iter"), r.get("context"))] = r["ms"]
    for r in result["rows"]:
        key = (r["op"], r["shape"], r["mode"], r.get("num_iter"), r.get("context"))
        label = f"{r['op']} {r['shape']} {r['mode']}" + (f" it={r['num_iter']}" if r.get("num_iter") else "") \
            + (f" ctx={r['context']}" if r.get("context") else "")
        if "ms" not in r:
            lines.append(f"| {label} | {r['impl']} | {r.get('error', '')[:60]} | | | | | |")
            continue
        ratio = f"{r['ms'] / ours[key]:.2f}x" if key in ours and r["impl"] != "ours" else ""
        lines.append(
            f"| {label} | {r['impl']} | {r['ms']:.4f} | {_fmt(r.get('floor_ms'), '.4f')} | "
            f"{_fmt(r.get('fraction_of_floor'), '.0%')} | {_fmt(r.get('tflops'), '.0f')} | "
            f"{_fmt(r.get('bandwidth_fraction'), '.0%')} | {ratio} |")
    return "\n".join(lines) + "\n"
