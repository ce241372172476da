"""Per-layer inference caches: convolution states and recurrent states of a batch of sequences.

One cache object belongs to one layer and one batch. Row ``b`` of every tensor is sequence ``b``.
A layer's ``forward(..., cache=c)`` reads the states, runs the new tokens (a whole prompt, a chunk
of it, or one decode token) and writes the new states back into ``c``.

Dtypes: convolution states are float32 (float64 when the activations are float64), which stores
bf16/fp16 inputs exactly. Recurrent states are float32 by default. ``state_dtype=torch.bfloat16``
halves their memory; the kernels then compute on a float32 copy and the new state is rounded back
after each call. Measured cost (float32 layers, 32-token prompt then 128 decode steps, relative
error of the decode outputs against float32 states, head dim 16 / 32): Mamba-2 2.5e-4 / 1.0e-4,
GDN 2.5e-3 / 3.9e-3, GKA 1.2e-2 / 1.7e-2 (``h_kk`` alone 6.9e-3 / 1.0e-2, ``h_kv`` alone
9.8e-3 / 1.4e-2). GKA's error grows with the head dim, so keep its states in float32
(``tests/test_layers.py::test_bf16_state_error`` bounds it at this file's sizes).

Batch management: ``reorder(beam_idx)`` (beam search, may repeat rows) and ``select(indices)``
(keep a subset of rows, e.g. drop finished sequences) both replace every tensor by
``tensor.index_select(0, idx)`` in place and return the cache. ``clone()`` copies it.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from gka_kernels.common.checks import check_tensor


class LayerCache:
    """Base class: a fixed set of named ``[B, ...]`` tensors (see subclasses for the fields)."""

    conv_fields: ClassVar[tuple[str, ...]] = ()
    state_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **tensors: torch.Tensor) -> None:
        names = self.conv_fields + self.state_fields
        if set(tensors) != set(names):
            raise ValueError(f"{type(self).__name__}: expected tensors {names}, got {tuple(tensors)}")
        batch = {t.shape[0] for t in tensors.values()}
        if len(batch) != 1:
            raise ValueError(f"{type(self).__name__}: all tensors need the same batch size, got "
                             + ", ".join(f"{n}={tuple(t.shape)}" for n, t in tensors.items()))
        for name, t in tensors.items():
            setattr(self, name, t)

    @classmethod
    def zeros(cls, batch_size: int, shapes: dict[str, tuple[int, ...]], *, device: torch.device,
              conv_dtype: torch.dtype, state_dtype: torch.dtype) -> "LayerCache":
        """A cache for ``batch_size`` fresh sequences; ``shapes`` gives each field's per-row shape."""
        tensors = {n: torch.zeros(batch_size, *shapes[n], device=device, dtype=conv_dtype)
                   for n in cls.conv_fields}
        tensors.update({n: torch.zeros(batch_size, *shapes[n], device=device, dtype=state_dtype)
                        for n in cls.state_fields})
        return cls(**tensors)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.conv_fields + self.state_fields}

    @property
    def batch_size(self) -> int:
        return getattr(self, self.state_fields[0]).shape[0]

    @property
    def state_dtype(self) -> torch.dtype:
        return getattr(self, self.state_fields[0]).dtype

    def _index(self, name: str, idx: object) -> "LayerCache":
        t = check_tensor(name, idx, ndim=1, dtypes=(torch.int32, torch.int64))
        first = getattr(self, self.state_fields[0])
        idx = t.to(first.device, torch.int64)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.batch_size):
            raise ValueError(f"{name}: entries must be in [0, {self.batch_size}), got {t.tolist()}")
        for n, v in self.tensors().items():
            setattr(self, n, v.index_select(0, idx))
        return self

    def reorder(self, beam_idx: torch.Tensor) -> "LayerCache":
        """Row ``i`` becomes old row ``beam_idx[i]`` (rows may repeat); in place, returns ``self``."""
        return self._index("beam_idx", beam_idx)

    def select(self, indices: torch.Tensor) -> "LayerCache":
        """Keep the rows ``indices`` (in that order); in place, returns ``self``."""
        return self._index("indices", indices)

    def clone(self) -> "LayerCache":
        return type(self)(**{n: v.clone() for n, v in self.tensors().items()})

    def check_shapes(self, batch_size: int, shapes: dict[str, tuple[int, ...]], device: torch.device) -> None:
        """Raise ``ValueError`` unless every field is ``[batch_size, *shapes[field]]`` on ``device``."""
        for n, v in self.tensors().items():
            want = (batch_size, *shapes[n])
            if tuple(v.shape) != want:
                raise ValueError(f"cache.{n}: expected shape {list(want)} (batch size {batch_size} of "
                                 f"hidden_states), got {list(v.shape)}")
            if v.device != device:
                raise ValueError(f"cache.{n}: expected device {device}, got {v.device}")

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={list(v.shape)}:{str(v.dtype).replace('torch.', '')}"
                          for n, v in self.tensors().items())
        return f"{type(self).__name__}({inner})"


class GKACache(LayerCache):
    """``GatedKalmaNet`` cache: ``q_conv [B, H*D, W-1]``, ``k_conv, v_conv [B, HKV*D, W-1]``,
    ``h_kk [B, H, D, D]``, ``h_kv [B, H, D, D]``."""

    conv_fields = ("q_conv", "k_conv", "v_conv")
    state_fields = ("h_kk", "h_kv")


class GDNCache(LayerCache):
    """``GatedDeltaNet`` cache: ``q_conv [B, H*D, W-1]``, ``k_conv, v_conv [B, HKV*D, W-1]``,
    ``state [B, H, D, D]`` (key-major)."""

    conv_fields = ("q_conv", "k_conv", "v_conv")
    state_fields = ("state",)


class Mamba2Cache(LayerCache):
    """``Mamba2`` cache: ``conv [B, HKV*P + HKV*N + H*N, W-1]``, ``ssm [B, H, P, N]``."""

    conv_fields = ("conv",)
    state_fields = ("ssm",)
