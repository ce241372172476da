"""dtype tags shared with csrc/common.cuh (enum gka::DType)."""

from __future__ import annotations

import torch

DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def dtype_tag(name: str, t: torch.Tensor) -> int:
    """The integer tag of ``t.dtype`` for the C++ launchers; TypeError naming ``name`` otherwise."""
    try:
        return DTYPE_TAGS[t.dtype]
    except KeyError:
        raise TypeError(f"{name}: expected dtype float32, float16 or bfloat16, got {t.dtype}") from None
