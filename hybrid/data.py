"""Offline text sources for training, layer selection and alignment.

- ``stdlib_files(split)``: a deterministic list of the Python standard library's own source files
  (always present offline). Every 20th file (in sorted order of the relative path) is held out.
- ``read_text(path)``: a local text file, plain text or JSONL with a ``"text"`` field per line.
- ``TokenStream``: token ids cut into consecutive ``[batch, seq_len]`` windows with a position
  that can be saved and restored (alignment resumes exactly where it stopped).
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import torch

_EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
HELD_OUT_EVERY = 20


def stdlib_root() -> Path:
    """The directory of the running Python's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(split: str = "train") -> list[Path]:
    """Sorted standard-library ``*.py`` files of ``split`` (``"train"``, ``"heldout"`` or ``"all"``).

    Test suites and IDLE are excluded. File ``i`` (in sorted order) is held out when
    ``i % 20 == 0``.
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split: expected 'train', 'heldout' or 'all', got {split!r}")
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if split == "all":
        return files
    held = split == "heldout"
    return [p for i, p in enumerate(files) if (i % HELD_OUT_EVERY == 0) == held]


def stdlib_text(split: str = "train", max_bytes: int | None = None) -> str:
    """Concatenated sources of ``stdlib_files(split)`` (files separated by a blank line),
    truncated to ``max_bytes`` bytes of UTF-8 when given."""
    files = stdlib_files(split)
    if not files:
        raise FileNotFoundError(f"no Python standard library sources (*.py) under {stdlib_root()}; "
                                "pass a text file instead")
    parts: list[str] = []
    total = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text.encode("utf-8")) + 2
        if max_bytes is not None and total >= max_bytes:
            break
    text = "\n\n".join(parts)
    if max_bytes is not None:
        text = text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return text


def read_text(path: str | Path) -> str:
    """Text of a local file: JSONL (``.jsonl``/``.json`` lines with a ``"text"`` field, joined
    by blank lines) or plain UTF-8 text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() not in (".jsonl", ".json"):
        return raw
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a JSON line ({exc})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{lineno}: expected an object with a string field 'text'")
        texts.append(record["text"])
    return "\n\n".join(texts)


class TokenStream:
    """Consecutive ``[batch_size, seq_len]`` windows over a 1-D token tensor, wrapping around.

    ``position`` (the index of the next token to read) is the whole iteration state: save it
    with ``state_dict`` and restore it with ``load_state_dict`` to continue exactly.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int) -> None:
        if tokens.dim() != 1:
            raise ValueError(f"tokens: expected a 1-D tensor, got shape {tuple(tokens.shape)}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if tokens.numel() < seq_len:
            raise ValueError(f"tokens: need at least seq_len={seq_len} tokens, got {tokens.numel()}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        """The next ``[batch_size, seq_len]`` int64 windows; advances ``position``."""
        rows = []
        n = self.tokens.numel()
        for _ in range(self.batch_size):
            if self.position + self.seq_len > n:
                self.position = 0
            rows.append(self.tokens[self.position:self.position + self.seq_len])
            self.position += self.seq_len
        return torch.stack(rows).long()

    def state_dict(self) -> dict:
        return {"position": self.position, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        if (state["batch_size"], state["seq_len"]) != (self.batch_size, self.seq_len):
            raise ValueError(
                f"data state: saved batch_size/seq_len {state['batch_size']}/{state['seq_len']} "
                f"differ from the current {self.batch_size}/{self.seq_len}")
        self.position = int(state["position"])


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``[N, seq_len]`` windows of ``tokens`` (the tail shorter than seq_len dropped)."""
    n = tokens.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"tokens: need at least seq_len={seq_len} tokens, got {tokens.numel()}")
    return tokens[: n * seq_len].view(n, seq_len).long()
