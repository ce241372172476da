"""Train the embedded default model (a byte-level Llama) on the Python standard library sources.

    python -m gka_kernels.hybrid.train_embedded [--steps 700] [--out DIR]

Deterministic: the file list is sorted (``data.stdlib_files``), windows are drawn from a seeded
generator, and training runs on the CPU with a fixed number of threads. The output directory
(default: the package's ``assets/embedded_llama``) receives ``config.json``,
``model.safetensors``, the tokenizer file and ``train_report.json`` with the held-out
perplexity of the model and of a unigram baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import eval_windows, stdlib_files, stdlib_text
from .embedded import CONTEXT, EMBEDDED_DIR, embedded_config_kwargs
from .evaluate import count_parameters, perplexity, unigram_perplexity
from .tokenizer import ByteTokenizer


def _bytes_tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of ``lr``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def train(out: Path, steps: int, batch_size: int, lr: float, seed: int, threads: int,
          eval_tokens: int) -> dict:
    """Train from scratch and save the model, tokenizer and report into ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    train_tokens = _bytes_tensor(stdlib_text("train"))
    heldout = eval_windows(_bytes_tensor(stdlib_text("heldout", max_bytes=eval_tokens)), CONTEXT)
    config = LlamaConfig(**embedded_config_kwargs())
    model = LlamaForCausalLM(config)
    params = count_parameters(model)
    print(f"embedded model: {params:,} parameters; train {train_tokens.numel():,} bytes from "
          f"{len(stdlib_files('train'))} files; held-out {heldout.numel():,} bytes", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(seed)
    warmup = max(1, steps // 20)
    model.train()
    t0 = time.time()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        starts = torch.randint(0, train_tokens.numel() - CONTEXT, (batch_size,), generator=gen)
        ids = torch.stack([train_tokens[s:s + CONTEXT] for s in starts.tolist()]).long()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    ppl = perplexity(model, heldout)
    uni = unigram_perplexity(train_tokens, heldout, tok.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save(out)
    report = {
        "parameters": params, "steps": steps, "batch_size": batch_size, "context": CONTEXT,
        "lr": lr, "seed": seed, "threads": threads, "train_seconds": round(time.time() - t0, 1),
        "train_bytes": train_tokens.numel(), "heldout_bytes": heldout.numel(),
        "final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
        "heldout_perplexity": round(ppl, 4), "unigram_heldout_perplexity": round(uni, 4),
        "data": "Python standard library sources, data.stdlib_files() (every 20th file held out)",
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=EMBEDDED_DIR)
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-tokens", type=int, default=256 * 64)
    args = p.parse_args(argv)
    train(args.out, args.steps, args.batch_size, args.lr, args.seed, args.threads, args.eval_tokens)


if __name__ == "__main__":
    main()
