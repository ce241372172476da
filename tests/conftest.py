"""Test configuration.

On a machine without CUDA, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` is set
here, before any test module imports ``gka_kernels`` (Triton reads it when kernels are decorated).
On a GPU machine autotuned kernels run their first config (``GKA_KERNELS_AUTOTUNE=0``).
Tests marked ``gpu`` need CUDA and are skipped without it; run them with ``pytest -m gpu``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    # One config per autotuned kernel: autotuning each test shape would dominate the GPU run.
    os.environ.setdefault("GKA_KERNELS_AUTOTUNE", "0")

import pytest  # noqa: E402

CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_cpu_on_gpu_box = pytest.mark.skip(
        reason="interpreter test: run on a machine without CUDA (or with TRITON_INTERPRET=1)")
    for item in items:
        if "gpu" in item.keywords:
            if not CUDA:
                item.add_marker(skip_gpu)
        elif CUDA and "interpreter" in item.keywords and os.environ.get("TRITON_INTERPRET") != "1":
            item.add_marker(skip_cpu_on_gpu_box)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
