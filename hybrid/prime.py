"""Convert a Transformer into an attention + SSM hybrid and align it (priming): ``gka-prime``.

    gka-prime [SOURCE] [--out DIR] [--ssm gka|gdn|mamba2] [--pattern P | --ratio R | --num-ssm M]
              [--select swa|uniform] [--text FILE] [--eval-text FILE] [--align-steps N] [--resume]

SOURCE is a local model directory (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE; no hub access).
Without SOURCE the embedded byte-level Llama shipped with the package is converted: this runs on
a CPU in a few minutes and prints the summary table (teacher / hybrid perplexity before and after
alignment, parameters, cache bytes per token, decode speed).

Steps: (1) choose the layers to replace (``--pattern``, or a count from ``--ratio``/``--num-ssm``
placed by ``--select``: ``swa`` scores every attention layer by the perplexity kept when it alone
uses sliding-window attention, ``uniform`` spreads them evenly); (2) transfer the attention
weights into the SSM mixers, one log line per layer; (3) align the SSM layers to the source by
distillation for ``--align-steps`` steps, with checkpoints (``--resume`` continues an interrupted
run from ``DIR``); (4) evaluate and save the hybrid in ``DIR`` (``save_pretrained`` format,
loadable with ``HybridForCausalLM.from_pretrained`` or ``AutoModelForCausalLM`` after
``import gka_kernels.hybrid``).

Text files: plain UTF-8, or JSONL with a ``"text"`` field per line. Default text: the Python
standard library's sources (always available offline; ``--eval-text`` defaults to held-out files).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch

from .align import AlignConfig, Aligner
from .data import read_text, stdlib_text
from .embedded import EMBEDDED_DIR, embedded_available
from .evaluate import count_parameters, decode_tokens_per_second, perplexity
from .families import get_family
from .modeling import HybridForCausalLM, cache_bytes_per_token
from .pattern import count_from_ratio, parse_pattern, pattern_from_layers, ssm_token
from .selection import score_layers_swa, select_layers
from .tokenizer import ByteTokenizer
from .transfer import convert_to_hybrid

STAGE0 = "stage0"
CHECKPOINTS = "checkpoints"
REPORT = "prime_report.json"
LOG = "prime_log.txt"


class Tokenizer:
    """Text -> 1-D token ids with either the byte tokenizer or the source's own tokenizer."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        if ByteTokenizer.exists(directory):
            self.impl = ByteTokenizer.load(directory)
            self.is_byte = True
        else:
            from transformers import AutoTokenizer

            try:
                self.impl = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - re-raised with the cause named
                raise ValueError(f"{directory}: no tokenizer found next to the model ({exc}); the text "
                                 "options need one") from exc
            self.is_byte = False

    def encode(self, text: str) -> torch.Tensor:
        if self.is_byte:
            return torch.tensor(self.impl.encode(text), dtype=torch.long)
        return torch.tensor(self.impl(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    def save(self, directory: Path) -> None:
        if self.is_byte:
            self.impl.save(directory)
        else:
            self.impl.save_pretrained(directory)


def load_source(source: str | None, device: torch.device, dtype: torch.dtype):
    """(model, tokenizer, name) of SOURCE (a local directory) or of the embedded model."""
    from transformers import AutoConfig

    if source is None:
        if not embedded_available():
            raise SystemExit(f"the embedded model is missing from {EMBEDDED_DIR}; build it with "
                             "`python -m gka_kernels.hybrid.train_embedded` or pass SOURCE")
        directory, name = EMBEDDED_DIR, "embedded byte-level Llama (gka_kernels.hybrid.assets)"
    else:
        directory, name = Path(source), source
        if not directory.is_dir():
            raise SystemExit(f"SOURCE {source!r}: expected a local model directory (this tool never "
                             "downloads; save the model with save_pretrained first)")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"SOURCE {directory}: cannot read its config.json ({exc})") from None
    if config.model_type == "gka_hybrid":
        raise SystemExit(f"SOURCE {directory} is already a hybrid model; pass the original Transformer")
    try:
        family = get_family(config.model_type)
    except ValueError as exc:
        raise SystemExit(f"SOURCE {directory}: {exc}") from None
    model = family.causal_lm_cls().from_pretrained(directory, local_files_only=True, dtype=dtype)
    return model.to(device).eval(), Tokenizer(directory), name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gka-prime", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("source", nargs="?", default=None,
                   help="local model directory (default: the embedded byte-level Llama)")
    p.add_argument("--out", type=Path, default=Path("gka-prime-out"),
                   help="output directory (default ./gka-prime-out)")
    p.add_argument("--ssm", default="gdn", help="gka, gdn or mamba2 (default gdn: fast on CPU)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--pattern", help="explicit hybrid_override_pattern, e.g. '*-GKA-GKA-*'")
    how.add_argument("--ratio", type=float, help="fraction of layers to replace (default 0.5)")
    how.add_argument("--num-ssm", type=int, help="number of layers to replace")
    p.add_argument("--select", choices=("swa", "uniform"), default="swa",
                   help="where the replaced layers go (default swa)")
    p.add_argument("--swa-window", type=int, default=None,
                   help="sliding window for --select swa (default --seq-len // 4; the scoring "
                        "windows are 2 * --seq-len tokens long)")
    p.add_argument("--text", type=Path, help="text for selection and alignment (plain or JSONL)")
    p.add_argument("--eval-text", type=Path, help="held-out text for perplexity")
    p.add_argument("--max-text-bytes", type=int, default=2_000_000,
                   help="bytes of the default (standard library) alignment text; the stream wraps around")
    p.add_argument("--align-steps", type=int, default=30, help="alignment steps (0 = convert only)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (constant after 5 warmup steps)")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--layer-loss-weight", type=float, default=0.0,
                   help="weight of the per-layer loss (mixer output vs the source attention it replaces)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--num-iter", type=int, default=None, help="GKA Chebyshev iterations (default 30)")
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows of --seq-len*2 tokens")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens generated to time decoding")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (default 1: predictable on shared machines)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _Log:
    """Prints and keeps lines for ``prime_log.txt``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def _windows(tokens: torch.Tensor, seq_len: int, count: int) -> torch.Tensor:
    n = min(count, tokens.numel() // seq_len)
    if n < 1:
        raise SystemExit(f"text has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)


def _choose_pattern(args, source, sel_windows: torch.Tensor, log: _Log) -> str:
    n = source.config.num_hidden_layers
    if args.pattern is not None:
        parse_pattern(args.pattern, n)
        return args.pattern
    count = args.num_ssm if args.num_ssm is not None else count_from_ratio(n, 0.5 if args.ratio is None else args.ratio)
    if not 0 <= count <= n:
        raise SystemExit(f"--num-ssm: expected 0..{n}, got {count}")
    scores = None
    if args.select == "swa":
        window = args.swa_window or max(1, sel_windows.shape[1] // 8)
        t0 = time.time()
        base, scores = score_layers_swa(source, sel_windows, window)
        log(f"layer selection (swa, window {window}, {sel_windows.numel()} tokens, {time.time() - t0:.1f} s): "
            f"full-attention perplexity {base:.3f}")
        for s in scores:
            log(f"  layer {s.layer:>3}: perplexity with SWA {s.swa_perplexity:9.3f}   "
                f"quality kept {s.quality_kept:.4f}")
    layers = select_layers(args.select, n, count, scores)
    pattern = pattern_from_layers(n, layers, args.ssm)
    log(f"replacing layers {layers} ({args.select}): pattern {pattern}")
    return pattern


def _ssm_config(args, pattern: str) -> dict:
    cfg: dict = {}
    if args.num_iter is not None:
        if "GKA" not in parse_pattern(pattern):
            raise SystemExit("--num-iter applies to GKA layers only")
        cfg["GKA"] = {"num_iter": args.num_iter}
    return cfg


def _install_stop_handlers(aligner: Aligner) -> dict:
    previous = {}

    def handler(signum, frame):
        if aligner.stop_requested:
            raise KeyboardInterrupt
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              "(rerun with --resume to continue; press Ctrl-C again to abort now)", file=sys.stderr, flush=True)
        aligner.request_stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def _cache_numbers(model, prompt: torch.Tensor) -> tuple[int, int]:
    """(bytes per additional token, fixed bytes) of ``model``'s cache for one sequence."""
    dtype = next(model.parameters()).dtype
    if isinstance(model, HybridForCausalLM):
        per_token = cache_bytes_per_token(model.config, dtype)
        with torch.no_grad():
            out = model(input_ids=prompt[:1], use_cache=True)
        return per_token, out.cache.memory_bytes()["ssm"]
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_key_value_heads * head_dim * element * cfg.num_hidden_layers, 0


