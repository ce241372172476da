"""Chunked simple GLA (``gka_kernels.gla.chunk_simple_gla``) against the float64 token loop
``gka_kernels.reference.gla.simple_gla_ref`` (SPEC 9 tolerances)."""

from __future__ import annotations

import pytest
import torch

from gka_kernels.gla import chunk_simple_gla
from gka_kernels.gla.chunk import BF16_HILO
from gka_kernels.reference.gla import simple_gla_ref
from tests.helpers import CPU_FWD, CPU_GRAD, GPU_FWD, GPU_GATE_GRAD, GPU_GRAD, assert_close


def make_inputs(B, T, HQ, HK, HV, K, V, *, N=None, decay=(0.0, 0.3), dtype=torch.float32,
                device="cpu", with_h0=True):
    """Random inputs; keys scaled by K^-0.5, log decays uniform in -[decay[0], decay[1]]."""
    H = max(HQ, HK, HV)
    q = torch.randn(B, T, HQ, K, dtype=dtype, device=device)
    k = torch.randn(B, T, HK, K, dtype=dtype, device=device) * K ** -0.5
    v = torch.randn(B, T, HV, V, dtype=dtype, device=device)
    lo, hi = decay
    g = -(lo + (hi - lo) * torch.rand(B, T, H, dtype=torch.float32, device=device))
    if dtype == torch.float64:
        g = g.double()
    h0 = torch.randn(N or B, H, K, V, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                     device=device) if with_h0 else None
    return q, k, v, g, h0


