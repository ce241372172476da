"""CUDA C++ decode kernels (SPEC 8): ``gdn_decode``, ``mamba2_decode``, ``gka_decode``.

CPU: the extension exports the launchers and they accept exactly the arguments the wrappers build
(when nvcc built it); every kind of bad input raises a clear error before any launch; and the
kernels themselves, compiled with g++ for a host emulation of CUDA threads (csrc/emulation), match
the float64 references through the same argument builders the wrappers use.
GPU (``pytest -m gpu``): each kernel against the float64 reference on the same (bf16-rounded)
inputs, with ragged slot indices and -1 padding (untouched bitwise), src != dst slots (the source
slot keeps the pre-step state), grouped heads, strided views, 1 and 4 tokens per step, and
CUDA-graph capture + replay equal to eager.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gka_kernels.cuda import extension_available, extension_error, gdn_decode, gka_decode, load_extension, mamba2_decode
from gka_kernels.cuda.gdn import gdn_decode_launch_args
from gka_kernels.cuda.gka import gka_decode_launch_args
from gka_kernels.cuda.mamba2 import mamba2_decode_launch_args
from tests.helpers import DECODE_BF16, DECODE_FP32, GKA_GPU_FWD, assert_close

# Six sequences over a pool of nine slots: two padding rows, slot 8 never referenced.
SRC = [5, -1, 0, 7, -1, 2]
# Separate destinations: padding rows name slot 6 (must stay untouched), the last sequence stores nothing.
DST = [1, 6, 3, 4, 6, -1]
SLOTS = 9
BATCH = len(SRC)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _indices(dst_mode: str, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``inplace``: int64 state_indices only; ``separate``: int32 src and dst arrays."""
    if dst_mode == "inplace":
        return torch.tensor(SRC, dtype=torch.int64, device=device), None
    return (torch.tensor(SRC, dtype=torch.int32, device=device),
            torch.tensor(DST, dtype=torch.int32, device=device))


def _valid() -> list[int]:
    return [b for b in range(BATCH) if SRC[b] >= 0]


def _written(dst_mode: str) -> list[tuple[int, int]]:
    """(position among the valid sequences, destination slot) of every state write."""
    dst = SRC if dst_mode == "inplace" else DST
    return [(i, dst[b]) for i, b in enumerate(_valid()) if dst[b] >= 0]


def _check_step(o, pools_after, pools_before, ref_o, ref_states, dst_mode, tol_o, tol_state=DECODE_FP32):
    """Outputs of valid rows vs the reference, padding rows 0, written slots vs the reference final
    states, every other slot bitwise unchanged."""
    valid = _valid()
    assert_close("o", o[valid], ref_o, tol_o)
    for b in range(BATCH):
        if SRC[b] < 0:
            assert bool((o[b] == 0).all()), f"padding row {b} of the output is not 0"
    writes = _written(dst_mode)
    slots_written = [slot for _, slot in writes]
    untouched = [s for s in range(SLOTS) if s not in slots_written]
    names = ["state_pool"] if len(pools_after) == 1 else ["h_kk_pool", "h_kv_pool"]
    for name, after, before, ref in zip(names, pools_after, pools_before, ref_states):
        assert_close(name, after[slots_written], ref[[i for i, _ in writes]].to(after.device), tol_state)
        assert torch.equal(after[untouched], before[untouched]), f"{name}: slots {untouched} changed"


def _graph_equals_eager(step, pools):
    """Capture ``step(pools, out)`` in a CUDA graph, replay once, compare with an eager call."""
    eager = [p.clone() for p in pools]
    out_eager = step(eager, None)
    captured = [p.clone() for p in pools]
    out = torch.empty_like(out_eager)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step([p.clone() for p in pools], out)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(captured, out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, out_eager)
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Input builders (CPU generation, then moved), shared by the CPU and GPU tests
# ---------------------------------------------------------------------------------------------

def gdn_inputs(*, Tn=2, H=4, Hq=4, HKV=2, K=32, V=16, dtype=torch.float32, device="cpu", seed=0):
    gen = _gen(seed)
    q = torch.randn(BATCH, Tn, Hq, K, generator=gen)
    k = torch.randn(BATCH, Tn, HKV, K, generator=gen)
    v = torch.randn(BATCH, Tn, HKV, V, generator=gen)
    g = torch.log(torch.empty(BATCH, Tn, H).uniform_(0.5, 0.999, generator=gen))
    beta = torch.rand(BATCH, Tn, H, generator=gen)
    pool = 0.5 * torch.randn(SLOTS, H, K, V, generator=gen)
    act = [x.to(device=device, dtype=dtype) for x in (q, k, v)]
    return dict(q=act[0], k=act[1], v=act[2], g=g.to(device), beta=beta.to(device), state_pool=pool.to(device))


def mamba2_inputs(*, Tn=2, H=4, Hx=4, GB=2, GC=2, P=8, N=16, dtype=torch.float32, device="cpu", seed=0,
                  D_per_p=False, with_z=True):
    gen = _gen(seed)
    x = torch.randn(BATCH, Tn, Hx, P, generator=gen)
    dt = 0.5 * torch.randn(BATCH, Tn, H, generator=gen)
    A = -torch.empty(H).uniform_(0.5, 2.0, generator=gen)
    Bm = torch.randn(BATCH, Tn, GB, N, generator=gen)
    Cm = torch.randn(BATCH, Tn, GC, N, generator=gen)
    D = torch.randn(H, P, generator=gen) if D_per_p else torch.randn(H, generator=gen)
    z = torch.randn(BATCH, Tn, H, P, generator=gen)
    dt_bias = 0.1 * torch.randn(H, generator=gen)
    pool = torch.randn(SLOTS, H, P, N, generator=gen)
    act = [t.to(device=device, dtype=dtype) for t in (x, Bm, Cm, z)]
    return dict(state_pool=pool.to(device), x=act[0], dt=dt.to(device), A=A.to(device), B=act[1], C=act[2],
                D=D.to(device), z=act[3] if with_z else None, dt_bias=dt_bias.to(device))


