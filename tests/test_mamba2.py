"""Mamba-2 SSD (``gka_kernels.mamba2``) against the token loop ``gka_kernels.reference.mamba2.ssd_ref``
(SPEC 4, SPEC 9 tolerances)."""

from __future__ import annotations

import math

import pytest
import torch

from gka_kernels.mamba2 import mamba_chunk_scan_combined, selective_state_update
from gka_kernels.reference.mamba2 import ssd_ref
from tests.helpers import (
    CPU_FWD, CPU_GRAD, DECODE_BF16, DECODE_FP32, GPU_FWD, GPU_GATE_GRAD, GPU_GRAD, assert_close,
)

NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
GATES = ("dt", "A", "dt_bias")


def make_inputs(Bsz, T, H, G, P, N, *, Ns=None, D="head", z=True, dt_bias=True, h0=True,
                dtype=torch.float32, device="cpu"):
    """Random SSD inputs (dict keyed like the API). dt around softplus^-1 of 0.05..1."""
    f = torch.float64 if dtype == torch.float64 else torch.float32
    inp = {
        "x": torch.randn(Bsz, T, H, P, dtype=dtype, device=device),
        "dt": (torch.rand(Bsz, T, H, dtype=f, device=device) * 3 - 3),
        "A": -(torch.rand(H, dtype=f, device=device) * 2 + 0.2),
        "B": torch.randn(Bsz, T, G, N, dtype=dtype, device=device) * N ** -0.5,
        "C": torch.randn(Bsz, T, G, N, dtype=dtype, device=device),
        "D": None, "z": None, "dt_bias": None, "initial_states": None,
    }
    if D == "head":
        inp["D"] = torch.randn(H, dtype=f, device=device)
    elif D == "channel":
        inp["D"] = torch.randn(H, P, dtype=f, device=device)
    if z:
        inp["z"] = torch.randn(Bsz, T, H, P, dtype=dtype, device=device)
    if dt_bias:
        inp["dt_bias"] = torch.rand(H, dtype=f, device=device) - 0.5
    if h0:
        inp["initial_states"] = torch.randn(Ns or Bsz, H, P, N, dtype=f, device=device) * 0.3
    return inp


def leaves(inp):
    return {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inp.items()}


def run_ours(inp, chunk_size=64, **kw):
    y, final = mamba_chunk_scan_combined(
        inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], chunk_size, D=inp["D"], z=inp["z"],
        dt_bias=inp["dt_bias"], initial_states=inp["initial_states"], return_final_states=True, **kw)
    return y, final


def run_ref(inp, **kw):
    return ssd_ref(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
                   dt_bias=inp["dt_bias"], initial_states=inp["initial_states"], **kw)


def fwd_bwd(fn, inp, dy, dfinal, **kw):
    """Outputs and gradients of <y, dy> + <final, dfinal> w.r.t. every tensor input."""
    lv = leaves(inp)
    y, final = fn(lv, **kw)
    loss = (y.double() * dy.double()).sum() + (final.double() * dfinal.double()).sum()
    names = [k for k in NAMES if lv[k] is not None]
    grads = torch.autograd.grad(loss, [lv[k] for k in names])
    return y.detach(), final.detach(), dict(zip(names, grads))


PER_TOKEN = ("x", "dt", "B", "C", "z")


def token_slice(inp, rows=slice(None), cols=slice(None)):
    """Select batch rows / token columns of the per-token inputs; parameters are kept."""
    return {k: (v[rows, cols] if v is not None and k in PER_TOKEN else v) for k, v in inp.items()}


def upcast(inp, dtype):
    return {k: (v.to(dtype) if v is not None else None) for k, v in inp.items()}


