"""Gated DeltaNet (SPEC 3): chunked and fused-recurrent Triton kernels against the float64
token-by-token reference, gradcheck, state chaining, decode, varlen, bad inputs and NaN inputs.

CPU tests run the kernels under the Triton interpreter in float32 (float64 for gradcheck) with
small chunks (16/32) to stay fast, plus one case with the GPU chunk size 64. GPU tests
(``pytest -m gpu``) run bf16/fp16 at realistic shapes against the reference in float32.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gka_kernels.gdn import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule
from gka_kernels.reference.gdn import gated_delta_rule_ref
from tests.helpers import (CPU_FWD, CPU_GRAD, DECODE_BF16, DECODE_FP32, GPU_FWD, GPU_GATE_GRAD, GPU_GRAD,
                           assert_close, rel_err)


def make_inputs(B, T, H, HKV, K, V, *, dtype=torch.float32, device="cpu", decay=(1e-3, 1 - 1e-4),
                normalize_keys=True, state=True, N=None, gate_dtype=torch.float32):
    """Random inputs; decay factors ``exp(g)`` uniform in ``decay``; keys unit-norm unless the
    kernel normalizes them (otherwise the delta rule with beta ~ 1 is unstable)."""
    gen = torch.Generator().manual_seed(1234 + T + 7 * K + 3 * V + H)
    q = torch.randn(B, T, H, K, generator=gen)
    k = torch.randn(B, T, HKV, K, generator=gen)
    if normalize_keys:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    v = torch.randn(B, T, HKV, V, generator=gen)
    lo, hi = decay
    g = torch.log(lo + (hi - lo) * torch.rand(B, T, H, generator=gen))
    beta = torch.rand(B, T, H, generator=gen)
    h0 = torch.randn(N or B, H, K, V, generator=gen) if state else None
    cast = [x.to(device=device, dtype=dtype) for x in (q, k, v)]
    gates = [x.to(device=device, dtype=gate_dtype) for x in (g, beta)]
    h0 = h0.to(device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32) if state else None
    return (*cast, *gates, h0)


def run(fn, inputs, *, grads, seed=0, **kwargs):
    """Call ``fn`` on leaf copies of ``inputs``; with ``grads``, backpropagate random cotangents of
    the output and the final state. Returns ``(o, final_state, [grads of q, k, v, g, beta, h0])``."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(grads) for x in inputs]
    q, k, v, g, beta, h0 = leaves
    o, ht = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs)
    if not grads:
        return o.detach(), ht.detach(), None
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=gen).to(o.device, torch.float32)
    dht = torch.randn(ht.shape, generator=gen).to(ht.device, torch.float32)
    ((o.float() * do).sum() + (ht.float() * dht).sum()).backward()
    return o.detach(), ht.detach(), [None if x is None else x.grad for x in leaves]


def reference(inputs, *, grads, dtype=torch.float64, use_qk_l2norm_in_kernel=False, **kwargs):
    """The reference on the same values promoted to ``dtype`` (float64 on CPU)."""
    promoted = [None if x is None else x.to(dtype) for x in inputs]

    def ref(q, k, v, g, beta, **kw):
        return gated_delta_rule_ref(q, k, v, g, beta, use_qk_l2norm=use_qk_l2norm_in_kernel, **kw)

    return run(ref, promoted, grads=grads, **kwargs)


def assert_all_close(out, ref, fwd_tol, grad_tol, gate_tol=None, names="q k v g beta h0".split()):
    o, ht, gr = out
    o_r, ht_r, gr_r = ref
    assert_close("o", o, o_r, fwd_tol)
    assert_close("final_state", ht, ht_r, fwd_tol)
    if gr is None:
        return
    for name, a, b in zip(names, gr, gr_r):
        if b is None:
            continue
        tol = gate_tol if (gate_tol is not None and name in ("g", "beta")) else grad_tol
        assert_close(f"d{name}", a, b, tol)


# ----------------------------------------------------------------------------------------------
# CPU (Triton interpreter), float32 kernels vs the float64 reference
# ----------------------------------------------------------------------------------------------