def run_and_grads(fn, q, k, v, g, h0, do, dht, **kw):
    """Forward + gradients of <o, do> + <final, dht> w.r.t. q, k, v, g (and h0)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, g)]
    h0l = h0.detach().clone().requires_grad_() if h0 is not None else None
    o, ht = fn(*leaves, initial_state=h0l, output_final_state=True, **kw)
    loss = (o.double() * do.double()).sum() + (ht.double() * dht.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([h0l] if h0l is not None else []))
    return o.detach(), ht.detach(), grads


def compare_to_ref(q, k, v, g, h0, fwd_tol, grad_tol, gate_tol=None, fp32_precision="tf32x3", **kw):
    gate_tol = grad_tol if gate_tol is None else gate_tol
    o, ht, grads = None, None, None
    torch.manual_seed(1)
    H = g.shape[2]
    do = torch.randn(*q.shape[:2], H, v.shape[-1], dtype=torch.float32, device=q.device)
    dht = torch.randn(h0.shape if h0 is not None else (q.shape[0], H, q.shape[-1], v.shape[-1]),
                      dtype=torch.float32, device=q.device)
    o, ht, grads = run_and_grads(chunk_simple_gla, q, k, v, g, h0, do.to(q.dtype), dht,
                                 fp32_precision=fp32_precision, **kw)
    ref_dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    up = [t.to(ref_dtype) if t is not None else None for t in (q, k, v, g, h0)]
    o_r, ht_r, grads_r = run_and_grads(simple_gla_ref, *up, do, dht, **kw)
    assert_close("o", o, o_r, fwd_tol)
    assert_close("final_state", ht, ht_r, fwd_tol)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_r):
        assert_close(name, a, b, gate_tol if name == "dg" else grad_tol)


# ------------------------------------------------------------------ CPU (interpreter)

@pytest.mark.interpreter
@pytest.mark.parametrize("B,T,HQ,HK,HV,K,V,decay", [
    (2, 65, 2, 2, 2, 16, 32, (0.0, 0.3)),     # T just past one chunk
    (1, 130, 4, 1, 2, 32, 16, (0.0, 0.05)),   # decays near 1, q heads > v heads > k heads
    (1, 63, 1, 2, 4, 20, 24, (0.5, 3.0)),     # non-power-of-two dims, strong decay, q shared
    (1, 1, 4, 4, 1, 16, 16, (0.0, 0.3)),      # a single token
])
def test_matches_reference(B, T, HQ, HK, HV, K, V, decay):
    q, k, v, g, h0 = make_inputs(B, T, HQ, HK, HV, K, V, decay=decay)
    compare_to_ref(q, k, v, g, h0, CPU_FWD, CPU_GRAD)


@pytest.mark.interpreter
def test_default_scale_and_no_initial_state():
    q, k, v, g, _ = make_inputs(1, 70, 2, 2, 2, 16, 16, with_h0=False)
    o, ht = chunk_simple_gla(q, k, v, g)
    assert ht is None
    o_r, _ = simple_gla_ref(q.double(), k.double(), v.double(), g.double())
    assert_close("o", o, o_r, CPU_FWD)
    o2, _ = chunk_simple_gla(q, k, v, g, scale=0.3)
    o2_r, _ = simple_gla_ref(q.double(), k.double(), v.double(), g.double(), scale=0.3)
    assert_close("o(scale=0.3)", o2, o2_r, CPU_FWD)


@pytest.mark.interpreter
def test_varlen_per_sequence_states():
    cu = torch.tensor([0, 1, 15, 15, 100, 233], dtype=torch.int32)  # includes an empty sequence
    q, k, v, g, h0 = make_inputs(1, 233, 2, 1, 2, 16, 16, N=5)
    compare_to_ref(q, k, v, g, h0, CPU_FWD, CPU_GRAD, cu_seqlens=cu)


@pytest.mark.interpreter
def test_varlen_equals_separate_calls():
    """Packed sequences give the same outputs and final states as separate batch-1 calls."""
    cu = torch.tensor([0, 70, 100], dtype=torch.int64)
    q, k, v, g, h0 = make_inputs(1, 100, 2, 2, 2, 16, 16, N=2)
    o, ht = chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for i in range(2):
        s, e = int(cu[i]), int(cu[i + 1])
        o_i, ht_i = simple_gla_ref(q[:, s:e].double(), k[:, s:e].double(), v[:, s:e].double(),
                                   g[:, s:e].double(), initial_state=h0[i:i + 1].double(),
                                   output_final_state=True)
        assert_close(f"o[seq {i}]", o[:, s:e], o_i, CPU_FWD)
        assert_close(f"final[seq {i}]", ht[i:i + 1], ht_i, CPU_FWD)


@pytest.mark.interpreter
def test_chained_calls_match_one_call():
    """Two calls with the state handed over equal one call, including gradients of h0."""
    q, k, v, g, h0 = make_inputs(1, 120, 2, 1, 1, 16, 16)
    torch.manual_seed(2)
    do = torch.randn(1, 120, 2, 16)
    dht = torch.randn_like(h0)
    cut = 70

    def chained(q, k, v, g, initial_state, output_final_state):
        o1, h1 = chunk_simple_gla(q[:, :cut], k[:, :cut], v[:, :cut], g[:, :cut],
                                  initial_state=initial_state, output_final_state=True)
        o2, h2 = chunk_simple_gla(q[:, cut:], k[:, cut:], v[:, cut:], g[:, cut:],
                                  initial_state=h1, output_final_state=output_final_state)
        return torch.cat([o1, o2], 1), h2

    o, ht, grads = run_and_grads(chained, q, k, v, g, h0, do, dht)
    o_r, ht_r, grads_r = run_and_grads(simple_gla_ref, q.double(), k.double(), v.double(),
                                       g.double(), h0.double(), do, dht)
    assert_close("o", o, o_r, CPU_FWD)
    assert_close("final_state", ht, ht_r, CPU_FWD)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_r):
        assert_close(name, a, b, CPU_GRAD)


@pytest.mark.interpreter
@pytest.mark.parametrize("T,HQ,HK,HV", [(70, 1, 2, 1), (24, 2, 1, 2)])
def test_gradcheck(T, HQ, HK, HV):
    q, k, v, g, h0 = make_inputs(1, T, HQ, HK, HV, 8, 16, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (q, k, v, g, h0)]

    def f(q, k, v, g, h0):
        return chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)

    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)


@pytest.mark.interpreter
def test_nan_propagates():
    q, k, v, g, h0 = make_inputs(1, 70, 1, 1, 1, 16, 16)
    v[0, 3, 0, 0] = float("nan")
    o, ht = chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert torch.isnan(o[0, 3:]).any(dim=-1).all()
    assert torch.isnan(ht).any()


def test_empty_sequence_returns_initial_state():
    q, k, v, g, h0 = make_inputs(1, 0, 2, 2, 2, 16, 16)
    o, ht = chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.shape == (1, 0, 2, 16)
    assert torch.equal(ht, h0)


# ------------------------------------------------------------------ bad input (no kernel launch)

def _ok():
    return make_inputs(1, 8, 2, 2, 2, 16, 16)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, "q"),
    (lambda a: a.update(k=a["k"].double()), TypeError, "k"),
    (lambda a: a.update(q=a["q"][0]), ValueError, "q"),
    (lambda a: a.update(k=a["k"][:, :4]), ValueError, "k"),
    (lambda a: a.update(v=torch.randn(1, 8, 3, 16)), ValueError, "v"),
    (lambda a: a.update(k=torch.randn(1, 8, 3, 16)), ValueError, "k"),
    (lambda a: a.update(g=torch.randn(1, 8, 3)), ValueError, "g"),
    (lambda a: a.update(g=a["g"].to(torch.int64)), TypeError, "g"),
    (lambda a: a.update(q=torch.randn(1, 8, 2, 300), k=torch.randn(1, 8, 2, 300)), ValueError, "q"),
    (lambda a: a.update(initial_state=torch.randn(1, 2, 16, 8)), ValueError, "initial_state"),
    (lambda a: a.update(initial_state=torch.randn(1, 2, 16, 16).to(torch.float16)), TypeError,
     "initial_state"),
    (lambda a: a.update(scale="x"), TypeError, "scale"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 2, 8])), ValueError, "cu_seqlens"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 7])), ValueError, "cu_seqlens"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0.0, 8.0])), TypeError, "cu_seqlens"),
])
def test_bad_input(mutate, exc, match):
    q, k, v, g, h0 = _ok()
    args = dict(q=q, k=k, v=v, g=g, initial_state=h0, scale=None, cu_seqlens=None)
    mutate(args)
    with pytest.raises(exc, match=match):
        chunk_simple_gla(**args)


def test_bad_input_fp32_precision():
    q, k, v, g, _ = make_inputs(1, 8, 2, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="fp32_precision"):
        chunk_simple_gla(q, k, v, g, fp32_precision="tf32")


@pytest.mark.interpreter
def test_bf16x3_mode_runs_exact_in_interpreter():
    """The interpreter has no bf16x3 dots: the mode falls back to exact float32 products there."""
    q, k, v, g, h0 = make_inputs(1, 70, 2, 1, 2, 16, 16)
    compare_to_ref(q, k, v, g, h0, CPU_FWD, CPU_GRAD, fp32_precision="bf16x3")


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["bf16x3", BF16_HILO])
def test_mixed_dtypes_internal_path(mode):
    """``ChunkSimpleGLAFunction`` with mixed dtypes: float32 q, k (holding bf16 values)
    and bf16 v (the upstream gradient of o arrives in bf16). o and dv come out in bf16, dq and dk in
    float32; the values match the float64 reference on the same inputs. The interpreter runs both
    modes on exact float32 products (it multiplies bf16 tiles wrongly), so this checks the
    plumbing of the split mode (which operands, dtypes, varying head counts); its bf16 rounding is
    checked by the GPU tests."""
    from gka_kernels.gla.chunk import ChunkSimpleGLAFunction

    q, k, v, g, h0 = make_inputs(1, 70, 2, 1, 2, 16, 16)
    k = k.bfloat16().float()
    v = v.bfloat16()
    fwd_tol, grad_tol = CPU_FWD, CPU_GRAD
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, h0)]
    o, ht = ChunkSimpleGLAFunction.apply(*leaves[:4], 16 ** -0.5, leaves[4], True, None, mode)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    do = torch.randn(o.shape, dtype=torch.float64)
    grads = torch.autograd.grad((o.double() * do).sum() + ht.double().sum(), leaves)
    assert [t.dtype for t in grads] == [torch.float32, torch.float32, torch.bfloat16, torch.float32,
                                        torch.float32]
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, g, h0)]
    o_r, ht_r = simple_gla_ref(*ref[:4], scale=16 ** -0.5, initial_state=ref[4], output_final_state=True)
    grads_r = torch.autograd.grad((o_r * do.to(torch.bfloat16).double()).sum() + ht_r.sum(), ref)
    # One float32 -> bf16 conversion of o and of dv. The Triton 3.7 interpreter truncates it (on the
    # GPU it rounds): relative error < 2^-7 per element.
    one_bf16_conversion = 2.0 ** -7
    assert_close("o", o, o_r, one_bf16_conversion)
    assert_close("final_state", ht, ht_r, fwd_tol)
    for name, a, b, tol in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_r,
                               (grad_tol, grad_tol, one_bf16_conversion, grad_tol, grad_tol)):
        assert_close(name, a, b, tol)


def test_bad_input_cu_seqlens_needs_batch_one():
    q, k, v, g, _ = make_inputs(2, 8, 2, 2, 2, 16, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_simple_gla(q, k, v, g, cu_seqlens=torch.tensor([0, 8]))


# ------------------------------------------------------------------ GPU

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,HQ,HK,HV,K,V", [
    (1000, 8, 2, 2, 128, 128),   # GQA readout (GKA layout)
    (333, 8, 2, 8, 64, 64),      # Mamba-2 layout: q/k grouped, v per head
    (200, 4, 4, 4, 100, 100),    # non-power-of-two head dim
    (130, 2, 1, 2, 256, 256),    # largest head dim
])
def test_gpu_low_precision_vs_fp32_reference(dtype, T, HQ, HK, HV, K, V):
    q, k, v, g, h0 = make_inputs(2, T, HQ, HK, HV, K, V, dtype=dtype, device="cuda",
                                 decay=(0.0, 0.2))
    compare_to_ref(q, k, v, g, h0, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD)


@pytest.mark.gpu
def test_gpu_varlen_bf16():
    cu = torch.tensor([0, 1, 15, 100, 233, 700], dtype=torch.int32, device="cuda")
    q, k, v, g, h0 = make_inputs(1, 700, 4, 2, 2, 128, 128, N=5, dtype=torch.bfloat16,
                                 device="cuda")
    compare_to_ref(q, k, v, g, h0, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD, cu_seqlens=cu)


@pytest.mark.gpu
@pytest.mark.parametrize("fp32_precision", ["tf32x3", "bf16x3"])
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128)])
def test_gpu_fp32_inputs(fp32_precision, K, V):
    """Both float32 dot modes against the float32 reference; a single bf16 or tf32 rounding of
    the operands would give ~1e-3 here."""
    q, k, v, g, h0 = make_inputs(2, 300, 4, 2, 2, K, V, dtype=torch.float32, device="cuda")
    compare_to_ref(q, k, v, g, h0, 1e-4, 1e-3, fp32_precision=fp32_precision)


@pytest.mark.gpu
@pytest.mark.parametrize("HQ,HK,HV", [(8, 2, 2), (4, 4, 4)])
def test_gpu_bf16_hilo_mode(HQ, HK, HV):
    """The GKA readout's internal mode (BF16_HILO): float32 q, states and scores as bf16 hi + lo,
    k, v and do (float32 storage holding bf16 values) once. Against the float32 reference at 1e-4;
    rounding q to bf16 once would give ~2e-3."""
    from gka_kernels.gla.chunk import ChunkSimpleGLAFunction

    q, k, v, g, h0 = make_inputs(2, 700, HQ, HK, HV, 128, 128, dtype=torch.float32, device="cuda")
    q = q * 20.0                                      # GKA's qm is ~20x a unit query
    k, v = k.bfloat16().float(), v.bfloat16().float()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, g, h0)]
    o, ht = ChunkSimpleGLAFunction.apply(*leaves[:4], 128 ** -0.5, leaves[4], True, None, BF16_HILO)
    do = torch.randn(o.shape, device="cuda").bfloat16().float()
    dht = torch.randn(ht.shape, device="cuda")
    grads = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)
    ref = [t.detach().clone().requires_grad_() for t in (q, k, v, g, h0)]
    o_r, ht_r = simple_gla_ref(*ref[:4], scale=128 ** -0.5, initial_state=ref[4], output_final_state=True)
    grads_r = torch.autograd.grad((o_r * do).sum() + (ht_r * dht).sum(), ref)
    assert_close("o", o, o_r, 1e-4)
    assert_close("final_state", ht, ht_r, 1e-4)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), grads, grads_r):
        assert_close(name, a, b, 1e-4)


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    q, k, v, g, h0 = make_inputs(2, 2048, 32, 8, 8, 128, 128, dtype=torch.bfloat16, device="cuda")
    do = torch.randn(2, 2048, 32, 128, device="cuda", dtype=torch.bfloat16)
    dht = torch.randn_like(h0)
    first = run_and_grads(chunk_simple_gla, q, k, v, g, h0, do, dht)[2]
    second = run_and_grads(chunk_simple_gla, q, k, v, g, h0, do, dht)[2]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