def compare(inp, fwd_tol, grad_tol, gate_tol=None, ref_dtype=torch.float64, chunk_size=64,
            **kw):
    gate_tol = grad_tol if gate_tol is None else gate_tol
    ref_kw = {k: v for k, v in kw.items() if k in ("cu_seqlens", "dt_softplus", "dt_limit")}
    gen = torch.Generator(device=inp["x"].device).manual_seed(1)
    dy = torch.randn(inp["x"].shape, generator=gen, device=inp["x"].device)
    Ns = inp["initial_states"].shape[0] if inp["initial_states"] is not None else \
        (kw["cu_seqlens"].numel() - 1 if "cu_seqlens" in kw else inp["x"].shape[0])
    H, P, N = inp["x"].shape[2], inp["x"].shape[3], inp["B"].shape[3]
    dfinal = torch.randn(Ns, H, P, N, generator=gen, device=inp["x"].device)
    y, final, grads = fwd_bwd(lambda lv, **a: run_ours(lv, chunk_size=chunk_size, **a), inp,
                              dy.to(inp["x"].dtype), dfinal, **kw)
    y_r, final_r, grads_r = fwd_bwd(run_ref, upcast(inp, ref_dtype), dy, dfinal, **ref_kw)
    assert_close("y", y, y_r, fwd_tol)
    assert_close("final_states", final, final_r, fwd_tol)
    for name in grads_r:
        assert_close(f"d{name}", grads[name], grads_r[name], gate_tol if name in GATES else grad_tol)


# ------------------------------------------------------------------ CPU (interpreter): chunked

@pytest.mark.interpreter
@pytest.mark.parametrize("Bsz,T,H,G,P,N,D,z,dt_bias,softplus,limit", [
    (2, 65, 4, 2, 16, 32, "head", True, True, True, (0.0, math.inf)),
    (1, 130, 2, 1, 24, 16, "channel", False, True, True, (0.05, 0.6)),  # clamp active both sides
    (1, 63, 2, 2, 16, 20, None, True, False, False, (0.0, math.inf)),    # raw dt, no D
    (1, 1, 4, 1, 16, 16, "head", True, True, True, (0.0, math.inf)),     # one token
])
def test_matches_reference(Bsz, T, H, G, P, N, D, z, dt_bias, softplus, limit):
    inp = make_inputs(Bsz, T, H, G, P, N, D=D, z=z, dt_bias=dt_bias)
    if not softplus:
        inp["dt"] = inp["dt"].abs() * 0.3
    compare(inp, CPU_FWD, CPU_GRAD, dt_softplus=softplus, dt_limit=limit)


@pytest.mark.interpreter
def test_varlen_per_sequence_states_and_backward():
    cu = torch.tensor([0, 1, 15, 100, 233], dtype=torch.int32)
    inp = make_inputs(1, 233, 2, 1, 16, 16, Ns=4, D="channel")
    compare(inp, CPU_FWD, CPU_GRAD, cu_seqlens=cu, dt_softplus=True)


@pytest.mark.interpreter
def test_seq_idx_packing_restarts_state():
    """seq_idx without cu_seqlens: state restarts where the id changes; initial_states seed each
    row's first sequence; final_states are each row's last state."""
    inp = make_inputs(2, 40, 2, 1, 16, 16, z=False)
    seq_idx = torch.tensor([[0] * 25 + [1] * 15, [0] * 10 + [1] * 30], dtype=torch.int32)
    y, final = run_ours(inp, seq_idx=seq_idx, dt_softplus=True)
    for b, cut in ((0, 25), (1, 10)):
        first = token_slice(inp, slice(b, b + 1), slice(0, cut))
        first["initial_states"] = inp["initial_states"][b:b + 1]
        second = token_slice(inp, slice(b, b + 1), slice(cut, None))
        second["initial_states"] = None
        y1, _ = run_ref(upcast(first, torch.float64), dt_softplus=True)
        y2, f2 = run_ref(upcast(second, torch.float64), dt_softplus=True)
        assert_close(f"y[row {b}]", y[b:b + 1], torch.cat([y1, y2], 1), CPU_FWD)
        assert_close(f"final[row {b}]", final[b:b + 1], f2, CPU_FWD)


@pytest.mark.interpreter
def test_seq_idx_consistent_with_cu_seqlens():
    inp = make_inputs(1, 30, 2, 1, 16, 16, Ns=2, z=False)
    cu = torch.tensor([0, 12, 30])
    seq_idx = torch.tensor([[0] * 12 + [1] * 18])
    y, final = run_ours(inp, cu_seqlens=cu, seq_idx=seq_idx, dt_softplus=True)
    y_r, final_r = run_ref(upcast(inp, torch.float64), cu_seqlens=cu, dt_softplus=True)
    assert_close("y", y, y_r, CPU_FWD)
    assert_close("final", final, final_r, CPU_FWD)
    with pytest.raises(ValueError, match="seq_idx"):
        run_ours(inp, cu_seqlens=cu, seq_idx=torch.tensor([[0] * 13 + [1] * 17]))