@pytest.mark.interpreter
@pytest.mark.parametrize("B,T,H,HKV,K,V,chunk,l2norm,state", [
    (2, 1, 2, 1, 16, 16, 16, False, True),     # a single token
    (1, 63, 2, 2, 24, 20, 16, False, True),    # ragged tail, non-power-of-two head dims
    (1, 65, 4, 1, 16, 24, 16, True, False),    # H/HKV = 4, in-kernel L2 norm, no initial state
    (1, 40, 4, 2, 20, 16, 32, True, True),     # H/HKV = 2, chunk 32
    (1, 130, 2, 1, 16, 16, 64, False, True),   # the GPU chunk size (16-row sub-blocks), 3 chunks
])
def test_chunk_matches_reference(B, T, H, HKV, K, V, chunk, l2norm, state):
    inputs = make_inputs(B, T, H, HKV, K, V, normalize_keys=not l2norm, state=state)
    out = run(chunk_gated_delta_rule, inputs, grads=True, chunk_size=chunk, use_qk_l2norm_in_kernel=l2norm)
    ref = reference(inputs, grads=True, use_qk_l2norm_in_kernel=l2norm)
    assert out[0].dtype == torch.float32 and out[1].dtype == torch.float32
    assert_all_close(out, ref, CPU_FWD, CPU_GRAD)


@pytest.mark.interpreter
@pytest.mark.parametrize("decay", [(1e-4, 1e-2), (0.999, 0.99999)], ids=["near0", "near1"])
def test_chunk_extreme_decays(decay):
    inputs = make_inputs(1, 37, 2, 1, 16, 16, decay=decay)
    out = run(chunk_gated_delta_rule, inputs, grads=True, chunk_size=16)
    ref = reference(inputs, grads=True)
    assert_all_close(out, ref, CPU_FWD, CPU_GRAD)


@pytest.mark.interpreter
def test_chunk_varlen_matches_reference():
    cu = torch.tensor([0, 1, 15, 40, 67], dtype=torch.int32)
    inputs = make_inputs(1, 67, 2, 1, 16, 20, N=4)
    out = run(chunk_gated_delta_rule, inputs, grads=True, chunk_size=16, cu_seqlens=cu)
    ref = reference(inputs, grads=True, cu_seqlens=cu)
    assert out[1].shape == (4, 2, 16, 20)
    assert_all_close(out, ref, CPU_FWD, CPU_GRAD)


@pytest.mark.interpreter
def test_chunk_state_chaining_equals_one_call():
    """Two calls handing the state over == one call, forward and gradients (initial_state too)."""
    T, split = 50, 23
    inputs = make_inputs(1, T, 2, 1, 16, 16)
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    q, k, v, g, beta, h0 = leaves
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True, chunk_size=16)
    pieces = [x[:, :split] for x in (q, k, v, g, beta)]
    o1, h1 = chunk_gated_delta_rule(*pieces, initial_state=h0, output_final_state=True, chunk_size=16)
    pieces = [x[:, split:] for x in (q, k, v, g, beta)]
    o2, h2 = chunk_gated_delta_rule(*pieces, initial_state=h1, output_final_state=True, chunk_size=16)
    assert_close("o", torch.cat([o1, o2], 1), o, CPU_FWD)
    assert_close("final_state", h2, ht, CPU_FWD)
    gen = torch.Generator().manual_seed(5)
    do, dht = torch.randn(o.shape, generator=gen), torch.randn(ht.shape, generator=gen)
    one = torch.autograd.grad((o * do).sum() + (ht * dht).sum(), leaves)
    two = torch.autograd.grad((torch.cat([o1, o2], 1) * do).sum() + (h2 * dht).sum(), leaves)
    for name, a, b in zip("q k v g beta h0".split(), two, one):
        assert_close(f"d{name}", a, b, CPU_FWD)


