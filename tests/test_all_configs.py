"""Every autotuned config of the package's kernels, on the GPU, against the references.

The other GPU tests run one config per kernel (``conftest.py`` sets ``GKA_KERNELS_AUTOTUNE=0``),
while the benchmarks run whichever config the autotuner picks. Here a subprocess with autotuning on
runs each op (GKA, GDN, and the plain bf16 modes of the shared GLA kernels through
``chunk_simple_gla`` and Mamba-2) forward and backward once per config index ``i``, with every autotuned kernel of the
package restricted to its config ``i`` (modulo its number of configs), and checks every run against
the float32 reference at the SPEC 9 GPU bounds. A config that computes wrong results, or faults,
fails the test, whether or not the autotuner would pick it.

    python tests/test_all_configs.py gka      # what the GPU test runs, one op
    python tests/test_all_configs.py gka 1/4  # config indices i with i % 4 == 1 (parallel shards)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
#: Packages whose modules hold the autotuned kernels.
KERNEL_PACKAGES = ("gka_kernels.common", "gka_kernels.gla", "gka_kernels.gka", "gka_kernels.gdn",
                   "gka_kernels.mamba2")


def autotuned_kernels() -> list:
    """Every ``triton.autotune`` object defined in the kernel packages (each once)."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    found = {}
    for name in KERNEL_PACKAGES:
        package = importlib.import_module(name)
        modules = [package] + [importlib.import_module(m.name)
                               for m in pkgutil.iter_modules(package.__path__, name + ".")]
        for module in modules:
            for value in vars(module).values():
                if isinstance(value, Autotuner):
                    found[id(value)] = value
    return list(found.values())


def _gka_case():
    import torch

    from gka_kernels.gka import chunk_gka
    from gka_kernels.reference.gka import gka_ref
    from tests.helpers import GKA_GPU_FWD, GKA_GPU_GRAD, assert_close
    from tests.test_gka import make_inputs, ref_inputs, run

    inputs = make_inputs(1, 520, 32, 8, 128, 128, dtype=torch.bfloat16, device="cuda")
    o_r, final_r, _ = run(gka_ref, ref_inputs(inputs, torch.float32), num_iter=30)
    _, _, grads_r = run(gka_ref, ref_inputs(inputs, torch.float32), grads=True, solver="exact",
                        ridge_ratio=0.02)

    def check():
        o, final, _ = run(chunk_gka, inputs, num_iter=30)
        assert_close("o", o, o_r, GKA_GPU_FWD)
        assert_close("h_kk", final[0], final_r[0], GKA_GPU_FWD)
        assert_close("h_kv", final[1], final_r[1], GKA_GPU_FWD)
        _, _, grads = run(chunk_gka, inputs, grads=True, num_iter=30, ridge_ratio=0.02)
        for name in grads_r:
            assert_close(f"d{name}", grads[name], grads_r[name], GKA_GPU_GRAD)
    return check


def _gdn_case():
    import torch

    from gka_kernels.gdn import chunk_gated_delta_rule
    from tests.helpers import GPU_FWD, GPU_GATE_GRAD, GPU_GRAD
    from tests.test_gdn import assert_all_close, make_inputs, reference, run

    inputs = make_inputs(1, 520, 32, 8, 128, 128, dtype=torch.bfloat16, device="cuda",
                         normalize_keys=False)
    ref = reference(inputs, grads=True, dtype=torch.float32, use_qk_l2norm_in_kernel=True)

    def check():
        out = run(chunk_gated_delta_rule, inputs, grads=True, use_qk_l2norm_in_kernel=True)
        assert_all_close(out, ref, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD)
    return check


def _gla_case():
    import torch

    from tests.helpers import GPU_FWD, GPU_GATE_GRAD, GPU_GRAD
    from tests.test_gla import compare_to_ref, make_inputs

    # GQA (keys shared by 4 query heads) and a Mamba-2-like grouping (q and k shared, v per head)
    shapes = [(1, 520, 32, 8, 8, 128, 128), (1, 520, 2, 2, 8, 128, 128)]
    inputs = [make_inputs(*sh, dtype=torch.bfloat16, device="cuda", decay=(0.0, 0.2)) for sh in shapes]

    def check():
        for q, k, v, g, h0 in inputs:
            compare_to_ref(q, k, v, g, h0, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD)
    return check