def gka_inputs(*, Tn=2, H=4, Hq=4, HKV=2, K=32, V=32, dtype=torch.float32, device="cpu", seed=0, history=24):
    """Normalized q, beta-scaled normalized k and v (as the layer passes them), and pools holding
    decayed sums of ``history`` outer products, so H is rank-deficient for K > history and the
    solve runs at the worst condition number the ridge allows."""
    gen = _gen(seed)
    q = F.normalize(torch.randn(BATCH, Tn, Hq, K, generator=gen), dim=-1)
    beta = torch.empty(BATCH, Tn, HKV, 1).uniform_(0.3, 1.0, generator=gen)
    k = F.normalize(torch.randn(BATCH, Tn, HKV, K, generator=gen), dim=-1) * beta
    v = torch.randn(BATCH, Tn, HKV, V, generator=gen) * beta
    g = torch.log(torch.empty(BATCH, Tn, H).uniform_(0.6, 0.999, generator=gen))
    alpha = torch.rand(BATCH, Tn, H, generator=gen)
    kh = F.normalize(torch.randn(SLOTS, H, history, K, generator=gen), dim=-1)
    w = torch.empty(SLOTS, H, history, 1).uniform_(0.05, 1.0, generator=gen)
    vh = torch.randn(SLOTS, H, history, V, generator=gen)
    h_kk = (kh * w).transpose(-1, -2) @ kh
    h_kv = (kh * w).transpose(-1, -2) @ vh
    act = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    return dict(q=act[0], k=act[1], v=act[2], g=g.to(device), alpha=alpha.to(device),
                h_kk_pool=h_kk.contiguous().to(device), h_kv_pool=h_kv.contiguous().to(device))


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


# ---------------------------------------------------------------------------------------------
# CPU: extension exports and launcher signatures
# ---------------------------------------------------------------------------------------------

needs_built_extension = pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("GKA_KERNELS_BUILD_CUDA") == "off",
    reason="no nvcc: the extension is not built")


@needs_built_extension
def test_extension_exports_decode_launchers():
    assert extension_available(), extension_error()
    ext = load_extension()
    for name in ("gdn_decode", "mamba2_decode", "gka_decode", "state_copy", "cuda_runtime_version"):
        assert callable(getattr(ext, name, None)), f"gka_kernels._C lacks {name}"


LAUNCH_CASES = {
    "gdn_decode": lambda: gdn_decode_launch_args(**gdn_inputs(), state_indices=_indices("separate", "cpu")[0]),
    "mamba2_decode": lambda: mamba2_decode_launch_args(**mamba2_inputs(), state_indices=_indices("inplace", "cpu")[0]),
    "gka_decode": lambda: gka_decode_launch_args(**gka_inputs(), state_indices=_indices("inplace", "cpu")[0]),
}


@needs_built_extension
@pytest.mark.skipif(torch.cuda.is_available(), reason="launches with host pointers: only without a CUDA device")
@pytest.mark.parametrize("fn", sorted(LAUNCH_CASES))
def test_launcher_accepts_wrapper_arguments_and_reports_no_driver(fn):
    """The keyword arguments the wrapper builds bind to the C++ launcher, which then fails only for
    want of a GPU; the launcher's own guard rejects an out-of-range token count."""
    ext = load_extension()
    args, _ = LAUNCH_CASES[fn]()
    with pytest.raises(RuntimeError, match=fn):
        getattr(ext, fn)(**args, stream=0)
    with pytest.raises(ValueError, match="Tn must be in"):
        getattr(ext, fn)(**{**args, "Tn": 9}, stream=0)


# ---------------------------------------------------------------------------------------------
# CPU: bad inputs raise before any launch
# ---------------------------------------------------------------------------------------------

def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous view of ``t``'s shape at a 4-byte offset."""
    return torch.zeros(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)


def _noncontig_last(t: torch.Tensor) -> torch.Tensor:
    return torch.zeros(*t.shape, 2, dtype=t.dtype)[..., 0]


GDN_BAD = [
    ("q not a tensor", dict(q=[1.0]), TypeError, "q"),
    ("q 3-d", dict(q=torch.zeros(6, 2, 4)), ValueError, "q"),
    ("q float64", dict(q=torch.zeros(6, 2, 4, 32, dtype=torch.float64)), TypeError, "q"),
    ("9 tokens", dict(q=torch.zeros(6, 9, 4, 32)), ValueError, "q: expected 1 to 8 tokens"),
    ("too many sequences", dict(q=torch.zeros(1, 1, 4, 32).expand(65536, 1, 4, 32)), ValueError,
     "q: at most 65535 sequences"),
    ("k dtype", dict(k=torch.zeros(6, 2, 2, 32, dtype=torch.bfloat16)), TypeError, "k"),
    ("k head dim", dict(k=torch.zeros(6, 2, 2, 16)), ValueError, "k"),
    ("v batch", dict(v=torch.zeros(5, 2, 2, 16)), ValueError, "v"),
    ("g rank", dict(g=torch.zeros(6, 2)), ValueError, "g"),
    ("beta heads", dict(beta=torch.zeros(6, 2, 3)), ValueError, "beta"),
    ("k heads", dict(k=torch.zeros(6, 2, 3, 32)), ValueError, "k: number of heads 3"),
    ("q heads", dict(q=torch.zeros(6, 2, 3, 32)), ValueError, "q: number of heads 3"),
    ("K too large", dict(q=torch.zeros(6, 2, 4, 300), k=torch.zeros(6, 2, 2, 300)), ValueError, "q: head dim"),
    ("V not multiple of 4", dict(v=torch.zeros(6, 2, 2, 6)), ValueError, "v: head dim"),
    ("q last dim strided", dict(q=_noncontig_last(torch.zeros(6, 2, 4, 32))), ValueError, "q: expected the last"),
    ("pool dtype", dict(state_pool=torch.zeros(9, 4, 32, 16, dtype=torch.float64)), TypeError, "state_pool"),
    ("pool shape", dict(state_pool=torch.zeros(9, 4, 16, 32)), ValueError, "state_pool"),
    ("pool non-contiguous", dict(state_pool=torch.zeros(9, 4, 16, 32).transpose(2, 3)), ValueError, "state_pool"),
    ("pool misaligned", dict(state_pool=_misaligned(torch.zeros(9, 4, 32, 16))), ValueError, "state_pool: expected a 16-byte"),
    ("indices dtype", dict(state_indices=torch.zeros(6)), TypeError, "state_indices"),
    ("indices length", dict(state_indices=torch.zeros(5, dtype=torch.int64)), ValueError, "state_indices: expected 6"),
    ("indices rank", dict(state_indices=torch.zeros(6, 1, dtype=torch.int64)), ValueError, "state_indices"),
    ("dst length", dict(dst_state_indices=torch.zeros(4, dtype=torch.int32)), ValueError, "dst_state_indices"),
    ("no indices, small pool", dict(state_indices=None, state_pool=torch.zeros(4, 4, 32, 16)), ValueError,
     "state_indices: required"),
    ("scale type", dict(scale="1"), TypeError, "scale"),
    ("scale nan", dict(scale=math.nan), ValueError, "scale"),
    ("l2norm flag", dict(use_qk_l2norm=1), TypeError, "use_qk_l2norm"),
    ("out shape", dict(out=torch.zeros(6, 2, 4, 32)), ValueError, "out"),
    ("out dtype", dict(out=torch.zeros(6, 2, 4, 16, dtype=torch.float16)), TypeError, "out"),
    ("cpu tensors", dict(), ValueError, "gdn_decode: expected CUDA tensors"),
]