@pytest.mark.interpreter
def test_chained_calls_match_one_call():
    inp = make_inputs(1, 110, 2, 1, 16, 16, D="channel")
    cut = 70

    def chained(lv, **kw):
        a = token_slice(lv, cols=slice(0, cut))
        b = token_slice(lv, cols=slice(cut, None))
        y1, f1 = run_ours(a, **kw)
        b["initial_states"] = f1
        y2, f2 = run_ours(b, **kw)
        return torch.cat([y1, y2], 1), f2

    gen = torch.Generator().manual_seed(3)
    dy = torch.randn(inp["x"].shape, generator=gen)
    dfinal = torch.randn(inp["initial_states"].shape, generator=gen)
    y, final, grads = fwd_bwd(chained, inp, dy, dfinal, dt_softplus=True)
    y_r, final_r, grads_r = fwd_bwd(run_ref, upcast(inp, torch.float64), dy, dfinal, dt_softplus=True)
    assert_close("y", y, y_r, CPU_FWD)
    assert_close("final", final, final_r, CPU_FWD)
    for name in grads_r:
        assert_close(f"d{name}", grads[name], grads_r[name], CPU_GRAD)


@pytest.mark.interpreter
@pytest.mark.parametrize("T,D", [(40, "channel"), (70, "head")])
def test_gradcheck(T, D):
    inp = make_inputs(1, T, 2, 1, 8, 16, D=D, dtype=torch.float64)
    names = [k for k in NAMES if inp[k] is not None]
    tensors = [inp[k].requires_grad_() for k in names]

    def f(*ts):
        a = dict(zip(names, ts))
        return mamba_chunk_scan_combined(a["x"], a["dt"], a["A"], a["B"], a["C"], 64, D=a["D"],
                                         z=a["z"], dt_bias=a["dt_bias"],
                                         initial_states=a["initial_states"], dt_softplus=True,
                                         return_final_states=True)

    assert torch.autograd.gradcheck(f, tensors, fast_mode=True)


