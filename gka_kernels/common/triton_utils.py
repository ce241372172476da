"""Triton plumbing shared by every kernel.

- ``is_interpreter()``: whether kernels are being decorated for the Triton interpreter
  (``TRITON_INTERPRET=1``, read at decoration time exactly as Triton does).
- ``autotune(configs, key)``: real autotuning on the GPU; a single config under the interpreter,
  where multi-config autotuning fails without a driver. Autotuning replays the kernel on the
  caller's tensors: a kernel that writes into its inputs (or writes only part of an output that
  must start zeroed) names those arguments in ``restore_value``, or takes a fixed config. Where
  the best config depends on how many programs the grid has (splitting a tile only pays when the
  unsplit grid leaves SMs idle), pass ``grid_bucket(programs)`` as an argument and name it in the
  key.
- Conventions every kernel follows: loads are cast to float32 right after ``tl.load`` (bf16
  arithmetic is wrong under the interpreter and imprecise on the GPU); offsets that can exceed
  2^31 are formed from ``tl.int64`` values (``program_id(...).to(tl.int64)`` and 64-bit strides).
"""

from __future__ import annotations

import os
from typing import Sequence

import triton


def is_interpreter() -> bool:
    """True when Triton kernels run under the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotuning_enabled() -> bool:
    """False under the interpreter, or when ``GKA_KERNELS_AUTOTUNE=0`` (the GPU tests set this:
    autotuning every test shape would dominate their run time; benchmarks keep it on)."""
    return not is_interpreter() and os.environ.get("GKA_KERNELS_AUTOTUNE", "1") != "0"


def autotune(configs: Sequence[triton.Config], key: Sequence[str], **kwargs):
    """``triton.autotune`` on the GPU; only the first config under the interpreter or with
    ``GKA_KERNELS_AUTOTUNE=0`` (read when kernels are decorated)."""
    configs = list(configs)
    if not autotuning_enabled():
        configs = configs[:1]
    return triton.autotune(configs=configs, key=list(key), **kwargs)


def grid_bucket(programs: int) -> int:
    """Power-of-two bucket of a grid's program count, for autotune keys: a config tuned on one grid
    size is reused for grids within a factor of two of it, not for every grid of the same head
    geometry (the config tuned at batch 1 was being reused at batch 64)."""
    return triton.next_power_of_2(max(1, int(programs)))


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (and >= 16, the smallest ``tl.dot`` dimension on GPUs)."""
    return max(16, triton.next_power_of_2(int(n)))



def compute_dtype(torch_dtype):
    """Triton accumulation dtype for inputs of ``torch_dtype``: float64 for float64 inputs (so
    gradcheck sees float64 arithmetic), float32 for everything else. Pass it to kernels as a
    ``tl.constexpr`` (conventionally named ``ACC``) and cast after every load: ``x.to(ACC)``."""
    import torch
    import triton.language as tl

    return tl.float64 if torch_dtype == torch.float64 else tl.float32