@pytest.mark.parametrize("case", GDN_BAD, ids=[c[0] for c in GDN_BAD])
def test_gdn_decode_bad_input(case):
    _, change, exc, match = case
    kwargs = {**gdn_inputs(), "state_indices": torch.tensor(SRC)}
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        gdn_decode(**kwargs)


MAMBA_BAD = [
    ("x 2-d", dict(x=torch.zeros(6, 4)), ValueError, "x"),
    ("x float64", dict(x=torch.zeros(6, 2, 4, 8, dtype=torch.float64)), TypeError, "x"),
    ("9 tokens", dict(x=torch.zeros(6, 9, 4, 8)), ValueError, "x: expected 1 to 8 tokens"),
    ("dt shape", dict(dt=torch.zeros(6, 3, 4)), ValueError, "dt"),
    ("A shape", dict(A=torch.zeros(3)), ValueError, "A"),
    ("B dtype", dict(B=torch.zeros(6, 2, 2, 16, dtype=torch.float16)), TypeError, "B"),
    ("C state size", dict(C=torch.zeros(6, 2, 2, 8)), ValueError, "C"),
    ("B groups", dict(B=torch.zeros(6, 2, 3, 16)), ValueError, "B: number of heads 3"),
    ("x heads", dict(x=torch.zeros(6, 2, 3, 8)), ValueError, "x: number of heads 3"),
    ("N not multiple of 4", dict(B=torch.zeros(6, 2, 2, 10), C=torch.zeros(6, 2, 2, 10)), ValueError, "B: head dim"),
    ("D shape", dict(D=torch.zeros(4, 9)), ValueError, "D"),
    ("z shape", dict(z=torch.zeros(6, 2, 2, 8)), ValueError, "z"),
    ("dt_bias shape", dict(dt_bias=torch.zeros(4, 1)), ValueError, "dt_bias"),
    ("dt_softplus type", dict(dt_softplus="yes"), TypeError, "dt_softplus"),
    ("dt_limit type", dict(dt_limit=0.5), TypeError, "dt_limit"),
    ("dt_limit order", dict(dt_limit=(1.0, 0.0)), ValueError, "dt_limit"),
    ("pool shape", dict(state_pool=torch.zeros(9, 4, 16, 8)), ValueError, "state_pool"),
    ("pool dtype", dict(state_pool=torch.zeros(9, 4, 8, 16, dtype=torch.bfloat16)), TypeError, "state_pool"),
    ("indices device", dict(state_indices=torch.zeros(6, dtype=torch.int64, device="meta")), ValueError,
     "state_indices: expected device"),
    ("single-token form, 4-d dt", dict(x=torch.zeros(6, 4, 8)), ValueError, "dt: expected 2 dimensions"),
    ("out shape", dict(out=torch.zeros(6, 2, 4, 16)), ValueError, "out"),
    ("cpu tensors", dict(), ValueError, "mamba2_decode: expected CUDA tensors"),
]


@pytest.mark.parametrize("case", MAMBA_BAD, ids=[c[0] for c in MAMBA_BAD])
def test_mamba2_decode_bad_input(case):
    _, change, exc, match = case
    kwargs = {**mamba2_inputs(), "state_indices": torch.tensor(SRC)}
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        mamba2_decode(**kwargs)


GKA_BAD = [
    ("q 5-d", dict(q=torch.zeros(6, 2, 4, 32, 1)), ValueError, "q"),
    ("q float64", dict(q=torch.zeros(6, 2, 4, 32, dtype=torch.float64)), TypeError, "q"),
    ("0 tokens", dict(q=torch.zeros(6, 0, 4, 32)), ValueError, "q: expected 1 to 8 tokens"),
    ("v dtype", dict(v=torch.zeros(6, 2, 2, 32, dtype=torch.bfloat16)), TypeError, "v"),
    ("k heads", dict(k=torch.zeros(6, 2, 3, 32)), ValueError, "k: number of heads 3"),
    ("K too large", dict(q=torch.zeros(6, 2, 4, 256), k=torch.zeros(6, 2, 2, 256),
                         h_kk_pool=torch.zeros(9, 4, 256, 256), h_kv_pool=torch.zeros(9, 4, 256, 32)),
     ValueError, "q: head dim"),
    ("K not multiple of 4", dict(q=torch.zeros(6, 2, 4, 30), k=torch.zeros(6, 2, 2, 30)), ValueError, "q: head dim"),
    ("V too large", dict(v=torch.zeros(6, 2, 2, 132)), ValueError, "v: head dim"),
    ("alpha shape", dict(alpha=torch.zeros(6, 2, 2)), ValueError, "alpha"),
    ("g dtype", dict(g=torch.zeros(6, 2, 4, dtype=torch.int32)), TypeError, "g"),
    ("h_kk shape", dict(h_kk_pool=torch.zeros(9, 4, 32, 16)), ValueError, "h_kk_pool"),
    ("h_kv slots", dict(h_kv_pool=torch.zeros(8, 4, 32, 32)), ValueError, "h_kv_pool"),
    ("h_kv dtype", dict(h_kv_pool=torch.zeros(9, 4, 32, 32, dtype=torch.float16)), TypeError, "h_kv_pool"),
    ("num_iter 0", dict(num_iter=0), ValueError, "num_iter"),
    ("num_iter 65", dict(num_iter=65), ValueError, "num_iter"),
    ("num_iter float", dict(num_iter=10.0), TypeError, "num_iter"),
    ("ridge negative", dict(ridge_ratio=-0.1), ValueError, "ridge_ratio"),
    ("ridge inf", dict(ridge_ratio=math.inf), ValueError, "ridge_ratio"),
    ("ridge type", dict(ridge_ratio="0.02"), TypeError, "ridge_ratio"),
    ("dst dtype", dict(dst_state_indices=torch.zeros(6, dtype=torch.float32)), TypeError, "dst_state_indices"),
    ("out dtype", dict(out=torch.zeros(6, 2, 4, 32, dtype=torch.bfloat16)), TypeError, "out"),
    ("cpu tensors", dict(), ValueError, "gka_decode: expected CUDA tensors"),
]


@pytest.mark.parametrize("case", GKA_BAD, ids=[c[0] for c in GKA_BAD])
def test_gka_decode_bad_input(case):
    _, change, exc, match = case
    kwargs = {**gka_inputs(), "state_indices": torch.tensor(SRC)}
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        gka_decode(**kwargs)


# ---------------------------------------------------------------------------------------------
# One decode step vs the float64 references (shared by the GPU tests and the host emulation)
# ---------------------------------------------------------------------------------------------

