"""Imports ``gka_kernels._C`` once and remembers why it failed, if it did."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=1)
def _import() -> tuple[ModuleType | None, str | None]:
    try:
        from gka_kernels import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # not built (no nvcc at install time) or broken
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None


def extension_available() -> bool:
    """True when ``gka_kernels._C`` was built and imports."""
    return _import()[0] is not None


def extension_error() -> str | None:
    """Why the extension is unavailable (``None`` when it is available)."""
    return _import()[1]


def load_extension() -> ModuleType:
    """Return ``gka_kernels._C`` or raise a ``RuntimeError`` that says why it is missing."""
    module, err = _import()
    if module is None:
        raise RuntimeError(
            "gka_kernels._C is not available (" + str(err) + "). Reinstall with nvcc on PATH "
            "(GKA_KERNELS_BUILD_CUDA=on) or use backend='triton'."
        )
    return module