@pytest.mark.interpreter
def test_gradcheck_float64():
    torch.manual_seed(0)
    q, k, v, g, beta, h0 = make_inputs(1, 20, 2, 1, 8, 8, dtype=torch.float64, normalize_keys=False,
                                       gate_dtype=torch.float64)
    args = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]

    def fn(q, k, v, g, beta, h0):
        return chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                      use_qk_l2norm_in_kernel=True, chunk_size=16)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("l2norm", [False, True])
def test_fused_recurrent_matches_reference(l2norm):
    cu = torch.tensor([0, 3, 3, 20], dtype=torch.int64)  # includes an empty sequence
    inputs = make_inputs(1, 20, 4, 2, 24, 20, N=3, normalize_keys=not l2norm)
    out = run(fused_recurrent_gated_delta_rule, inputs, grads=False, cu_seqlens=cu,
              use_qk_l2norm_in_kernel=l2norm)
    ref = reference(inputs, grads=False, cu_seqlens=cu, use_qk_l2norm_in_kernel=l2norm)
    assert_all_close(out, ref, CPU_FWD, None)
    torch.testing.assert_close(out[1][1], inputs[5][1])  # empty sequence: final == initial state


def decode_loop(q, k, v, g, beta, h0):
    """Decode token by token (fused_recurrent with T == 1, qk l2norm, the state handed over);
    returns ``(o [B, T, H, V], final state)``."""
    state, outs = h0, []
    for t in range(q.shape[1]):
        step = [x[:, t:t + 1] for x in (q, k, v, g, beta)]
        o_t, state = fused_recurrent_gated_delta_rule(*step, initial_state=state, output_final_state=True,
                                                      use_qk_l2norm_in_kernel=True)
        outs.append(o_t)
    return torch.cat(outs, 1), state


@pytest.mark.interpreter
def test_decode_loop_matches_chunked_call():
    """Decoding token by token (T == 1 with the state handed over) == one chunked call."""
    B, T, H, HKV, K, V = 2, 12, 2, 1, 16, 24
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HKV, K, V, normalize_keys=False)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True, chunk_size=16)
    o_dec, state = decode_loop(q, k, v, g, beta, h0)
    assert_close("o", o_dec, o, DECODE_FP32)
    assert_close("final_state", state, ht, DECODE_FP32)


@pytest.mark.interpreter
@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule],
                         ids=["chunk", "fused_recurrent"])
def test_nan_input_propagates(fn):
    q, k, v, g, beta, h0 = make_inputs(1, 40, 2, 1, 16, 16)
    v[0, 21, 0, 3] = float("nan")
    kwargs = {"chunk_size": 16} if fn is chunk_gated_delta_rule else {}
    o, ht = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kwargs)
    # value columns never mix: column 3 of the state is NaN from token 21 on, the rest is finite
    assert torch.isfinite(o[:, :16]).all()
    assert torch.isnan(o[:, 21:, :, 3]).all()
    assert torch.isfinite(o[..., :3]).all() and torch.isfinite(o[..., 4:]).all()
    assert torch.isnan(ht[..., 3]).all()
    assert torch.isfinite(ht[..., :3]).all() and torch.isfinite(ht[..., 4:]).all()


def test_empty_sequence_returns_initial_state():
    q, k, v, g, beta, h0 = make_inputs(2, 0, 2, 1, 16, 16)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert o.shape == (2, 0, 2, 16)
    torch.testing.assert_close(ht, h0)


# ----------------------------------------------------------------------------------------------
# Bad inputs (SPEC 2): the right error type, the argument named, nothing launched
# ----------------------------------------------------------------------------------------------

def _good():
    B, T, H, HKV, K, V = 2, 5, 4, 2, 16, 8
    return dict(q=torch.randn(B, T, H, K), k=torch.randn(B, T, HKV, K), v=torch.randn(B, T, HKV, V),
                g=-torch.rand(B, T, H), beta=torch.rand(B, T, H), initial_state=torch.randn(B, H, K, V))