def _mamba2_case():
    import torch

    from tests.helpers import GPU_FWD, GPU_GATE_GRAD, GPU_GRAD
    from tests.test_mamba2 import compare, make_inputs

    inp = make_inputs(1, 600, 32, 8, 128, 128, dtype=torch.bfloat16, device="cuda", z=False)

    def check():
        compare(inp, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD, ref_dtype=torch.float32, chunk_size=256,
                dt_softplus=True)
    return check


CASES = {"gka": _gka_case, "gdn": _gdn_case, "gla": _gla_case, "mamba2": _mamba2_case}


def _failing_tuner(exc: BaseException):
    """The autotuner whose launch raised ``exc`` (from the traceback), or None."""
    from triton.runtime.autotuner import Autotuner

    found, tb = None, exc.__traceback__
    while tb is not None:
        candidate = tb.tb_frame.f_locals.get("self")
        if isinstance(candidate, Autotuner):
            found = candidate
        tb = tb.tb_next
    return found


def sweep(op: str, shard: int = 0, shards: int = 1) -> int:
    """Runs ``op``'s check once per config index ``i`` with ``i % shards == shard``; returns the
    number of runs. A config that needs more shared memory than the device has is skipped, as the
    autotuner skips it (that kernel runs its config 0 instead, and the skip is printed)."""
    from triton.runtime.errors import OutOfResources

    tuners = autotuned_kernels()
    configs = {id(t): list(t.configs) for t in tuners}
    check = CASES[op]()
    runs = max(len(c) for c in configs.values())
    try:
        for i in range(shard, runs, shards):
            for t in tuners:
                t.configs = [configs[id(t)][i % len(configs[id(t)])]]
                t.cache.clear()
            print(f"== {op}: config index {i} of {runs}", flush=True)
            while True:
                try:
                    check()
                    break
                except OutOfResources as exc:
                    tuner = _failing_tuner(exc)
                    if tuner is None or tuner.configs[0] is configs[id(tuner)][0]:
                        raise
                    print(f"   skipped {tuner.fn.__name__} {tuner.configs[0]}: {exc}", flush=True)
                    tuner.configs = [configs[id(tuner)][0]]
                    tuner.cache.clear()
    finally:
        for t in tuners:
            t.configs = configs[id(t)]
            t.cache.clear()
    return len(range(shard, runs, shards))


def test_autotuned_kernels_are_found():
    """The sweep sees the autotuned kernels of every mixer (a discovery that finds nothing would
    make the GPU test below pass vacuously)."""
    names = {t.fn.__name__ for t in autotuned_kernels()}
    assert {"gka_solve_fwd_kernel", "gka_solve_bwd_kernel", "gka_adjoint_rows_kernel",
            "chunk_gka_bwd_dk_kernel",
            "chunk_gka_bwd_dh_kernel", "chunk_fwd_o_kernel", "chunk_state_pass_kernel",
            "chunk_bwd_dqkg_kernel", "chunk_bwd_dv_kernel"} <= names
    assert {"wy_fwd_kernel", "wy_bwd_kernel", "state_fwd_kernel", "output_fwd_kernel"} <= names  # GDN


def test_failing_tuner_is_found_in_the_traceback():
    """The sweep's skip of configs that do not fit names the kernel whose launch failed."""
    from triton.runtime.errors import OutOfResources

    tuner = autotuned_kernels()[0]

    def launch(self):  # stands in for Autotuner.run, whose frame holds the tuner as ``self``
        raise OutOfResources(238592, 232448, "shared memory")

    with pytest.raises(OutOfResources) as info:
        launch(tuner)
    assert _failing_tuner(info.value) is tuner
    assert _failing_tuner(OutOfResources(1, 0, "shared memory")) is None


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(CASES))
def test_every_autotuned_config(op):
    env = {**os.environ, "GKA_KERNELS_AUTOTUNE": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}"
           + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, str(Path(__file__).resolve()), op], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1500)
    print(result.stdout[-6000:])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "config index 1 of" in result.stdout, "fewer than two config indices were run"


if __name__ == "__main__":
    shard, shards = map(int, sys.argv[2].split("/")) if len(sys.argv) > 2 else (0, 1)
    print(f"{sweep(sys.argv[1], shard, shards)} runs passed")