@pytest.mark.interpreter
def test_return_conventions():
    inp = make_inputs(1, 20, 2, 1, 16, 16, Ns=2, z=False, h0=False)
    args = (inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"], 128)
    y = mamba_chunk_scan_combined(*args)
    assert isinstance(y, torch.Tensor) and y.shape == inp["x"].shape
    y2, final = mamba_chunk_scan_combined(*args, return_final_states=True)
    assert torch.equal(y, y2) and final.shape == (1, 2, 16, 16) and final.is_contiguous()
    cu = torch.tensor([0, 5, 20])
    y3, varlen = mamba_chunk_scan_combined(*args, cu_seqlens=cu, return_varlen_states=True)
    out = mamba_chunk_scan_combined(*args, cu_seqlens=cu, return_final_states=True,
                                    return_varlen_states=True)
    assert len(out) == 3 and varlen.shape == (2, 2, 16, 16)
    _, f_r = run_ref(upcast(inp, torch.float64), cu_seqlens=cu)
    assert_close("varlen_states", varlen, f_r, CPU_FWD)
    assert_close("final_states", out[1], f_r, CPU_FWD)


def test_empty_sequence():
    inp = make_inputs(1, 0, 2, 1, 16, 16)
    y, final = run_ours(inp)
    assert y.shape == (1, 0, 2, 16) and torch.equal(final, inp["initial_states"])


# ------------------------------------------------------------------ CPU (interpreter): decode

def decode_loop(inp, T, state, **kw):
    ys = []
    for t in range(T):
        ys.append(selective_state_update(
            state, inp["x"][:, t], inp["dt"][:, t], inp["A"], inp["B"][:, t], inp["C"][:, t],
            D=inp["D"], z=inp["z"][:, t] if inp["z"] is not None else None,
            dt_bias=inp["dt_bias"], dt_softplus=True, **kw))
    return torch.stack(ys, 1)


def assert_decode_loop_matches_chunked(inp, T, tol):
    """``T`` single-token decode steps from the initial states == one chunked call (outputs and states)."""
    y, final = run_ours(inp, dt_softplus=True)
    state = inp["initial_states"].clone()
    y_dec = decode_loop(inp, T, state)
    assert_close("y(decode)", y_dec, y, tol)
    assert_close("state(decode)", state, final, tol)


@pytest.mark.interpreter
@pytest.mark.parametrize("D", ["head", "channel"])
def test_decode_loop_matches_chunked_call(D):
    inp = make_inputs(2, 6, 4, 2, 16, 32, D=D)
    assert_decode_loop_matches_chunked(inp, 6, DECODE_FP32)


@pytest.mark.interpreter
def test_decode_padding_slots_untouched():
    inp = make_inputs(3, 1, 2, 1, 16, 16)
    pool = torch.randn(5, 2, 16, 16)
    before = pool.clone()
    idx = torch.tensor([3, -1, 0], dtype=torch.int32)
    y = decode_loop(inp, 1, pool, state_batch_indices=idx)
    for slot in (1, 2, 4):
        assert torch.equal(pool[slot], before[slot])
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    for row, slot in ((0, 3), (2, 0)):
        one = token_slice(inp, slice(row, row + 1))
        one["initial_states"] = before[slot:slot + 1]
        y_r, s_r = run_ref(upcast(one, torch.float64), dt_softplus=True)
        assert_close(f"y[row {row}]", y[row:row + 1], y_r, DECODE_FP32)
        assert_close(f"state[slot {slot}]", pool[slot:slot + 1], s_r, DECODE_FP32)


@pytest.mark.interpreter
def test_decode_accepts_mamba_ssm_expanded_forms():
    inp = make_inputs(2, 1, 2, 1, 16, 16, D="head")
    s1, s2 = inp["initial_states"].clone(), inp["initial_states"].clone()
    H, P, N = 2, 16, 16
    y1 = selective_state_update(s1, inp["x"][:, 0], inp["dt"][:, 0], inp["A"], inp["B"][:, 0],
                                inp["C"][:, 0], D=inp["D"], z=inp["z"][:, 0],
                                dt_bias=inp["dt_bias"], dt_softplus=True)
    y2 = selective_state_update(
        s2, inp["x"][:, 0], inp["dt"][:, 0, :, None].expand(2, H, P),
        inp["A"][:, None, None].expand(H, P, N), inp["B"][:, 0], inp["C"][:, 0],
        D=inp["D"][:, None].expand(H, P), z=inp["z"][:, 0],
        dt_bias=inp["dt_bias"][:, None].expand(H, P), dt_softplus=True)
    assert_close("y(expanded)", y2, y1, DECODE_FP32)
    assert_close("state(expanded)", s2, s1, DECODE_FP32)
    s3 = inp["initial_states"].clone()  # a genuinely per-(p, n) A
    A_full = inp["A"][:, None, None] * (1 + torch.rand(H, P, N))
    selective_state_update(s3, inp["x"][:, 0], inp["dt"][:, 0], A_full, inp["B"][:, 0],
                           inp["C"][:, 0], dt_softplus=True)
    d = torch.nn.functional.softplus(inp["dt"][:, 0].double())[:, :, None, None]
    s_r = torch.exp(d * A_full.double()) * inp["initial_states"].double() \
        + d * inp["x"][:, 0].double()[..., None] * inp["B"][:, 0].double().repeat_interleave(2, 1)[:, :, None, :]
    assert_close("state(A [H,P,N])", s3, s_r, DECODE_FP32)


# ------------------------------------------------------------------ bad input (no kernel launch)

def _chunk_args():
    inp = make_inputs(1, 8, 2, 1, 16, 16, z=True)
    return dict(x=inp["x"], dt=inp["dt"], A=inp["A"], B=inp["B"], C=inp["C"], chunk_size=64,
                D=inp["D"], z=inp["z"], dt_bias=inp["dt_bias"], initial_states=inp["initial_states"])


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(x=a["x"].to(torch.int32)), TypeError, "x"),
    (lambda a: a.update(B=a["B"].double()), TypeError, "B"),
    (lambda a: a.update(x=a["x"][0]), ValueError, "x"),
    (lambda a: a.update(B=torch.randn(1, 8, 3, 16), C=torch.randn(1, 8, 3, 16)), ValueError, "B"),
    (lambda a: a.update(C=torch.randn(1, 8, 1, 8)), ValueError, "C"),
    (lambda a: a.update(dt=torch.randn(1, 8, 3)), ValueError, "dt"),
    (lambda a: a.update(A=torch.randn(3)), ValueError, "A"),
    (lambda a: a.update(D=torch.randn(2, 3)), ValueError, "D"),
    (lambda a: a.update(z=torch.randn(1, 8, 2, 8)), ValueError, "z"),
    (lambda a: a.update(dt_bias=torch.randn(2, 16)), ValueError, "dt_bias"),
    (lambda a: a.update(initial_states=torch.randn(1, 2, 16, 8)), ValueError, "initial_states"),
    (lambda a: a.update(chunk_size=100), ValueError, "chunk_size"),
    (lambda a: a.update(chunk_size=64.0), TypeError, "chunk_size"),
    (lambda a: a.update(dt_limit=(1.0, 0.5)), ValueError, "dt_limit"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 9])), ValueError, "cu_seqlens"),
    (lambda a: a.update(seq_idx=torch.zeros(1, 7, dtype=torch.int32)), ValueError, "seq_idx"),
    (lambda a: a.update(seq_idx=torch.zeros(1, 8)), TypeError, "seq_idx"),
    (lambda a: a.update(return_varlen_states=True), ValueError, "return_varlen_states"),
    (lambda a: a.update(x=torch.randn(1, 8, 2, 300), z=None), ValueError, "x"),
])
def test_bad_input_chunked(mutate, exc, match):
    args = _chunk_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        mamba_chunk_scan_combined(**args)