def _varlen(**over):
    args = {name: x[:1] for name, x in _good().items()}
    args["initial_state"] = torch.randn(2, 4, 16, 8)
    args["cu_seqlens"] = torch.tensor([0, 2, 5])
    args.update(over)
    return args


BAD_INPUTS = [
    ("q rank", lambda a: a.update(q=a["q"][0]), ValueError, "q"),
    ("q int dtype", lambda a: a.update(q=a["q"].long()), TypeError, "q"),
    ("q not a tensor", lambda a: a.update(q=a["q"].tolist()), TypeError, "q"),
    ("q on meta device", lambda a: a.update(q=a["q"].to("meta")), ValueError, "q"),
    ("k dtype differs", lambda a: a.update(k=a["k"].double()), TypeError, "k"),
    ("k length differs", lambda a: a.update(k=a["k"][:, :3]), ValueError, "k"),
    ("H % HKV != 0", lambda a: a.update(k=torch.randn(2, 5, 3, 16), v=torch.randn(2, 5, 3, 8)), ValueError, "k"),
    ("v heads", lambda a: a.update(v=torch.randn(2, 5, 4, 8)), ValueError, "v"),
    ("K > 256", lambda a: a.update(q=torch.randn(2, 5, 4, 257), k=torch.randn(2, 5, 2, 257)), ValueError, "q"),
    ("V > 256", lambda a: a.update(v=torch.randn(2, 5, 2, 300)), ValueError, "v"),
    ("g shape", lambda a: a.update(g=a["g"][:, :, :2]), ValueError, "g"),
    ("beta rank", lambda a: a.update(beta=a["beta"][..., None]), ValueError, "beta"),
    ("scale type", lambda a: a.update(scale="0.1"), TypeError, "scale"),
    ("state shape", lambda a: a.update(initial_state=torch.randn(2, 4, 8, 16)), ValueError, "initial_state"),
    ("state dtype", lambda a: a.update(initial_state=a["initial_state"].double()), TypeError, "initial_state"),
    ("cu_seqlens with B != 1", lambda a: a.update(cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens"),
    ("cu_seqlens float", lambda a: a.update(_varlen(cu_seqlens=torch.tensor([0.0, 2.0, 5.0]))), TypeError,
     "cu_seqlens"),
    ("cu_seqlens start", lambda a: a.update(_varlen(cu_seqlens=torch.tensor([1, 2, 5]))), ValueError, "cu_seqlens"),
    ("cu_seqlens end", lambda a: a.update(_varlen(cu_seqlens=torch.tensor([0, 2, 4]))), ValueError, "cu_seqlens"),
    ("cu_seqlens decreasing", lambda a: a.update(_varlen(cu_seqlens=torch.tensor([0, 3, 2, 5]))), ValueError,
     "cu_seqlens"),
    ("cu_seqlens 2-D", lambda a: a.update(_varlen(cu_seqlens=torch.tensor([[0, 2, 5]]))), ValueError, "cu_seqlens"),
    ("varlen state count", lambda a: a.update(_varlen(initial_state=torch.randn(3, 4, 16, 8))), ValueError,
     "initial_state"),
]


@pytest.mark.parametrize("fn", [chunk_gated_delta_rule, fused_recurrent_gated_delta_rule],
                         ids=["chunk", "fused_recurrent"])
@pytest.mark.parametrize("case,mutate,error,name", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise(fn, case, mutate, error, name):
    args = _good()
    mutate(args)
    with pytest.raises(error, match=name):
        fn(**args)


@pytest.mark.parametrize("chunk_size", [8, 48, 128, True])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_delta_rule(**_good(), chunk_size=chunk_size)


# ----------------------------------------------------------------------------------------------
# GPU: bf16/fp16 at realistic shapes vs the float32 reference run on the GPU (SPEC 9)
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", [128, 100])
@pytest.mark.parametrize("l2norm", [True, False], ids=["l2norm", "unit_keys"])
def test_gpu_chunk_matches_reference(dtype, D, l2norm):
    inputs = make_inputs(2, 1000, 4, 2, D, D, dtype=dtype, device="cuda", normalize_keys=not l2norm)
    out = run(chunk_gated_delta_rule, inputs, grads=True, use_qk_l2norm_in_kernel=l2norm)
    ref = reference(inputs, grads=True, dtype=torch.float32, use_qk_l2norm_in_kernel=l2norm)
    assert out[0].dtype == dtype and out[1].dtype == torch.float32
    assert_all_close(out, ref, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD)


@pytest.mark.gpu
@pytest.mark.parametrize("H,HKV,D", [(4, 4, 64), (4, 1, 128), (2, 1, 256)])
def test_gpu_chunk_head_layouts(H, HKV, D):
    inputs = make_inputs(1, 300, H, HKV, D, D, dtype=torch.bfloat16, device="cuda", normalize_keys=False)
    out = run(chunk_gated_delta_rule, inputs, grads=True, use_qk_l2norm_in_kernel=True)
    ref = reference(inputs, grads=True, dtype=torch.float32, use_qk_l2norm_in_kernel=True)
    assert_all_close(out, ref, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD)


@pytest.mark.gpu
def test_gpu_chunk_varlen():
    cu = torch.tensor([0, 1, 100, 333, 600], dtype=torch.int32, device="cuda")
    inputs = make_inputs(1, 600, 4, 2, 128, 128, dtype=torch.bfloat16, device="cuda", normalize_keys=False, N=4)
    out = run(chunk_gated_delta_rule, inputs, grads=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    ref = reference(inputs, grads=True, dtype=torch.float32, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    assert_all_close(out, ref, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD)


@pytest.mark.gpu
def test_gpu_chunk_float32_inputs():
    inputs = make_inputs(2, 200, 4, 2, 128, 128, device="cuda", normalize_keys=False)
    out = run(chunk_gated_delta_rule, inputs, grads=True, use_qk_l2norm_in_kernel=True)
    ref = reference(inputs, grads=True, dtype=torch.float32, use_qk_l2norm_in_kernel=True)
    assert_all_close(out, ref, GPU_FWD, GPU_GRAD, GPU_GATE_GRAD)


@pytest.mark.gpu
def test_gpu_decode_matches_chunked():
    """64 sequences decoding 8 tokens one at a time == one chunked call (bf16)."""
    B, T, H, HKV, D = 64, 8, 4, 2, 128
    q, k, v, g, beta, h0 = make_inputs(B, T, H, HKV, D, D, dtype=torch.bfloat16, device="cuda",
                                       normalize_keys=False)
    o, ht = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True)
    o_dec, state = decode_loop(q, k, v, g, beta, h0)
    assert_close("o", o_dec, o, DECODE_BF16)
    assert_close("final_state", state, ht, DECODE_BF16)


@pytest.mark.gpu
def test_gpu_fused_recurrent_matches_reference():
    inputs = make_inputs(2, 300, 4, 2, 100, 128, dtype=torch.bfloat16, device="cuda", normalize_keys=False)
    out = run(fused_recurrent_gated_delta_rule, inputs, grads=False, use_qk_l2norm_in_kernel=True)
    ref = reference(inputs, grads=False, dtype=torch.float32, use_qk_l2norm_in_kernel=True)
    assert_all_close(out, ref, GPU_FWD, None)


@pytest.mark.gpu
def test_gpu_long_sequence_chunk_vs_fused():
    """The benchmark layout (H=32, HKV=8, D=128) at T=8192, B=1: chunked == token loop."""
    inputs = make_inputs(1, 8192, 32, 8, 128, 128, dtype=torch.bfloat16, device="cuda", normalize_keys=False)
    out = run(chunk_gated_delta_rule, inputs, grads=False, use_qk_l2norm_in_kernel=True)
    ref = run(fused_recurrent_gated_delta_rule, inputs, grads=False, use_qk_l2norm_in_kernel=True)
    assert rel_err(out[0], ref[0]) <= GPU_FWD and rel_err(out[1], ref[1]) <= GPU_FWD
    assert math.isfinite(out[0].float().abs().max().item())
