"""Ahead-of-time compilation of Triton kernels for a GPU target without a GPU (SPEC 10).

Kernel modules describe one or more representative specializations of each kernel with
``register_aot(AotSpec(...))`` at import time. ``python -m gka_kernels.common.aot`` (run with
``TRITON_INTERPRET=0``, which the tests arrange in a subprocess) imports every kernel module,
compiles every registered spec with ``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` and
prints one line per spec with its shared memory and register count. It exits non-zero if any fails.
This catches GPU-only frontend errors the interpreter accepts (for example ``tl.dot`` with K < 16).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

#: Modules whose import registers AOT specs. Kept explicit so a missing module is an error.
KERNEL_MODULES = (
    "gka_kernels.common.cumsum",
    "gka_kernels.gdn",
    "gka_kernels.mamba2",
    "gka_kernels.gka",
    "gka_kernels.gla",
)


@dataclass
class AotSpec:
    """One specialization to compile.

    ``types`` gives the Triton type of every pointer and float argument (``"*bf16"``, ``"*fp32"``,
    ``"fp32"``, ``"i64"``); integer arguments not listed default to ``"i32"``. ``constexprs``
    gives every ``tl.constexpr`` argument, including those an autotuner would pick.
    """

    name: str
    kernel: Any
    types: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 2


_REGISTRY: list[AotSpec] = []


def register_aot(spec: AotSpec) -> AotSpec:
    """Add ``spec`` to the list compiled by ``python -m gka_kernels.common.aot``."""
    _REGISTRY.append(spec)
    return spec


def registered_specs() -> list[AotSpec]:
    return list(_REGISTRY)


def _jit_function(kernel: Any) -> Any:
    """Unwrap ``triton.autotune`` / ``triton.heuristics`` decorators down to the JITFunction."""
    while not hasattr(kernel, "arg_names") or hasattr(kernel, "configs") or hasattr(kernel, "values"):
        if not hasattr(kernel, "fn"):
            break
        kernel = kernel.fn
    return kernel


def compile_spec(spec: AotSpec, arch: int = 90) -> dict[str, Any]:
    """Compile one spec for ``sm_<arch>``; returns shared memory bytes and per-thread registers,
    stack and local memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(spec.kernel)
    signature = {}
    for name in fn.arg_names:
        if name in spec.constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = spec.types.get(name, "i32")
    unknown = set(spec.types) - set(fn.arg_names)
    unknown |= set(spec.constexprs) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{spec.name}: arguments {sorted(unknown)} are not parameters of {fn.__name__}")
    # Real launches mark every pointer to a 16-byte aligned tensor (all torch allocations) as
    # divisible by 16, which enables vectorized loads; give the AOT compile the same hint so that
    # its register and spill report matches what runs.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*")}
    src = ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    info = {"name": spec.name, "arch": arch, "shared": int(getattr(compiled.metadata, "shared", 0))}
    info.update(_resource_usage(compiled.asm["cubin"]))
    return info


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack and local memory per thread from ``cuobjdump --dump-resource-usage``
    (the copy shipped in the Triton wheel); empty when the tool is unavailable."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    usage = {}
    for key, field_name in (("REG", "registers"), ("STACK", "stack"), ("LOCAL", "local")):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            usage[field_name] = int(m.group(1))
    return usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version(s), default 90")
    parser.add_argument("--filter", default="", help="compile only specs whose name contains this")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    for mod in KERNEL_MODULES:
        importlib.import_module(mod)
    # Under `python -m` this file runs as __main__; the kernel modules registered into the
    # importable module of the same name, so read the registry from there.
    registry = importlib.import_module("gka_kernels.common.aot")
    specs = [s for s in registry.registered_specs() if args.filter in s.name]
    if not specs:
        print("no AOT specs registered", file=sys.stderr)
        return 1
    results, failures = [], 0
    for arch in args.arch or [90]:
        for spec in specs:
            t0 = time.perf_counter()
            try:
                info = compile_spec(spec, arch)
            except Exception as exc:  # report every failing spec, then fail
                failures += 1
                print(f"FAIL sm_{arch} {spec.name}: {type(exc).__name__}: {exc}", file=sys.stderr)
                continue
            info["seconds"] = round(time.perf_counter() - t0, 2)
            results.append(info)
            print(f"ok   sm_{arch} {spec.name}: shared={info['shared']}B regs={info.get('registers')} "
                  f"stack={info.get('stack')} local={info.get('local')} ({info['seconds']}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
