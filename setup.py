"""Build script for gka-kernels.

The Python packages install as usual. The CUDA C++ decode kernels in ``csrc/`` are compiled
into ``gka_kernels._C`` by CMake (pybind11, raw-pointer bindings) when nvcc is available.

Environment variables:
  GKA_KERNELS_BUILD_CUDA   ``auto`` (default: build when nvcc is found), ``1``/``on`` (build or
                           fail), ``0``/``off`` (never build).
  GKA_KERNELS_CUDA_ARCHS   value for CMAKE_CUDA_ARCHITECTURES, default ``80;90``.
  GKA_KERNELS_NVCC         path to nvcc (default: ``nvcc`` on PATH, then ``$CUDA_HOME/bin/nvcc``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _build_mode() -> str:
    raw = os.environ.get("GKA_KERNELS_BUILD_CUDA", "auto").strip().lower()
    if raw in ("1", "on", "true", "yes"):
        return "on"
    if raw in ("0", "off", "false", "no"):
        return "off"
    if raw == "auto":
        return "auto"
    raise SystemExit(f"GKA_KERNELS_BUILD_CUDA must be auto, on or off, got {raw!r}")


def _find_nvcc() -> str | None:
    explicit = os.environ.get("GKA_KERNELS_NVCC")
    if explicit:
        return explicit
    found = shutil.which("nvcc")
    if found:
        return found
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda/bin/nvcc"
    return None


def _packages() -> list[str]:
    """``gka_kernels`` and its subpackages, plus ``layers/`` and ``hybrid/`` mapped into it."""
    pkgs = ["gka_kernels"] + [f"gka_kernels.{p}" for p in find_packages("gka_kernels")]
    for folder in ("layers", "hybrid"):
        if (ROOT / folder / "__init__.py").exists():
            pkgs += [f"gka_kernels.{folder}"] + [f"gka_kernels.{folder}.{p}" for p in find_packages(folder)]
    return pkgs


class CMakeExtension(Extension):
    """An extension whose sources are built by the CMake project at the repository root."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self) -> None:
        mode = _build_mode()
        nvcc = _find_nvcc() if mode != "off" else None
        if mode == "on" and nvcc is None:
            raise SystemExit("GKA_KERNELS_BUILD_CUDA=on but nvcc was not found")
        if nvcc is None:
            reason = "GKA_KERNELS_BUILD_CUDA=off" if mode == "off" else "nvcc not found"
            print(f"gka-kernels: {reason}; installing pure Python (Triton kernels only, "
                  "no gka_kernels._C)", file=sys.stderr)
            self.extensions = []
            return
        self._nvcc = nvcc
        super().run()

    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("GKA_KERNELS_CUDA_ARCHS", "80;90")
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_CUDA_COMPILER={self._nvcc}",
            f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            cfg += ["-G", "Ninja"]
        print(f"gka-kernels: building gka_kernels._C for sm {archs} with {self._nvcc}",
              file=sys.stderr)
        subprocess.check_call(cfg)
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)])


setup(
    name="gka-kernels",
    version="0.1.0",
    description="Triton and CUDA kernels for Gated KalmaNet, Gated DeltaNet and Mamba-2, "
                "their layers, and Transformer-to-hybrid priming",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=_packages(),
    package_dir={
        "gka_kernels": "gka_kernels",
        "gka_kernels.layers": "layers",
        "gka_kernels.hybrid": "hybrid",
    },
    package_data={"gka_kernels.hybrid": ["assets/*", "assets/**/*"]},
    ext_modules=[CMakeExtension("gka_kernels._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.6",
        "triton>=3.6",
        "numpy",
        "einops",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "pytest-benchmark", "transformers>=5,<6", "safetensors", "pybind11>=2.10"],
        "hybrid": ["transformers>=5,<6", "safetensors"],
        "bench": ["matplotlib"],
    },
    entry_points={"console_scripts": ["gka-prime = gka_kernels.hybrid.prime:main"]},
    zip_safe=False,
)
