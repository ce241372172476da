"""Byte-level tokenizer of the embedded default model.

Token ids 0..255 are the bytes of the UTF-8 encoded text; three special tokens follow:
``bos`` (256), ``eos`` (257) and ``pad`` (258). Decoding drops the specials and replaces
invalid UTF-8 sequences. The tokenizer is fully described by this class; ``save`` / ``load``
write and read a small JSON file so that a model directory is self-describing.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TOKENIZER_FILE = "byte_tokenizer.json"


class ByteTokenizer:
    """UTF-8 byte tokenizer with ``vocab_size = 259`` (256 bytes + bos, eos, pad)."""

    num_bytes = 256
    bos_token_id = 256
    eos_token_id = 257
    pad_token_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Token ids of ``text``: one id per UTF-8 byte, optionally framed by bos/eos."""
        ids = list(text.encode("utf-8"))
        if add_bos:
            ids.insert(0, self.bos_token_id)
        if add_eos:
            ids.append(self.eos_token_id)
        return ids

    def encode_tensor(self, text: str, add_bos: bool = False) -> torch.Tensor:
        """``encode`` as a ``[1, T]`` int64 tensor."""
        return torch.tensor([self.encode(text, add_bos=add_bos)], dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of ``ids`` (special tokens are dropped, invalid UTF-8 replaced)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return bytes(i for i in ids if 0 <= i < self.num_bytes).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        """Write ``byte_tokenizer.json`` into ``directory`` and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.write_text(json.dumps({
            "type": "byte", "vocab_size": self.vocab_size, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "ByteTokenizer":
        """Read ``byte_tokenizer.json`` from ``directory`` (checks it describes this tokenizer)."""
        path = Path(directory) / TOKENIZER_FILE
        spec = json.loads(path.read_text())
        tok = cls()
        expected = {"type": "byte", "vocab_size": tok.vocab_size, "bos_token_id": tok.bos_token_id,
                    "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
        if spec != expected:
            raise ValueError(f"{path}: expected byte tokenizer spec {expected}, got {spec}")
        return tok

    @staticmethod
    def exists(directory: str | Path) -> bool:
        """True when ``directory`` holds a byte tokenizer file."""
        return (Path(directory) / TOKENIZER_FILE).is_file()