def _decode_args():
    inp = make_inputs(2, 1, 2, 1, 16, 16)
    return dict(state=inp["initial_states"].clone(), x=inp["x"][:, 0], dt=inp["dt"][:, 0],
                A=inp["A"], B=inp["B"][:, 0], C=inp["C"][:, 0], D=inp["D"], z=inp["z"][:, 0],
                dt_bias=inp["dt_bias"])


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(state=a["state"].to(torch.float16)), TypeError, "state"),
    (lambda a: a.update(state=a["state"].transpose(-1, -2)), ValueError, "state"),
    (lambda a: a.update(state=torch.randn(3, 2, 16, 16)), ValueError, "state"),
    (lambda a: a.update(state=torch.randn(2, 2, 16, 8)), ValueError, "state"),
    (lambda a: a.update(x=a["x"].to(torch.int64)), TypeError, "x"),
    (lambda a: a.update(B=torch.randn(2, 3, 16), C=torch.randn(2, 3, 16)), ValueError, "B"),
    (lambda a: a.update(dt=torch.randn(2, 3)), ValueError, "dt"),
    (lambda a: a.update(A=torch.randn(2, 16)), ValueError, "A"),
    (lambda a: a.update(D=torch.randn(3)), ValueError, "D"),
    (lambda a: a.update(dt_bias=torch.randn(2, 16, 16)), ValueError, "dt_bias"),
    (lambda a: a.update(z=torch.randn(2, 2, 8)), ValueError, "z"),
    (lambda a: a.update(state_batch_indices=torch.tensor([0, 2])), ValueError, "state_batch_indices"),
    (lambda a: a.update(state_batch_indices=torch.tensor([0, -2])), ValueError, "state_batch_indices"),
    (lambda a: a.update(state_batch_indices=torch.tensor([0.0, 1.0])), TypeError,
     "state_batch_indices"),
    (lambda a: a.update(state_batch_indices=torch.tensor([0])), ValueError, "state_batch_indices"),
])
def test_bad_input_decode(mutate, exc, match):
    args = _decode_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        selective_state_update(**args)


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [64, 128, 256])
def test_gpu_low_precision_vs_fp32_reference(dtype, chunk_size):
    inp = make_inputs(2, 700, 8, 2, 64, 128, dtype=dtype, device="cuda", D="channel")
    compare(inp, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD, ref_dtype=torch.float32, chunk_size=chunk_size,
            dt_softplus=True, dt_limit=(0.0, 0.5))


@pytest.mark.gpu
def test_gpu_reference_shape_bf16():
    """P = N = 128, H / G = 4, no z, per-head D (the attention-converted layer's form)."""
    inp = make_inputs(1, 1000, 8, 2, 128, 128, dtype=torch.bfloat16, device="cuda", z=False)
    compare(inp, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD, ref_dtype=torch.float32, chunk_size=256,
            dt_softplus=True)


