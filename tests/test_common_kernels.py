"""Shared Triton building blocks under the interpreter, against plain PyTorch loops."""

import pytest
import torch

from gka_kernels.common.cumsum import chunk_local_cumsum
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


def test_chunk_indices_and_offsets():
    cu = torch.tensor([0, 1, 15, 15, 40])
    idx = prepare_chunk_indices(cu, 16)
    assert idx.tolist() == [[0, 0], [1, 0], [3, 0], [3, 1]]
    assert prepare_chunk_offsets(cu, 16).tolist() == [0, 1, 2, 2, 4]
