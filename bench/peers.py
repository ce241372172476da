"""Optional peers, imported only when available: fla (GDN, simple GLA), mamba_ssm (SSD and its
decode step) and PyTorch SDPA attention.

``mamba_ssm``'s package ``__init__`` imports its compiled CUDA extension; its SSD ops are pure
Triton. When the package is not importable but its source tree is given in ``GKA_BENCH_MAMBA_SRC``
(the folder that contains ``mamba_ssm/``), the Triton modules are loaded from there without running
the package ``__init__``.

fla refuses its gated backward on Hopper with Triton < 3.7.1 (it is miscompiled there); for timing
only, ``load_fla(bypass_triton_guard=True)`` lifts that guard, as PERF.md's numbers did.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from types import SimpleNamespace


def load_fla(bypass_triton_guard: bool = True) -> SimpleNamespace | None:
    try:
        gdn = importlib.import_module("fla.ops.gated_delta_rule")
        gla = importlib.import_module("fla.ops.simple_gla")
    except Exception:  # noqa: BLE001 - an absent or broken peer is skipped and reported
        return None
    if bypass_triton_guard:
        chunk_o = importlib.import_module("fla.ops.common.chunk_o")
        if hasattr(chunk_o, "TRITON_ABOVE_3_7_1"):
            chunk_o.TRITON_ABOVE_3_7_1 = True
    version = getattr(importlib.import_module("fla"), "__version__", "?")
    return SimpleNamespace(
        version=version,
        chunk_gated_delta_rule=gdn.chunk_gated_delta_rule,
        fused_recurrent_gated_delta_rule=gdn.fused_recurrent_gated_delta_rule,
        chunk_simple_gla=gla.chunk_simple_gla,
    )


def _mamba_from_source(src: str) -> None:
    pkg_dir = os.path.join(src, "mamba_ssm")
    if not os.path.isdir(pkg_dir):
        raise ImportError(f"GKA_BENCH_MAMBA_SRC={src} has no mamba_ssm/ folder")
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = [pkg_dir]
    pkg.__version__ = "source"
    version_file = os.path.join(pkg_dir, "__init__.py")
    with open(version_file) as f:
        for line in f:
            if line.startswith("__version__"):
                pkg.__version__ = line.split("=", 1)[1].strip().strip("\"'")
    sys.modules["mamba_ssm"] = pkg


def load_mamba() -> SimpleNamespace | None:
    try:
        try:
            ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        except ImportError:
            src = os.environ.get("GKA_BENCH_MAMBA_SRC")
            if not src:
                return None
            sys.modules.pop("mamba_ssm", None)
            _mamba_from_source(src)
            ssd = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        ssu = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
    except Exception:  # noqa: BLE001
        return None
    return SimpleNamespace(
        version=getattr(sys.modules["mamba_ssm"], "__version__", "?"),
        mamba_chunk_scan_combined=ssd.mamba_chunk_scan_combined,
        selective_state_update=ssu.selective_state_update,
    )


def versions() -> dict[str, str | None]:
    fla, mamba = load_fla(), load_mamba()
    return {"fla": fla.version if fla else None, "mamba_ssm": mamba.version if mamba else None}
