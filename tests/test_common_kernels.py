"""Shared Triton building blocks under the interpreter, against plain PyTorch loops."""

import pytest
import torch
import triton
import triton.language as tl

from gka_kernels.common.cumsum import chunk_local_cumsum, sequence_reverse_cumsum
from gka_kernels.common.split_dot import dot_hi_lo
from gka_kernels.common.streams import beside
from gka_kernels.common.varlen import prepare_chunk_indices, prepare_chunk_offsets

pytestmark = pytest.mark.interpreter


def _chunked_cumsum_ref(g, bt, reverse):
    parts = []
    for c in g.split(bt, dim=1):
        parts.append(c.flip(1).cumsum(1).flip(1) if reverse else c.cumsum(1))
    return torch.cat(parts, 1)


@pytest.mark.parametrize("T", [1, 15, 16, 37])
@pytest.mark.parametrize("reverse", [False, True])
def test_chunk_local_cumsum(T, reverse):
    g = torch.randn(2, T, 3, dtype=torch.float64)
    out = chunk_local_cumsum(g, 16, reverse=reverse)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _chunked_cumsum_ref(g, 16, reverse), rtol=0, atol=1e-12)
    out32 = chunk_local_cumsum(g.float(), 16, reverse=reverse)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _chunked_cumsum_ref(g, 16, reverse), rtol=1e-6, atol=1e-5)


def test_chunk_local_cumsum_varlen_restarts_at_sequence_starts():
    cu = torch.tensor([0, 1, 15, 15, 40], dtype=torch.int32)
    g = torch.randn(1, 40, 2, dtype=torch.float64)
    out = chunk_local_cumsum(g, 16, cu_seqlens=cu)
    ref = torch.cat([_chunked_cumsum_ref(g[:, a:b], 16, False) for a, b in zip(cu[:-1], cu[1:]) if b > a], 1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def _sequence_reverse_cumsum_ref(x, parts, final, bounds):
    """Token loop in float64 over each sequence ``[a, b)`` of the flattened tokens."""
    total = x.double() + (parts.double().sum(0) if parts is not None else 0)
    flat = total.reshape(-1, x.shape[-1])
    out = torch.zeros_like(flat)
    for n, (a, b) in enumerate(bounds):
        running = final[n].double().clone() if final is not None else torch.zeros_like(flat[0])
        for t in range(b - 1, a - 1, -1):
            running = running + flat[t]
            out[t] = running
    return out.reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("with_parts,with_final", [(True, True), (False, False), (True, False)])
def test_sequence_reverse_cumsum(dtype, varlen, with_parts, with_final):
    """Sequences longer than one 1024-token block (the carry), a one-token and an empty sequence."""
    B, T, H = (1, 2600, 3) if varlen else (2, 1300, 3)
    cu = torch.tensor([0, 1, 1, 1500, 2600], dtype=torch.int32) if varlen else None
    if varlen:
        bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    else:
        bounds = [(b * T, (b + 1) * T) for b in range(B)]
    x = torch.randn(B, T, H, dtype=dtype)
    parts = torch.randn(4, B, T, H, dtype=dtype) if with_parts else None
    final = torch.randn(len(bounds), H, dtype=dtype) if with_final else None
    out = sequence_reverse_cumsum(x, parts, final, cu)
    assert out.dtype == dtype
    ref = _sequence_reverse_cumsum_ref(x, parts, final, bounds)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * 40)


def test_chunk_indices_and_offsets():
    cu = torch.tensor([0, 1, 15, 15, 40])
    idx = prepare_chunk_indices(cu, 16)
    assert idx.tolist() == [[0, 0], [1, 0], [3, 0], [3, 1]]
    assert prepare_chunk_offsets(cu, 16).tolist() == [0, 1, 2, 2, 4]


@triton.jit
def _dot_hi_lo_kernel(a, b, c, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, M: tl.constexpr):
    o = tl.arange(0, M)
    x = tl.load(a + o[:, None] * M + o[None, :])
    y = tl.load(b + o[:, None] * M + o[None, :])
    tl.store(c + o[:, None] * M + o[None, :], dot_hi_lo(x, y, SPLIT_A, SPLIT_B, tl.float16, tl.float32, "ieee"))


@pytest.mark.parametrize("split_a,split_b", [(False, False), (True, False), (False, True), (True, True)])
def test_dot_hi_lo(split_a, split_b):
    """``dot_hi_lo`` with fp16 parts (the interpreter multiplies fp16 tiles correctly, bf16 ones
    not): a split operand contributes ~2^-22 relative rounding instead of ~2^-11, an operand that is
    exact in fp16 contributes none."""
    torch.manual_seed(0)
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    a_exact, b_exact = a.half().float(), b.half().float()
    for x, y, exact_a, exact_b in ((a, b, False, False), (a_exact, b, True, False), (a, b_exact, False, True)):
        c = torch.empty(32, 32)
        _dot_hi_lo_kernel[(1,)](x, y, c, split_a, split_b, 32)
        err = ((c.double() - x.double() @ y.double()).norm() / (x.double() @ y.double()).norm()).item()
        fine = (split_a or exact_a) and (split_b or exact_b)
        assert (err < 2e-6) if fine else (1e-4 < err < 2e-3), (split_a, split_b, exact_a, exact_b, err)


def test_decode_autotune_keys_separate_grid_sizes():
    """The token-loop decode kernels split V into tiles; the best split depends on how many (sequence,
    head) programs there are. Their autotune keys carry grid_bucket(N * H), so a config tuned at
    batch 1 is not reused at batch 64 (the GKA Triton decode-64 took 1.32 ms instead of ~0.41 when it
    was, H200 run 66)."""
    from gka_kernels.common.triton_utils import grid_bucket
    from gka_kernels.gdn.fused_recurrent import fused_recurrent_fwd_kernel
    from gka_kernels.gka.fused_recurrent import fused_recurrent_gka_kernel

    for kernel in (fused_recurrent_gka_kernel, fused_recurrent_fwd_kernel):
        assert "nh_bucket" in kernel.keys
        assert "nh_bucket" in kernel.fn.arg_names
    assert [grid_bucket(n) for n in (0, 1, 32, 33, 2048)] == [1, 1, 32, 64, 2048]


def test_beside_runs_inline_without_cuda_tensors():
    """On the CPU ``beside`` calls the function at once, on the current stream, and ``result()``
    returns its value (the GPU tests check the two-stream path bitwise against one stream)."""
    calls = []
    x = torch.arange(3.0)
    pending = beside(lambda t, scale: calls.append(1) or t * scale, x, scale=2.0)
    assert calls == [1]
    assert torch.equal(pending.result(), x * 2)


@pytest.mark.parametrize("value", ["2", "yes", ""])
def test_beside_rejects_bad_side_stream_setting(monkeypatch, value):
    monkeypatch.setenv("GKA_KERNELS_SIDE_STREAM", value)
    with pytest.raises(ValueError, match="GKA_KERNELS_SIDE_STREAM"):
        beside(torch.neg, torch.ones(2))
