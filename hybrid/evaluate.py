"""Quality and cost measurements shared by the CLI, layer selection and the benchmark."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Token perplexity ``exp(mean NLL)`` of a causal LM on ``windows [N, T]`` (next-token
    prediction inside each window, ``N * (T - 1)`` predictions)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows: expected [N, T] with T >= 2, got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                              reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def unigram_perplexity(train_tokens: torch.Tensor, eval_windows: torch.Tensor, vocab_size: int) -> float:
    """Perplexity on ``eval_windows`` of the add-one-smoothed unigram distribution of
    ``train_tokens`` (the floor a language model must clearly beat)."""
    counts = torch.bincount(train_tokens.long().reshape(-1), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = eval_windows[:, 1:].reshape(-1).long()
    return math.exp(-logp[targets].mean().item())


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@torch.no_grad()
def decode_tokens_per_second(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy decode speed of ``model.generate`` after ``prompt [B, T]`` (tokens per second over
    the whole batch, prefill excluded by timing a 1-token run separately)."""
    gen = model.generation_config
    pad = gen.pad_token_id if gen.pad_token_id is not None else gen.eos_token_id
    kwargs = dict(do_sample=False, use_cache=True, pad_token_id=pad)
    device = next(model.parameters()).device
    prompt = prompt.to(device)

    def timed(n: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n, **kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    prefill = timed(1)
    total = timed(new_tokens + 1)
    return prompt.shape[0] * new_tokens / max(total - prefill, 1e-9)
