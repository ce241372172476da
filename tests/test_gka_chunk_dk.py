"""``chunk_gka_bwd_dk`` at head dim 128, where the kernel splits the output columns and the chunk
states into several [64, 64] blocks (the op-level tests run head dim <= 32: one block), against a
float64 loop over the per-token formula of :mod:`gka_kernels.gka.chunk_dk`."""

from __future__ import annotations

import pytest
import torch

from gka_kernels.common.varlen import prepare_chunk_indices
from gka_kernels.gka._common import CHUNK
from gka_kernels.gka.chunk_dk import chunk_gka_bwd_dk
from tests.helpers import CPU_GRAD, assert_close


def dk_reference(k, x, dqs, gcum, lam_c, beta, dgp, h, dh, starts):
    """Per-token loops over ``dk_t`` and ``dGc_t`` (module docstring of ``chunk_dk``) for one
    sequence (``B == 1``); ``starts``: first token of every chunk, ``h``/``dh`` one slot per chunk."""
    _, T, H, K = x.shape
    group = H // k.shape[2]
    dk = torch.zeros_like(x)
    dgc = torch.zeros_like(gcum)
    ends = starts[1:] + [T]
    for i_h in range(H):
        for c, (t0, t1) in enumerate(zip(starts, ends)):
            g = gcum[0, t0:t1, i_h]
            cc = lam_c[0, t0:t1, i_h]
            kk = k[0, t0:t1, i_h // group]
            xx, dq = x[0, t0:t1, i_h], dqs[0, t0:t1, i_h]
            hc, dc = h[c, i_h], dh[c, i_h]
            n = t1 - t0
            bp = torch.stack([sum(cc[s] * torch.exp(2 * (g[s] - g[m])) for s in range(m, n))
                              for m in range(n)])
            for t in range(n):
                kt = kk[t]
                v = torch.exp(g[-1] - g[t]) * (dc + dc.T) @ kt - beta[0, t0 + t, i_h] * (hc + hc.T) @ kt
                for s in range(t, n):
                    v = v - torch.exp(g[s] - g[t]) * ((kt @ xx[s]) * dq[s] + (kt @ dq[s]) * xx[s])
                for j in range(n):
                    m = max(t, j)
                    mw = torch.exp(2 * g[m] - g[t] - g[j]) * bp[m]
                    v = v - 2 * mw * (kt @ kk[j]) * kk[j]
                dk[0, t0 + t, i_h] = v
                dgc[0, t0 + t, i_h] = dgp[0, t0 + t, i_h] - 0.5 * (kt @ v)
    return dk, dgc


@pytest.mark.interpreter
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_chunk_dk_head_dim_128(varlen):
    torch.manual_seed(0)
    T, H, HKV, K = 100, 2, 1, 128
    f64 = dict(dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(1, T, HKV, K, **f64), dim=-1)
    x = torch.randn(1, T, H, K, **f64) * 3
    dqs = torch.randn(1, T, H, K, **f64)
    lam_c, beta, dgp = (torch.randn(1, T, H, **f64) for _ in range(3))
    cu_seqlens = torch.tensor([0, 70, T], dtype=torch.int32) if varlen else None
    if varlen:
        chunk_indices = prepare_chunk_indices(cu_seqlens, CHUNK)
        starts = [int(cu_seqlens[s]) + int(c) * CHUNK for s, c in chunk_indices.tolist()]
    else:
        chunk_indices = None
        starts = list(range(0, T, CHUNK))
    gk = -torch.rand(1, T, H, **f64) * 0.3
    gcum = torch.zeros_like(gk)
    for t0, t1 in zip(starts, starts[1:] + [T]):
        gcum[:, t0:t1] = gk[:, t0:t1].cumsum(1)
    a = torch.randn(len(starts), H, K, K, **f64)
    h = a @ a.transpose(-1, -2)                     # chunk-start states: symmetric
    dh = torch.randn(len(starts), H, K, K, **f64)   # their adjoints: not symmetric
    dk, dgc = chunk_gka_bwd_dk(k, x, dqs, gcum, lam_c, beta, dgp, h, dh, cu_seqlens, chunk_indices)
    dk_r, dgc_r = dk_reference(k, x, dqs, gcum, lam_c, beta, dgp, h, dh, starts)
    assert_close("dk", dk, dk_r, CPU_GRAD)
    assert_close("dgc", dgc, dgc_r, CPU_GRAD)
