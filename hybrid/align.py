"""Priming, stage 1: alignment (distillation) of the SSM layers against the source (SPEC 7).

Teacher = the source Transformer (frozen), student = the hybrid. Only the mixers' parameters
train (the copied q/k/v/o/g projections included); embeddings, MLPs, norms and the attention
layers that stay are frozen. Loss = MSE between the final normalized hidden states (the base
model's output, after its final norm, before the LM head) of student and teacher on the same
tokens, plus optionally ``layer_loss_weight`` times the mean over SSM layers of the MSE between
each mixer's output and the output of the source attention it replaces, run on the same input
(the student's hidden state entering that layer).

Checkpoints hold everything needed to continue exactly: the trainable parameters, the optimizer
state, the step, the RNG states and the data position. A stop request (Ctrl-C / SIGTERM in the
CLI, ``request_stop()`` in code) is honoured between steps with a checkpoint, so no finished step
is lost; ``resume=True`` continues from the checkpoint, and the result equals an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import TokenStream

CHECKPOINT_FILE = "align_state.pt"


@dataclass
class AlignConfig:
    """Alignment hyper-parameters (``warmup`` steps of linear warmup, then constant ``lr``)."""

    steps: int
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 5
    grad_clip: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0
    layer_loss_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.warmup < 0:
            raise ValueError(f"steps and warmup must be >= 0, got {self.steps}, {self.warmup}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        if not self.layer_loss_weight >= 0:
            raise ValueError(f"layer_loss_weight: expected >= 0, got {self.layer_loss_weight}")


@dataclass
class AlignResult:
    steps_done: int
    interrupted: bool
    losses: list[float] = field(default_factory=list)


def trainable_parameters(hybrid: nn.Module) -> dict[str, nn.Parameter]:
    """Named parameters of the SSM mixers (``model.layers.<i>.self_attn.mixer.*``)."""
    return {n: p for n, p in hybrid.named_parameters() if ".self_attn.mixer." in n}


def freeze_for_alignment(hybrid: nn.Module) -> dict[str, nn.Parameter]:
    """Set ``requires_grad`` on the mixers only; returns the trainable parameters."""
    train = trainable_parameters(hybrid)
    if not train:
        raise ValueError("the hybrid has no SSM layer to align (pattern is all '*')")
    ids = {id(p) for p in train.values()}
    for p in hybrid.parameters():
        p.requires_grad_(id(p) in ids)
    return train


def teacher_attention_output(teacher: nn.Module, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
    """Output of the source attention of ``layer`` on ``hidden_states [B, T, hidden]`` (the normalized
    input of that decoder layer), causal, positions ``0..T-1``, no cache."""
    from .selection import SlidingWindowAttention

    T = hidden_states.shape[1]
    positions = torch.arange(T, device=hidden_states.device).unsqueeze(0)
    rope = teacher.model.rotary_emb(hidden_states, position_ids=positions)
    causal = SlidingWindowAttention(teacher.model.layers[layer].self_attn, window=T)
    return causal(hidden_states=hidden_states, position_embeddings=rope, attention_mask=None)[0]


def alignment_loss(hybrid: nn.Module, teacher: nn.Module, input_ids: torch.Tensor,
                   layer_loss_weight: float = 0.0) -> torch.Tensor:
    """MSE between the final normalized hidden states of student and teacher on ``input_ids``,
    plus ``layer_loss_weight`` times the mean per-layer MSE of mixer vs source attention outputs."""
    with torch.no_grad():
        target = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    if layer_loss_weight > 0:
        for i in hybrid.config.ssm_layers:
            def hook(module, args, kwargs, output, i=i):
                captured[i] = (kwargs["hidden_states"], output[0])
            hooks.append(hybrid.model.layers[i].self_attn.register_forward_hook(hook, with_kwargs=True))
    try:
        student = hybrid.model(input_ids=input_ids, use_cache=False).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    loss = F.mse_loss(student.float(), target.float())
    if captured:
        terms = []
        for i, (inp, out) in captured.items():
            with torch.no_grad():
                ref = teacher_attention_output(teacher, i, inp.detach())
            terms.append(F.mse_loss(out.float(), ref.float()))
        loss = loss + layer_loss_weight * torch.stack(terms).mean()
    return loss


def _fingerprint(hybrid: nn.Module, cfg: AlignConfig, tokens: torch.Tensor) -> str:
    """Identifies a run: pattern, mixer options, data and hyper-parameters (resuming with anything
    else would not reproduce the uninterrupted run). The step count and checkpoint interval are
    left out, so that a finished run can be extended."""
    c = hybrid.config
    data = hashlib.sha256(tokens.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("checkpoint_every", "steps")}
    blob = json.dumps({"pattern": c.hybrid_override_pattern, "ssm": c.ssm_config, "data": data, "cfg": settings},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Aligner:
    """Runs alignment steps with checkpoints in ``checkpoint_dir``.

    Args:
        hybrid: the student (its mixers train).
        teacher: the source causal LM (frozen, eval mode).
        tokens: 1-D token ids of the alignment text, read as consecutive windows.
        cfg: hyper-parameters.
        checkpoint_dir: where ``align_state.pt`` is written.
        progress: show a progress bar.
    """

    def __init__(self, hybrid: nn.Module, teacher: nn.Module, tokens: torch.Tensor, cfg: AlignConfig,
                 checkpoint_dir: str | Path, progress: bool = True) -> None:
        self.hybrid = hybrid
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.cfg = cfg
        self.params = freeze_for_alignment(hybrid)
        self.stream = TokenStream(tokens, cfg.batch_size, cfg.seq_len)
        self.checkpoint_dir = Path(checkpoint_dir)
        self.progress = progress
        decay = [p for n, p in self.params.items() if p.dim() >= 2]
        no_decay = [p for n, p in self.params.items() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95))
        self.step = 0
        self.losses: list[float] = []
        self.fingerprint = _fingerprint(hybrid, cfg, tokens)
        self._stop = False

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_dir / CHECKPOINT_FILE

    def request_stop(self) -> None:
        """Stop after the current step (a checkpoint is written)."""
        self._stop = True

    @property
    def stop_requested(self) -> bool:
        return self._stop

    def lr_at(self, step: int) -> float:
        return self.cfg.lr * min(1.0, (step + 1) / self.cfg.warmup) if self.cfg.warmup else self.cfg.lr

    # -- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "fingerprint": self.fingerprint,
                "trainable": {n: p.detach().clone() for n, p in self.params.items()},
                "optimizer": self.optimizer.state_dict(), "rng": rng, "data": self.stream.state_dict(),
                "losses": list(self.losses), "config": dataclasses.asdict(self.cfg)}

    def save_checkpoint(self) -> Path:
        """Write the checkpoint atomically (temporary file, then rename)."""
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, self.checkpoint_path)
        return self.checkpoint_path

    def load_checkpoint(self) -> bool:
        """Restore from ``checkpoint_path`` if present; ``False`` when there is none."""
        if not self.checkpoint_path.is_file():
            return False
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(
                f"{self.checkpoint_path}: the checkpoint belongs to a different run (pattern, mixer options, "
                f"data or hyper-parameters differ: saved {state['config']}, now {dataclasses.asdict(self.cfg)}); "
                "use a new output directory or the same settings")
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["trainable"][n])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.stream.load_state_dict(state["data"])
        self.step = int(state["step"])
        self.losses = list(state["losses"])
        return True

    # -- training ------------------------------------------------------------------------------
    def train_step(self) -> float:
        device = next(self.hybrid.parameters()).device
        ids = self.stream.next_batch().to(device)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step)
        loss = alignment_loss(self.hybrid, self.teacher, ids, self.cfg.layer_loss_weight)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.optimizer.step()
        return loss.item()

    def run(self, resume: bool = False, on_step: Callable[["Aligner"], None] | None = None) -> AlignResult:
        """Train until ``cfg.steps`` (continuing from the checkpoint when ``resume``)."""
        from tqdm.auto import tqdm

        if resume:
            self.load_checkpoint()
        else:
            torch.manual_seed(self.cfg.seed)
            random.seed(self.cfg.seed)
        self.hybrid.train()
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc="align", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        try:
            while self.step < self.cfg.steps:
                if self._stop:
                    self.save_checkpoint()
                    return AlignResult(self.step, True, list(self.losses))
                loss = self.train_step()
                if not math.isfinite(loss):
                    raise FloatingPointError(f"alignment loss became {loss} at step {self.step}")
                self.step += 1
                self.losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4g}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self.save_checkpoint()
                if on_step is not None:
                    on_step(self)
        finally:
            bar.close()
            self.hybrid.eval()
        return AlignResult(self.step, False, list(self.losses))
