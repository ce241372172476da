"""Launches that overlap on a second CUDA stream.

The chunked pipelines have sequential passes over the chunks (state recurrences, reverse scans):
a few programs per SM, each waiting on its previous chunk, so most of the GPU idles while they run.
Where such a pass does not depend on the kernels queued next to it, :func:`beside` runs it on a
high-priority side stream (one per device) and the independent kernels fill the idle SMs.

``beside(fn, *args)`` orders the side stream after everything already queued on the current stream,
calls ``fn`` with the side stream current (its kernels and allocations go there) and returns a
:class:`Pending`; ``Pending.result()`` makes the current stream wait for the side work and returns
``fn``'s value. No host synchronization; a CUDA graph capture records the fork and the join.

Memory: every tensor argument is marked as used by the side stream and every tensor of the result
as used by the current stream (``Tensor.record_stream``), so the caching allocator reuses none of
their blocks before the work that reads or writes them has run, whichever stream frees them.

On the CPU (the interpreter), or with ``GKA_KERNELS_SIDE_STREAM=0``, ``fn`` runs inline on the
current stream: same kernels, same results, one stream.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Iterator

import torch

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}


def side_stream_enabled() -> bool:
    """``GKA_KERNELS_SIDE_STREAM`` (read at every call): ``1`` (default) or ``0``; any other value is
    a ``ValueError``."""
    value = os.environ.get("GKA_KERNELS_SIDE_STREAM", "1")
    if value not in ("0", "1"):
        raise ValueError(f"GKA_KERNELS_SIDE_STREAM: expected 0 or 1, got {value!r}")
    return value == "1"


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in ``value`` and in its (nested) tuples, lists, dict values and dataclass fields."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _SIDE_STREAMS.get(index)
    if stream is None:
        # A lower number is a higher priority: the side stream's (sequential) programs are placed
        # first when both streams have programs waiting for an SM.
        stream = _SIDE_STREAMS[index] = torch.cuda.Stream(device=index, priority=-1)
    return stream


class Pending:
    """The value of a :func:`beside` call; ``result()`` joins the side stream into the current one
    (once) and returns it."""

    def __init__(self, value: Any, side: torch.cuda.Stream | None = None):
        self._value = value
        self._side = side

    def result(self) -> Any:
        if self._side is not None:
            main = torch.cuda.current_stream(self._side.device)
            main.wait_stream(self._side)
            for t in _tensors(self._value):
                t.record_stream(main)
            self._side = None
        return self._value


def beside(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Pending:
    """Run ``fn(*args, **kwargs)`` on the side stream of the device of its first CUDA tensor
    argument, after the work already queued on the current stream (see the module docstring)."""
    enabled = side_stream_enabled()
    inputs = [t for t in _tensors((args, kwargs)) if t.is_cuda]
    if not inputs or not enabled:
        return Pending(fn(*args, **kwargs))
    main = torch.cuda.current_stream(inputs[0].device)
    side = _side_stream(inputs[0].device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        value = fn(*args, **kwargs)
    for t in inputs:
        t.record_stream(side)
    return Pending(value, side)