def _texts(args, tok: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(alignment/selection tokens, held-out evaluation windows). Without ``--eval-text``, the
    held-out text is the standard library's held-out files, or the tail of ``--text`` (which is
    then not used for alignment)."""
    span = args.seq_len * 2
    if args.text is not None:
        tokens = tok.encode(read_text(args.text))
    else:
        tokens = tok.encode(stdlib_text("train", max_bytes=args.max_text_bytes))
    if args.eval_text is not None:
        heldout = tok.encode(read_text(args.eval_text))
    elif args.text is not None:
        cut = max(tokens.numel() // 10, args.eval_windows * span)
        if tokens.numel() - cut < span:
            raise SystemExit(f"--text {args.text}: {tokens.numel()} tokens are too few to hold out "
                             f"{cut} for evaluation and align on the rest; pass --eval-text or more text")
        tokens, heldout = tokens[:-cut], tokens[-cut:]
    else:
        heldout = tok.encode(stdlib_text("heldout", max_bytes=args.eval_windows * span * 8))
    return tokens, _windows(heldout, span, args.eval_windows)


def _stage0(args, source, tok: Tokenizer, name: str, sel_windows: torch.Tensor, out: Path, log: _Log):
    """The converted (unaligned) hybrid: built now, or reloaded from ``DIR/stage0`` on ``--resume``."""
    stage0 = out / STAGE0
    if args.resume:
        if not (stage0 / "config.json").is_file():
            raise SystemExit(f"--resume: {stage0} does not exist; run without --resume first")
        hybrid = HybridForCausalLM.from_pretrained(stage0, local_files_only=True, dtype=source.dtype)
        hybrid = hybrid.to(source.device).eval()
        if args.pattern and args.pattern != hybrid.config.hybrid_override_pattern:
            raise SystemExit(f"--resume: {stage0} has pattern {hybrid.config.hybrid_override_pattern}, "
                             f"not {args.pattern}")
        log(f"resuming: stage-0 hybrid from {stage0}, pattern {hybrid.config.hybrid_override_pattern}")
        return hybrid
    pattern = _choose_pattern(args, source, sel_windows, log)
    hybrid, transfer_log = convert_to_hybrid(source, pattern, _ssm_config(args, pattern), source_name=name)
    log("weight transfer (priming stage 0):")
    for line in transfer_log:
        log("  " + line)
    hybrid.save_pretrained(stage0)
    tok.save(stage0)
    return hybrid


def _align(args, hybrid, source, tokens: torch.Tensor, out: Path, log: _Log):
    """Run (or resume) alignment; exits with status 130 when stopped by a signal."""
    cfg = AlignConfig(steps=args.align_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                      checkpoint_every=args.checkpoint_every, seed=args.seed,
                      layer_loss_weight=args.layer_loss_weight)
    aligner = Aligner(hybrid, source, tokens, cfg, out / CHECKPOINTS, progress=not args.quiet)
    if not args.resume and aligner.checkpoint_path.is_file():
        aligner.checkpoint_path.unlink()
        log(f"removed the checkpoint of an earlier run in {aligner.checkpoint_path.parent} (no --resume)")
    previous = _install_stop_handlers(aligner)
    t0 = time.time()
    try:
        result = aligner.run(resume=args.resume)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if result.interrupted:
        log(f"alignment stopped at step {result.steps_done}/{args.align_steps}; checkpoint in "
            f"{aligner.checkpoint_path}. Continue with the same command plus --resume.")
        sys.exit(130)
    if result.losses:
        log(f"alignment: {result.steps_done} steps, loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g} "
            f"({time.time() - t0:.1f} s this run)")
    return result


def _summary(args, source, hybrid, windows: torch.Tensor, ppl: dict[str, float]) -> list[dict]:
    """Table rows: perplexity, parameters, cache bytes per token, fixed SSM state, decode speed."""
    prompt = windows[:1, : min(64, windows.shape[1])]
    src_per_tok, _ = _cache_numbers(source, prompt)
    hyb_per_tok, hyb_fixed = _cache_numbers(hybrid, prompt)
    hyb = {"parameters": count_parameters(hybrid), "cache_bytes_per_token": hyb_per_tok,
           "fixed_state_bytes": hyb_fixed,
           "decode_tokens_per_s": decode_tokens_per_second(hybrid, prompt, args.decode_tokens)}
    return [
        {"model": "teacher (source)", "perplexity": ppl["teacher"], "parameters": count_parameters(source),
         "cache_bytes_per_token": src_per_tok, "fixed_state_bytes": 0,
         "decode_tokens_per_s": decode_tokens_per_second(source, prompt, args.decode_tokens)},
        {"model": "hybrid, stage 0", "perplexity": ppl["before"], **hyb},
        {"model": "hybrid, aligned", "perplexity": ppl["after"], **hyb},
    ]


def _print_table(rows: list[dict], hybrid, args, device, log: _Log) -> None:
    cfg = hybrid.config
    log("")
    log(f"pattern {cfg.hybrid_override_pattern}   ({len(cfg.ssm_layers)} SSM / {len(cfg.attention_layers)} "
        "attention layers)")
    header = (f"{'model':<18} {'perplexity':>10} {'parameters':>11} {'cache B/token':>13} {'SSM state B':>11} "
              f"{'decode tok/s':>12}")
    log(header)
    log("-" * len(header))
    for r in rows:
        log(f"{r['model']:<18} {r['perplexity']:>10.3f} {r['parameters']:>11,} {r['cache_bytes_per_token']:>13,} "
            f"{r['fixed_state_bytes']:>11,} {r['decode_tokens_per_s']:>12.1f}")
    log("(cache B/token: growth of the KV cache per generated token for one sequence; the hybrid's SSM "
        f"layers hold a fixed state instead. Decode: greedy, batch 1, {args.decode_tokens} tokens on {device}.)")


def run(args: argparse.Namespace) -> dict:
    """The whole command; returns the report written to ``DIR/prime_report.json``."""
    t_start = time.time()
    if args.threads < 1:
        raise SystemExit(f"--threads: expected >= 1, got {args.threads}")
    try:
        ssm_token(args.ssm)
    except ValueError as exc:
        raise SystemExit(f"--ssm: {exc}") from None
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    log = _Log()
    source, tok, name = load_source(args.source, device, getattr(torch, args.dtype))
    log(f"source: {name} ({type(source).__name__}, {count_parameters(source):,} parameters, "
        f"{source.config.num_hidden_layers} layers) on {device}")
    align_tokens, eval_windows = _texts(args, tok)
    hybrid = _stage0(args, source, tok, name, _windows(align_tokens, args.seq_len * 2, args.eval_windows), out, log)
    if device.type == "cpu" and "GKA" in hybrid.config.layer_pattern:
        log("note: on a CPU, GKA layers run the PyTorch reference (a token loop with num_iter Chebyshev "
            "steps per token): expect minutes; lower --num-iter, use --ssm gdn, or run on a GPU")

    t0 = time.time()
    ppl = {"teacher": perplexity(source, eval_windows), "before": perplexity(hybrid, eval_windows)}
    log(f"perplexity on {eval_windows.numel()} held-out tokens: teacher {ppl['teacher']:.3f}, "
        f"hybrid before alignment {ppl['before']:.3f} ({time.time() - t0:.1f} s)")
    result = None
    if args.align_steps > 0 and hybrid.config.ssm_layers:
        result = _align(args, hybrid, source, align_tokens, out, log)
    ppl["after"] = perplexity(hybrid, eval_windows) if result is not None else ppl["before"]
    hybrid.save_pretrained(out)
    tok.save(out)

    rows = _summary(args, source, hybrid, eval_windows, ppl)
    _print_table(rows, hybrid, args, device, log)
    log(f"saved: aligned hybrid in {out}, stage-0 hybrid in {out / STAGE0}; total {time.time() - t_start:.1f} s")
    report = {"source": name, "pattern": hybrid.config.hybrid_override_pattern, "device": str(device),
              "dtype": args.dtype, "align_steps": result.steps_done if result else 0,
              "align_losses": result.losses if result else [], "rows": rows,
              "eval_tokens": eval_windows.numel(), "seconds": round(time.time() - t_start, 1)}
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    (out / LOG).write_text("\n".join(log.lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