@pytest.mark.gpu
def test_gpu_varlen_bf16():
    cu = torch.tensor([0, 1, 15, 100, 233, 900], dtype=torch.int32, device="cuda")
    inp = make_inputs(1, 900, 4, 1, 64, 64, Ns=5, dtype=torch.bfloat16, device="cuda")
    compare(inp, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD, ref_dtype=torch.float32, cu_seqlens=cu,
            dt_softplus=True)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_deterministic():
    inp = make_inputs(2, 4096, 32, 8, 128, 128, dtype=torch.bfloat16, device="cuda")
    dy = torch.randn(inp["x"].shape, device="cuda", dtype=torch.bfloat16)
    dfinal = torch.randn(inp["initial_states"].shape, device="cuda")
    first = fwd_bwd(lambda lv, **a: run_ours(lv, chunk_size=256, **a), inp, dy, dfinal, dt_softplus=True)
    second = fwd_bwd(lambda lv, **a: run_ours(lv, chunk_size=256, **a), inp, dy, dfinal, dt_softplus=True)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for name in first[2]:
        assert torch.equal(first[2][name], second[2][name]), name


@pytest.mark.gpu
def test_gpu_decode_loop_matches_chunked_call_bf16():
    inp = make_inputs(4, 16, 32, 8, 128, 128, dtype=torch.bfloat16, device="cuda")
    assert_decode_loop_matches_chunked(inp, 16, DECODE_BF16)


@pytest.mark.gpu
def test_gpu_decode_pool_bf16_vs_fp32_reference():
    Bn, H, G, P, N = 64, 32, 8, 128, 128
    inp = make_inputs(Bn, 1, H, G, P, N, dtype=torch.bfloat16, device="cuda")
    pool = torch.randn(Bn + 8, H, P, N, device="cuda") * 0.3
    before = pool.clone()
    idx = torch.randperm(Bn + 8, device="cuda")[:Bn].to(torch.int32)
    idx[::7] = -1
    y = decode_loop(inp, 1, pool, state_batch_indices=idx)[:, 0]
    live = idx >= 0
    one = token_slice(inp, live)
    one["initial_states"] = before[idx[live].long()]
    y_r, s_r = run_ref(upcast(one, torch.float32), dt_softplus=True)
    assert_close("y", y[live], y_r[:, 0], GPU_FWD)
    assert_close("state", pool[idx[live].long()], s_r, GPU_FWD)
    untouched = torch.ones(Bn + 8, dtype=torch.bool, device="cuda")
    untouched[idx[live].long()] = False
    assert torch.equal(pool[untouched], before[untouched])
    assert torch.equal(y[~live], torch.zeros_like(y[~live]))


@pytest.mark.gpu
def test_gpu_offsets_beyond_2_31():
    """x with more than 2^31 elements (B=1, T*H*P > 2^31): the tail computed in one call equals
    the reference continued from the state the kernels reach below 2^31 elements."""
    H, P, G, N = 32, 256, 1, 16
    T_head = (2 ** 31) // (H * P)          # the first T_head tokens stay below 2^31 elements
    T = T_head + 300
    need = T * H * P * 2 * 3 + T * H * N * P * 2 // 64 * 2  # x, y, z-free + chunk states
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.5:
        pytest.skip(f"needs ~{need * 1.5 / 2**30:.1f} GiB free GPU memory, have {free / 2**30:.1f}")
    torch.manual_seed(0)
    x = torch.randn(1, T, H, P, device="cuda", dtype=torch.bfloat16)
    dt = torch.rand(1, T, H, device="cuda") * 3 - 3
    A = -(torch.rand(H, device="cuda") + 0.2)
    Bm = torch.randn(1, T, G, N, device="cuda", dtype=torch.bfloat16) * N ** -0.5
    Cm = torch.randn(1, T, G, N, device="cuda", dtype=torch.bfloat16)
    D = torch.randn(H, device="cuda")
    with torch.no_grad():
        y, final = mamba_chunk_scan_combined(x, dt, A, Bm, Cm, 256, D=D, dt_softplus=True,
                                             return_final_states=True)
        assert x.numel() > 2 ** 31
        cut = T_head - 100
        _, s_cut = mamba_chunk_scan_combined(x[:, :cut], dt[:, :cut], A, Bm[:, :cut], Cm[:, :cut],
                                             256, D=D, dt_softplus=True, return_final_states=True)
        y_r, final_r = ssd_ref(x[:, cut:].float(), dt[:, cut:], A, Bm[:, cut:].float(),
                               Cm[:, cut:].float(), D=D, initial_states=s_cut, dt_softplus=True)
    assert_close("y tail", y[:, cut:], y_r, GPU_FWD)
    assert_close("final", final, final_r, GPU_FWD)
