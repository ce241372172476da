"""The reference shapes of PERF.md: a layer converted from an 8B-class GQA model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    tokens: int
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128

    @property
    def is_decode(self) -> bool:
        return self.tokens == 1


SHAPES = {
    "train-4k": Shape("train-4k", batch=4, tokens=4096),
    "long-32k": Shape("long-32k", batch=1, tokens=32768),
    "decode-64": Shape("decode-64", batch=64, tokens=1),
    "decode-1": Shape("decode-1", batch=1, tokens=1),
}
