"""Build-level checks: the compiled extension and the ahead-of-time compilation of every Triton
kernel for Hopper (sm_90), which catches GPU-only frontend errors the interpreter accepts."""

import os
import shutil
import subprocess
import sys

import pytest

import gka_kernels
from gka_kernels.cuda import extension_available, extension_error, load_extension


def test_import_never_fails_and_reports_cuda():
    assert isinstance(gka_kernels.cuda_available(), bool)
    if not extension_available():
        assert extension_error()
        with pytest.raises(RuntimeError, match="gka_kernels._C is not available"):
            load_extension()


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("GKA_KERNELS_BUILD_CUDA") == "off",
                    reason="no nvcc: the extension is not built")
def test_extension_built_when_nvcc_present():
    assert extension_available(), extension_error()
    ext = load_extension()
    assert ext.cuda_runtime_version() >= 12000
    assert hasattr(ext, "state_copy")


def test_aot_compile_all_kernels_for_sm90(tmp_path):
    """Every registered Triton kernel spec compiles for sm_90 with the real (non-interpreter) frontend."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "gka_kernels.common.aot", "--arch", "90", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert out.exists()


def test_source_digest_names_the_kernel_sources(tmp_path):
    """Benchmark JSONs record ``source_digest``: equal for equal kernel sources, different when one
    kernel file changes, blind to files outside ``gka_kernels/`` and ``csrc/``."""
    from bench.__main__ import source_digest

    (tmp_path / "gka_kernels" / "gka").mkdir(parents=True)
    (tmp_path / "csrc").mkdir()
    (tmp_path / "gka_kernels" / "gka" / "solve.py").write_text("x = 1\n")
    (tmp_path / "csrc" / "gka_decode.cu").write_text("// kernel\n")
    first = source_digest(tmp_path)
    (tmp_path / "README.md").write_text("docs\n")
    assert source_digest(tmp_path) == first
    (tmp_path / "csrc" / "gka_decode.cu").write_text("// kernel, changed\n")
    assert source_digest(tmp_path) != first
