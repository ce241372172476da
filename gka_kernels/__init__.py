"""gka-kernels: sequence mixers for hybrid state-space language models.

Submodules (imported lazily so that ``import gka_kernels`` stays cheap and never fails):

- ``gka_kernels.gdn``     Gated DeltaNet: ``chunk_gated_delta_rule``, ``fused_recurrent_gated_delta_rule``
- ``gka_kernels.mamba2``  Mamba-2 SSD: ``mamba_chunk_scan_combined``, ``selective_state_update``
- ``gka_kernels.gka``     Gated KalmaNet: ``chunk_gka``, ``fused_recurrent_gka``
- ``gka_kernels.reference`` float64-capable PyTorch loops written from the math (test oracles)
- ``gka_kernels.cuda``    CUDA C++ decode kernels from the compiled extension ``gka_kernels._C``
- ``gka_kernels.layers``  ``nn.Module`` layers; ``gka_kernels.hybrid`` hybrid models and priming
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("common", "reference", "gla", "gdn", "mamba2", "gka", "cuda", "layers", "hybrid")


def cuda_available() -> bool:
    """True when the compiled extension ``gka_kernels._C`` imports and a CUDA device is visible."""
    from gka_kernels.cuda import extension_available

    if not extension_available():
        return False
    import torch

    return torch.cuda.is_available()


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"gka_kernels.{name}")
    raise AttributeError(f"module 'gka_kernels' has no attribute {name!r}")


__all__ = ["cuda_available", "__version__", *_SUBMODULES]