def _tol(dtype, bf16_tol):
    return DECODE_FP32 if dtype == torch.float32 else bf16_tol


def _expand(t: torch.Tensor, H: int) -> torch.Tensor:
    """Repeat grouped heads (dim 2) to H heads, as the kernels read them (head h -> h // group)."""
    return t.repeat_interleave(H // t.shape[2], dim=2)


def _gates_as(inp: dict, names: tuple[str, ...], gate_dtype: torch.dtype | None) -> None:
    """Casts the per-head scalar inputs ``names`` of ``inp`` to ``gate_dtype`` (None: keep float32);
    the references then read the rounded values."""
    for n in names:
        if gate_dtype is not None and inp[n] is not None:
            inp[n] = inp[n].to(gate_dtype)


def check_gdn(run, device, *, dtype, Tn, layout, dst_mode, l2norm=True, scale=None, seed=0, gate_dtype=None):
    """``run`` takes gdn_decode's keywords; layout = (H, Hq, HKV, K, V)."""
    from gka_kernels.reference.gdn import gated_delta_rule_ref

    H, Hq, HKV, K, V = layout
    inp = gdn_inputs(Tn=Tn, H=H, Hq=Hq, HKV=HKV, K=K, V=V, dtype=dtype, device=device, seed=seed)
    _gates_as(inp, ("g", "beta"), gate_dtype)
    if not l2norm:
        inp["q"], inp["k"] = F.normalize(inp["q"], dim=-1), F.normalize(inp["k"], dim=-1)
    src, dst = _indices(dst_mode, device)
    before = inp["state_pool"].clone()
    o = run(**inp, state_indices=src, dst_state_indices=dst, scale=scale, use_qk_l2norm=l2norm)
    valid = _valid()
    d = {n: inp[n][valid].double() for n in ("q", "k", "v", "g", "beta")}
    ref_o, ref_s = gated_delta_rule_ref(_expand(d["q"], H), d["k"], d["v"], d["g"], d["beta"], scale=scale,
                                        initial_state=before[[SRC[b] for b in valid]].double(),
                                        output_final_state=True, use_qk_l2norm=l2norm)
    _check_step(o, [inp["state_pool"]], [before], ref_o, [ref_s], dst_mode, _tol(dtype, DECODE_BF16))


def check_mamba2(run, device, *, dtype, Tn, layout, dst_mode, seed=0, gate_dtype=None):
    """``run`` takes mamba2_decode's keywords; layout = (H, Hx, GB, GC, P, N, D per P, z, dt_limit)."""
    from gka_kernels.reference.mamba2 import ssd_ref

    H, Hx, GB, GC, P, N, D_per_p, with_z, dt_limit = layout
    inp = mamba2_inputs(Tn=Tn, H=H, Hx=Hx, GB=GB, GC=GC, P=P, N=N, dtype=dtype, device=device, seed=seed,
                        D_per_p=D_per_p, with_z=with_z)
    _gates_as(inp, ("dt", "A", "D", "dt_bias"), gate_dtype)
    src, dst = _indices(dst_mode, device)
    before = inp["state_pool"].clone()
    y = run(**inp, state_indices=src, dst_state_indices=dst, dt_softplus=True, dt_limit=dt_limit)
    valid = _valid()
    d = {n: inp[n][valid].double() for n in ("x", "dt", "B", "C") + (("z",) if with_z else ())}
    ref_y, ref_s = ssd_ref(_expand(d["x"], H), d["dt"], inp["A"].double(), _expand(d["B"], H),
                           _expand(d["C"], H), D=inp["D"].double(), z=d.get("z"),
                           dt_bias=inp["dt_bias"].double(),
                           initial_states=before[[SRC[b] for b in valid]].double(), dt_softplus=True,
                           dt_limit=dt_limit)
    _check_step(y, [inp["state_pool"]], [before], ref_y, [ref_s], dst_mode, _tol(dtype, DECODE_BF16))


def check_gka(run, device, *, dtype, Tn, layout, dst_mode, num_iter, with_alpha=True, zero_h=False, seed=0,
              gate_dtype=None):
    """``run`` takes gka_decode's keywords; layout = (H, Hq, HKV, K, V). ``zero_h``: the first
    sequence starts from H = 0 and has zero keys, so its H stays 0 (fro = 0, so fro = 1 for the step
    size) while U is still read out through that solve."""
    from gka_kernels.reference.gka import gka_ref

    H, Hq, HKV, K, V = layout
    inp = gka_inputs(Tn=Tn, H=H, Hq=Hq, HKV=HKV, K=K, V=V, dtype=dtype, device=device, seed=seed)
    if not with_alpha:
        inp["alpha"] = None
    _gates_as(inp, ("g", "alpha"), gate_dtype)
    if zero_h:
        inp["h_kk_pool"][SRC[0]].zero_()
        inp["k"][0].zero_()
    src, dst = _indices(dst_mode, device)
    before = (inp["h_kk_pool"].clone(), inp["h_kv_pool"].clone())
    o = run(**inp, state_indices=src, dst_state_indices=dst, num_iter=num_iter, ridge_ratio=0.02)
    valid = _valid()
    rows = [SRC[b] for b in valid]
    d = {n: inp[n][valid].double() for n in ("q", "k", "v", "g")}
    alpha = inp["alpha"][valid].double() if with_alpha else None
    ref_o, (ref_kk, ref_kv) = gka_ref(_expand(d["q"], H), d["k"], d["v"], d["g"], alpha=alpha,
                                      ridge_ratio=0.02, num_iter=num_iter,
                                      initial_state=(before[0][rows].double(), before[1][rows].double()),
                                      output_final_state=True)
    _check_step(o, [inp["h_kk_pool"], inp["h_kv_pool"]], list(before), ref_o, [ref_kk, ref_kv], dst_mode,
                _tol(dtype, GKA_GPU_FWD))


# ---------------------------------------------------------------------------------------------
# CPU: the kernels themselves, compiled with g++ for the host emulation (csrc/emulation)
# ---------------------------------------------------------------------------------------------

def _cuda_include() -> Path | None:
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.insert(0, str(Path(nvcc).resolve().parent.parent))
    for root in roots:
        if root and (Path(root) / "include" / "cuda_bf16.h").exists():
            return Path(root) / "include"
    return None


@pytest.fixture(scope="module")
def emulated_ext(tmp_path_factory):
    """``csrc`` compiled with g++ -DGKA_HOST_EMULATION into a module with the launchers of
    ``gka_kernels._C``: CUDA threads become fibers, so the kernels' indexing, reductions and
    barriers run on the CPU against host pointers."""
    include = _cuda_include()
    if shutil.which("g++") is None or include is None:
        pytest.skip("needs g++ and the CUDA headers (cuda_runtime.h, cuda_bf16.h)")
    pybind11 = pytest.importorskip("pybind11")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    out = tmp_path_factory.mktemp("emulated_ext")
    flags = ["g++", "-std=c++17", "-O1", "-fPIC", "-w", f"-I{csrc}", f"-I{include}",
             f"-I{sysconfig.get_paths()['include']}", f"-I{pybind11.get_include()}"]
    units = [(["-DGKA_HOST_EMULATION", "-x", "c++"], src) for src in sorted(csrc.glob("*.cu"))]
    units += [([], csrc / "bindings.cpp"), ([], csrc / "emulation" / "runtime_stubs.cpp")]
    jobs, objects = [], []
    for extra, src in units:
        obj = out / (src.name + ".o")
        objects.append(str(obj))
        jobs.append((src, subprocess.Popen(flags + extra + ["-c", str(src), "-o", str(obj)],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for src, job in jobs:
        log = job.communicate()[0]
        assert job.returncode == 0, f"g++ failed on {src.name}:\n{log[-4000:]}"
    lib = out / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["g++", "-shared", *objects, "-o", str(lib)], check=True)
    spec = importlib.util.spec_from_file_location("_C", lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LAUNCH_ARGS = {"gdn": gdn_decode_launch_args, "mamba2": mamba2_decode_launch_args, "gka": gka_decode_launch_args}


def _emulated(ext, op):
    """A callable with the keywords of ``<op>_decode`` that runs the emulated kernel."""
    def run(**kwargs):
        args, out = LAUNCH_ARGS[op](**kwargs)
        getattr(ext, f"{op}_decode")(**args, stream=0)
        return out
    return run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dst_mode", ["inplace", "separate"])
def test_gdn_kernel_in_host_emulation(emulated_ext, dtype, dst_mode):
    check_gdn(_emulated(emulated_ext, "gdn"), "cpu", dtype=dtype, Tn=3, layout=(4, 2, 2, 36, 40),
              dst_mode=dst_mode, l2norm=dst_mode == "inplace")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dst_mode", ["inplace", "separate"])
def test_mamba2_kernel_in_host_emulation(emulated_ext, dtype, dst_mode):
    layout = (4, 2, 2, 4, 24, 32, True, True, (0.02, 0.4)) if dst_mode == "inplace" else \
        (4, 4, 1, 2, 8, 72, False, False, (0.0, math.inf))
    check_mamba2(_emulated(emulated_ext, "mamba2"), "cpu", dtype=dtype, Tn=2, layout=layout, dst_mode=dst_mode)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dst_mode,layout,num_iter", [
    ("separate", (4, 2, 2, 32, 36), 10),   # tile 64
    ("inplace", (2, 2, 1, 100, 64), 3),    # tile 128, K not a power of two
])
def test_gka_kernel_in_host_emulation(emulated_ext, dtype, dst_mode, layout, num_iter):
    check_gka(_emulated(emulated_ext, "gka"), "cpu", dtype=dtype, Tn=2, layout=layout, dst_mode=dst_mode,
              num_iter=num_iter, with_alpha=dst_mode == "separate", zero_h=dst_mode == "inplace")


@pytest.mark.parametrize("setting,ok", [("0", True), ("3:100", True), ("2", False), ("4:x", False), ("0:5", False)])
def test_gka_stagger_setting_in_host_emulation(emulated_ext, setting, ok):
    """``GKA_KERNELS_GKA_DECODE_STAGGER`` is read once per process, so each setting runs in its own
    process: "0" (off) and "G:C" run the step (6 sequences x 4 heads, more than two emulated waves,
    so the staggered path is taken) with the reference's results; anything else is a ValueError
    naming the variable, raised before any launch."""
    code = (
        "import importlib.util\n"
        f"spec = importlib.util.spec_from_file_location('_C', {emulated_ext.__file__!r})\n"
        "ext = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(ext)\n"
        "import torch\n"
        "from tests.test_cuda_decode import _emulated, check_gka\n"
        "check_gka(_emulated(ext, 'gka'), 'cpu', dtype=torch.float32, Tn=2, layout=(4, 2, 2, 32, 36),\n"
        "          dst_mode='separate', num_iter=5)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "GKA_KERNELS_GKA_DECODE_STAGGER": setting}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=300)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        assert result.returncode != 0
        assert "ValueError" in result.stderr and "GKA_KERNELS_GKA_DECODE_STAGGER" in result.stderr, \
            result.stderr[-3000:]


@pytest.mark.parametrize("split,dtype,dst_mode,layout", [
    ("2", torch.float32, "separate", (2, 2, 1, 100, 64)),   # tile 128, V = 64: the second CTA owns no value column
    ("2", torch.bfloat16, "inplace", (2, 1, 1, 128, 128)),  # each CTA stores half of H's rows over H[src]
    ("2", torch.float16, "separate", (2, 2, 2, 128, 120)),  # the second CTA's columns end at V = 120
    ("2", torch.float32, "inplace", (4, 2, 2, 32, 36)),     # tile 64: the second CTA owns 4 columns
    ("1", torch.float32, "separate", (4, 2, 2, 32, 36)),
])
def test_gka_split_head_in_host_emulation(emulated_ext, monkeypatch, split, dtype, dst_mode, layout):
    """GKA_KERNELS_GKA_DECODE_SPLIT=2 runs a head on a cluster of 2 CTAs: each solves on the whole H,
    owns a slice of U's and o's value columns and stores a slice of H's rows after the cluster
    barrier. The emulation runs a cluster's blocks together, their threads interleaved at every
    barrier; padding sequences (SRC has two) take the early exit in every CTA of the cluster."""
    monkeypatch.setenv("GKA_KERNELS_GKA_DECODE_SPLIT", split)
    check_gka(_emulated(emulated_ext, "gka"), "cpu", dtype=dtype, Tn=3, layout=layout, dst_mode=dst_mode,
              num_iter=7, with_alpha=dst_mode == "separate", zero_h=dst_mode == "inplace")


@pytest.mark.parametrize("setting", ["4", "0", "on", ""])
def test_gka_split_setting_rejected(emulated_ext, monkeypatch, setting):
    """Anything but auto, 1 or 2 is a ValueError naming the variable, raised before any launch."""
    monkeypatch.setenv("GKA_KERNELS_GKA_DECODE_SPLIT", setting)
    inp = gka_inputs(Tn=1, H=2, Hq=2, HKV=2, K=32, V=32, seed=3)
    before = (inp["h_kk_pool"].clone(), inp["h_kv_pool"].clone())
    src, dst = _indices("separate", "cpu")
    with pytest.raises(ValueError, match="GKA_KERNELS_GKA_DECODE_SPLIT"):
        _emulated(emulated_ext, "gka")(**inp, state_indices=src, dst_state_indices=dst, num_iter=3)
    assert torch.equal(inp["h_kk_pool"], before[0]) and torch.equal(inp["h_kv_pool"], before[1])


def test_gdn_kernel_wide_tile_many_tokens_in_host_emulation(emulated_ext):
    """The 256-row tile (K = 200), 8 tokens, a V that is not a multiple of the 32-column tile."""
    check_gdn(_emulated(emulated_ext, "gdn"), "cpu", dtype=torch.float16, Tn=8, layout=(4, 2, 1, 200, 100),
              dst_mode="separate")


def test_production_tiles_in_host_emulation(emulated_ext):
    """The tiles the serving shapes use: K = V = 128 (GDN, GKA at 30 iterations), P = 64, N = 128."""
    check_gdn(_emulated(emulated_ext, "gdn"), "cpu", dtype=torch.bfloat16, Tn=2, layout=(2, 2, 1, 128, 128),
              dst_mode="separate")
    check_mamba2(_emulated(emulated_ext, "mamba2"), "cpu", dtype=torch.bfloat16, Tn=2,
                 layout=(2, 2, 1, 1, 64, 128, False, True, (0.0, math.inf)), dst_mode="separate")
    check_gka(_emulated(emulated_ext, "gka"), "cpu", dtype=torch.float32, Tn=4, layout=(2, 2, 1, 128, 128),
              dst_mode="separate", num_iter=30)


@pytest.mark.parametrize("tiles", ["wide", "narrow"])
@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gates_in_host_emulation(emulated_ext, monkeypatch, gate_dtype, tiles):
    """Per-head scalars (GDN g and beta; Mamba-2 dt, A, D, dt_bias; GKA g and alpha) in 16-bit
    dtypes, read through the kernels' run-time dtype path; both GDN / Mamba-2 tile widths, and with
    narrow tiles one token runs the Mamba-2 single-token kernel."""
    monkeypatch.setenv("GKA_KERNELS_DECODE_TILES", tiles)
    check_gdn(_emulated(emulated_ext, "gdn"), "cpu", dtype=torch.float32, Tn=2, layout=(4, 2, 2, 36, 40),
              dst_mode="inplace", gate_dtype=gate_dtype)
    for Tn in (1, 2):
        check_mamba2(_emulated(emulated_ext, "mamba2"), "cpu", dtype=torch.float32, Tn=Tn,
                     layout=(4, 2, 2, 4, 24, 32, True, True, (0.02, 0.4)), dst_mode="separate",
                     gate_dtype=gate_dtype)
    check_gka(_emulated(emulated_ext, "gka"), "cpu", dtype=torch.float32, Tn=2, layout=(4, 2, 2, 32, 36),
              dst_mode="inplace", num_iter=5, gate_dtype=gate_dtype)


@pytest.mark.parametrize("tiles", ["wide", "narrow"])
@pytest.mark.parametrize("dtype,layout,dst_mode,l2norm,gate_dtype", [
    (torch.float32, (4, 2, 2, 36, 40), "inplace", True, None),                # K, V not multiples of a tile; padding
    (torch.bfloat16, (2, 2, 1, 200, 52), "separate", False, torch.bfloat16),  # 256-row tile, no l2norm
    (torch.float16, (4, 2, 2, 64, 100), "separate", True, torch.float16),     # 64-row tile
])
def test_gdn_single_token_kernel_in_host_emulation(emulated_ext, monkeypatch, tiles, dtype, layout, dst_mode,
                                                   l2norm, gate_dtype):
    """One token per sequence: with narrow tiles the GDN single-token kernel (one CTA per work item,
    no staging), with wide ones the persistent kernel; every row tile."""
    monkeypatch.setenv("GKA_KERNELS_DECODE_TILES", tiles)
    check_gdn(_emulated(emulated_ext, "gdn"), "cpu", dtype=dtype, Tn=1, layout=layout, dst_mode=dst_mode,
              l2norm=l2norm, gate_dtype=gate_dtype)


@pytest.mark.parametrize("tiles", ["wide", "narrow"])
def test_decode_tile_settings_in_host_emulation(emulated_ext, monkeypatch, tiles):
    """GKA_KERNELS_DECODE_TILES forces the GDN / Mamba-2 tile width: both widths at every tile size
    (GDN K = 36, 128, 200; Mamba-2 N = 32, 72, 128, 256), V and P not multiples of a tile."""
    monkeypatch.setenv("GKA_KERNELS_DECODE_TILES", tiles)
    gdn, mamba2 = _emulated(emulated_ext, "gdn"), _emulated(emulated_ext, "mamba2")
    check_gdn(gdn, "cpu", dtype=torch.float32, Tn=3, layout=(4, 2, 2, 36, 40), dst_mode="inplace")
    check_gdn(gdn, "cpu", dtype=torch.bfloat16, Tn=1, layout=(2, 2, 1, 128, 128), dst_mode="separate")
    check_gdn(gdn, "cpu", dtype=torch.float16, Tn=2, layout=(2, 2, 1, 200, 52), dst_mode="separate")
    check_mamba2(mamba2, "cpu", dtype=torch.float32, Tn=2, layout=(4, 2, 2, 4, 24, 32, True, True, (0.02, 0.4)),
                 dst_mode="inplace")
    check_mamba2(mamba2, "cpu", dtype=torch.float32, Tn=2, layout=(4, 4, 1, 2, 8, 72, False, False, (0.0, math.inf)),
                 dst_mode="separate")
    check_mamba2(mamba2, "cpu", dtype=torch.bfloat16, Tn=1, layout=(2, 2, 1, 1, 40, 128, False, True, (0.0, math.inf)),
                 dst_mode="separate")
    check_mamba2(mamba2, "cpu", dtype=torch.float32, Tn=1, layout=(2, 2, 1, 1, 12, 256, False, True, (0.0, math.inf)),
                 dst_mode="inplace")


@pytest.mark.parametrize("stages", ["1", "2", "auto"])
def test_gdn_decode_stages_in_host_emulation(emulated_ext, monkeypatch, stages):
    """GKA_KERNELS_GDN_DECODE_STAGES sets how many state tiles each CTA of the persistent GDN kernel
    keeps in flight: every setting on a grid smaller than the work (the emulated device has 4 SMs,
    so each CTA walks several items, padding slots among them), both tile widths and row tiles."""
    monkeypatch.setenv("GKA_KERNELS_GDN_DECODE_STAGES", stages)
    gdn = _emulated(emulated_ext, "gdn")
    for tiles in ("wide", "narrow"):
        monkeypatch.setenv("GKA_KERNELS_DECODE_TILES", tiles)
        check_gdn(gdn, "cpu", dtype=torch.float32, Tn=3, layout=(4, 2, 2, 36, 40), dst_mode="inplace")
        check_gdn(gdn, "cpu", dtype=torch.bfloat16, Tn=2, layout=(2, 2, 1, 128, 128), dst_mode="separate")
        check_gdn(gdn, "cpu", dtype=torch.float16, Tn=1, layout=(2, 2, 1, 200, 52), dst_mode="separate")


@pytest.mark.parametrize("setting", ["", "3", "0"])
def test_gdn_decode_stages_setting_rejected(emulated_ext, monkeypatch, setting):
    """An unknown GKA_KERNELS_GDN_DECODE_STAGES is a ValueError naming it, raised before any launch."""
    monkeypatch.setenv("GKA_KERNELS_GDN_DECODE_STAGES", setting)
    inp = gdn_inputs(seed=3)
    src, dst = _indices("separate", "cpu")
    before = inp["state_pool"].clone()
    with pytest.raises(ValueError, match="GKA_KERNELS_GDN_DECODE_STAGES"):
        _emulated(emulated_ext, "gdn")(**inp, state_indices=src, dst_state_indices=dst)
    assert torch.equal(inp["state_pool"], before)


@pytest.mark.parametrize("setting", ["", "half", "16"])
def test_decode_tile_setting_rejected(emulated_ext, monkeypatch, setting):
    """An unknown GKA_KERNELS_DECODE_TILES is a ValueError naming it, raised before any launch."""
    monkeypatch.setenv("GKA_KERNELS_DECODE_TILES", setting)
    src, dst = _indices("separate", "cpu")
    for op, inp in (("gdn", gdn_inputs(seed=1)), ("mamba2", mamba2_inputs(seed=2))):
        before = inp["state_pool"].clone()
        with pytest.raises(ValueError, match="GKA_KERNELS_DECODE_TILES"):
            _emulated(emulated_ext, op)(**inp, state_indices=src, dst_state_indices=dst)
        assert torch.equal(inp["state_pool"], before)


def test_state_copy_kernel_in_host_emulation(emulated_ext):
    src = torch.randn(5, 3, 4, 8)
    dst = torch.randn(5, 3, 4, 8)
    expect = dst.clone()
    pairs = [(0, 4), (-1, 1), (3, 0), (2, -1)]
    for s, d in pairs:
        if s >= 0 and d >= 0:
            expect[d] = src[s]
    si = torch.tensor([s for s, _ in pairs])
    di = torch.tensor([d for _, d in pairs])
    emulated_ext.state_copy(src.data_ptr(), dst.data_ptr(), si.data_ptr(), di.data_ptr(), len(pairs),
                            src[0].numel(), 0)
    assert torch.equal(dst, expect)


# ---------------------------------------------------------------------------------------------
# GPU: kernels vs the float64 references
# ---------------------------------------------------------------------------------------------

gpu = pytest.mark.gpu


@pytest.fixture
def cuda_ext():
    if not extension_available():
        pytest.skip(f"gka_kernels._C not built: {extension_error()}")
    return load_extension()


GDN_LAYOUTS = {  # H, Hq, HKV, K, V
    "mha-k128-v128": (4, 4, 4, 128, 128),
    "gqa-k64-v100": (8, 8, 2, 64, 100),
    "grouped-q-k100-v64": (8, 4, 2, 100, 64),
}


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tn", [1, 4])
@pytest.mark.parametrize("layout", sorted(GDN_LAYOUTS))
@pytest.mark.parametrize("dst_mode", ["inplace", "separate"])
def test_gdn_decode_matches_reference(cuda_ext, dtype, Tn, layout, dst_mode):
    check_gdn(gdn_decode, "cuda", dtype=dtype, Tn=Tn, layout=GDN_LAYOUTS[layout], dst_mode=dst_mode,
              seed=Tn + GDN_LAYOUTS[layout][3])


@gpu
def test_gdn_decode_without_l2norm_and_custom_scale(cuda_ext):
    check_gdn(gdn_decode, "cuda", dtype=torch.float32, Tn=3, layout=(4, 4, 4, 64, 64), dst_mode="inplace",
              l2norm=False, scale=0.3, seed=3)


@gpu
def test_gdn_decode_strided_views_and_cuda_graph(cuda_ext):
    """q, k, v as head slices of one projection output (no copies) give the same bits as
    contiguous inputs, and a captured graph replays to the eager result."""
    B, Tn, H, K = BATCH, 2, 4, 128
    proj = torch.randn(B, Tn, H, 3 * K, device="cuda", dtype=torch.bfloat16)
    q, k, v = proj[..., :K], proj[..., K:2 * K], proj[..., 2 * K:]
    g = torch.log(torch.empty(B, Tn, H, device="cuda").uniform_(0.5, 0.99))
    beta = torch.rand(B, Tn, H, device="cuda")
    pool = torch.randn(SLOTS, H, K, K, device="cuda")
    src, dst = _indices("separate", "cuda")
    ref_pool = pool.clone()
    o_ref = gdn_decode(q.contiguous(), k.contiguous(), v.contiguous(), g, beta, ref_pool, src, dst)
    o = gdn_decode(q, k, v, g, beta, pool, src, dst)
    assert torch.equal(o, o_ref) and torch.equal(pool, ref_pool)

    def step(pools, out):
        return gdn_decode(q, k, v, g, beta, pools[0], src, dst, out=out)

    _graph_equals_eager(step, [ref_pool])


MAMBA_LAYOUTS = {  # H, Hx, GB, GC, P, N, D per P, z, dt_limit
    "p64-n128-z": (8, 8, 2, 2, 64, 128, False, True, (0.0, math.inf)),
    "grouped-x-p100-n64-clamp": (8, 2, 2, 8, 100, 64, True, False, (0.02, 0.4)),
    "p32-n256": (4, 4, 1, 1, 32, 256, False, True, (0.0, math.inf)),
}


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tn", [1, 4])
@pytest.mark.parametrize("layout", sorted(MAMBA_LAYOUTS))
@pytest.mark.parametrize("dst_mode", ["inplace", "separate"])
def test_mamba2_decode_matches_reference(cuda_ext, dtype, Tn, layout, dst_mode):
    check_mamba2(mamba2_decode, "cuda", dtype=dtype, Tn=Tn, layout=MAMBA_LAYOUTS[layout], dst_mode=dst_mode,
                 seed=Tn + MAMBA_LAYOUTS[layout][4])


@gpu
def test_mamba2_decode_single_token_form_views_and_cuda_graph(cuda_ext):
    """The selective_state_update form (no token dim) equals the 4-d form bit for bit, inputs may be
    column slices of one in_proj output (attention-compatible split), and graph replay equals eager."""
    B, H, Hx, G, P, N = BATCH, 8, 2, 2, 64, 128
    widths = [H * P, Hx * P, G * N, H * N, H]  # z, x, B, C, dt
    proj = torch.randn(B, 1, sum(widths), device="cuda", dtype=torch.bfloat16)
    z, x, Bm, Cm, dt = torch.split(proj, widths, dim=-1)
    z, x, Bm, Cm = z.unflatten(-1, (H, P)), x.unflatten(-1, (Hx, P)), Bm.unflatten(-1, (G, N)), Cm.unflatten(-1, (H, N))
    A = -torch.rand(H, device="cuda") - 0.5
    D = torch.randn(H, device="cuda")
    dt_bias = torch.randn(H, device="cuda") * 0.1
    pool = torch.randn(SLOTS, H, P, N, device="cuda")
    src, _ = _indices("inplace", "cuda")
    pool4 = pool.clone()
    y4 = mamba2_decode(pool4, x.contiguous(), dt.contiguous(), A, Bm.contiguous(), Cm.contiguous(), src,
                       D=D, z=z.contiguous(), dt_bias=dt_bias, dt_softplus=True)
    y3 = mamba2_decode(pool, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], src, D=D, z=z[:, 0], dt_bias=dt_bias,
                       dt_softplus=True)
    assert y3.shape == (B, H, P)
    assert torch.equal(y3, y4[:, 0]) and torch.equal(pool, pool4)

    def step(pools, out):
        return mamba2_decode(pools[0], x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], src, D=D, z=z[:, 0],
                             dt_bias=dt_bias, dt_softplus=True, out=out)

    _graph_equals_eager(step, [pool4])


@gpu
@pytest.mark.parametrize("gate_dtype", [torch.bfloat16, torch.float16])
def test_half_precision_gates(cuda_ext, gate_dtype):
    """16-bit per-head scalars on the GPU, every mixer, one and four tokens."""
    for Tn in (1, 4):
        check_gdn(gdn_decode, "cuda", dtype=torch.bfloat16, Tn=Tn, layout=GDN_LAYOUTS["mha-k128-v128"],
                  dst_mode="separate", gate_dtype=gate_dtype)
        check_mamba2(mamba2_decode, "cuda", dtype=torch.bfloat16, Tn=Tn, layout=MAMBA_LAYOUTS["p64-n128-z"],
                     dst_mode="inplace", gate_dtype=gate_dtype)
        check_gka(gka_decode, "cuda", dtype=torch.bfloat16, Tn=Tn, layout=(4, 4, 2, 128, 128), dst_mode="separate",
                  num_iter=10, gate_dtype=gate_dtype)


@gpu
@pytest.mark.parametrize("tiles", ["wide", "narrow"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_tile_settings(cuda_ext, monkeypatch, tiles, dtype):
    """Both tile widths of the GDN and Mamba-2 steps against the references, every layout, 1 and 4
    tokens, in place."""
    monkeypatch.setenv("GKA_KERNELS_DECODE_TILES", tiles)
    for Tn in (1, 4):
        for layout in GDN_LAYOUTS.values():
            check_gdn(gdn_decode, "cuda", dtype=dtype, Tn=Tn, layout=layout, dst_mode="inplace", seed=Tn + layout[3])
        for layout in MAMBA_LAYOUTS.values():
            check_mamba2(mamba2_decode, "cuda", dtype=dtype, Tn=Tn, layout=layout, dst_mode="inplace",
                         seed=Tn + layout[4])


GKA_CASES = [  # Tn, (H, Hq, HKV, K, V)
    pytest.param(1, (4, 4, 4, 128, 128), id="t1-mha-k128"),
    pytest.param(4, (4, 4, 4, 128, 128), id="t4-mha-k128"),
    pytest.param(4, (8, 4, 2, 64, 100), id="t4-grouped-k64-v100"),
]


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_iter", [1, 10, 30])
@pytest.mark.parametrize("Tn,layout", GKA_CASES)
@pytest.mark.parametrize("dst_mode", ["inplace", "separate"])
def test_gka_decode_matches_reference(cuda_ext, dtype, num_iter, Tn, layout, dst_mode):
    check_gka(gka_decode, "cuda", dtype=dtype, Tn=Tn, layout=layout, dst_mode=dst_mode, num_iter=num_iter,
              seed=num_iter + Tn)


@gpu
@pytest.mark.parametrize("split", ["1", "2"])
@pytest.mark.parametrize("num_iter", [1, 30])
@pytest.mark.parametrize("dst_mode", ["inplace", "separate"])
def test_gka_decode_split_settings(cuda_ext, monkeypatch, split, num_iter, dst_mode):
    """Every CTAs-per-head setting against the reference (bf16, tile 128 with V below it; in place,
    a split head's H store must wait for every CTA of its cluster to have read H[src]), and a CUDA
    graph replay of the decode-1 geometry (32 heads) equal to eager."""
    monkeypatch.setenv("GKA_KERNELS_GKA_DECODE_SPLIT", split)
    check_gka(gka_decode, "cuda", dtype=torch.bfloat16, Tn=3, layout=(4, 2, 2, 100, 120), dst_mode=dst_mode,
              num_iter=num_iter, seed=11)
    inp = gka_inputs(Tn=1, H=32, Hq=32, HKV=8, K=128, V=128, dtype=torch.bfloat16, device="cuda", seed=12)
    src, dst = _indices(dst_mode, "cuda")

    def step(pools, out):
        return gka_decode(inp["q"], inp["k"], inp["v"], inp["g"], inp["alpha"], pools[0], pools[1], src, dst,
                          num_iter=num_iter, out=out)

    _graph_equals_eager(step, [inp["h_kk_pool"], inp["h_kv_pool"]])


@gpu
def test_gka_decode_alpha_none_zero_state_and_cuda_graph(cuda_ext):
    """alpha=None means alpha = 1; a sequence whose H stays 0 reads out U through the fro = 1 solve;
    graph replay equals eager."""
    check_gka(gka_decode, "cuda", dtype=torch.float32, Tn=2, layout=(4, 4, 4, 128, 128), dst_mode="separate",
              num_iter=30, with_alpha=False, zero_h=True, seed=7)
    inp = gka_inputs(Tn=2, H=4, Hq=4, HKV=4, K=128, V=128, device="cuda", seed=8)
    src, dst = _indices("separate", "cuda")

    def step(pools, out):
        return gka_decode(inp["q"], inp["k"], inp["v"], inp["g"], inp["alpha"], pools[0], pools[1], src, dst,
                          num_iter=30, out=out)

    _graph_equals_eager(step, [inp["h_kk_pool"], inp["h_kv_pool"]])
