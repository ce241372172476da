"""The backward's chunk-parallel kernels (``chunk_gka_bwd_ds``, ``chunk_gka_bwd_dk``) and reverse
scan (``chunk_gka_bwd_dh``) at head dim 128, where all three split the state / output columns into
several blocks (the op-level tests run head dim <= 32: one block), against float64 loops over the
chunk recurrence of the adjoint ``D`` and the per-token formula of :mod:`gka_kernels.gka.chunk_dk`."""

from __future__ import annotations

import pytest
import torch

from gka_kernels.common.varlen import prepare_chunk_indices, prepare_chunk_offsets
from gka_kernels.gka._common import CHUNK
from gka_kernels.gka.chunk_dh import chunk_gka_bwd_dh, chunk_gka_bwd_ds
from gka_kernels.gka.chunk_dk import chunk_gka_bwd_dk
from gka_kernels.gka.chunk_h import ChunkStates
from tests.helpers import CPU_GRAD, assert_close


def adjoint_reference(k, x, dqs, gcum, lam_c, beta, h, dht, seqs):
    """``D_c`` (the adjoint of ``H`` after chunk ``c``, one per chunk slot) and ``D_0`` per sequence,
    by the chunk recurrence ``D_{c-1} = exp(G_last) D_c - (exp(G) dQs)^T X - b0 H_c - (beta K)^T K``
    (module docstring of ``chunk_dh``). ``seqs``: per sequence, the chunk slots ``(slot, t0, t1)``."""
    H, K = x.shape[2], x.shape[3]
    group = H // k.shape[2]
    dh = torch.zeros(h.shape, dtype=x.dtype)
    dh0 = torch.zeros(len(seqs), H, K, K, dtype=x.dtype)
    for n, chunks in enumerate(seqs):
        for i_h in range(H):
            d = dht[n, i_h].clone()
            for slot, t0, t1 in reversed(chunks):
                dh[slot, i_h] = d
                g = gcum[0, t0:t1, i_h]
                kk = k[0, t0:t1, i_h // group]
                b0 = (lam_c[0, t0:t1, i_h] * torch.exp(2 * g)).sum()
                d = (torch.exp(g[-1]) * d - (torch.exp(g)[:, None] * dqs[0, t0:t1, i_h]).T @ x[0, t0:t1, i_h]
                     - b0 * h[slot, i_h] - (beta[0, t0:t1, i_h, None] * kk).T @ kk)
            dh0[n, i_h] = d
    return dh, dh0


def dk_reference(k, x, dqs, gcum, lam_c, beta, dgp, h, dh, chunks):
    """Per-token loops over ``dk_t`` and ``dGc_t`` (module docstring of ``chunk_dk``);
    ``chunks``: ``(slot, t0, t1)`` of every chunk, ``h``/``dh`` one state per slot."""
    H = x.shape[2]
    group = H // k.shape[2]
    dk = torch.zeros_like(x)
    dgc = torch.zeros_like(gcum)
    for i_h in range(H):
        for c, t0, t1 in chunks:
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
def test_state_pass_and_dk_head_dim_128(varlen):
    torch.manual_seed(0)
    T, H, HKV, K = 150, 2, 1, 128
    f64 = dict(dtype=torch.float64)
    k = torch.nn.functional.normalize(torch.randn(1, T, HKV, K, **f64), dim=-1)
    x = torch.randn(1, T, H, K, **f64) * 3
    dqs = torch.randn(1, T, H, K, **f64)
    lam_c, beta, dgp = (torch.randn(1, T, H, **f64) for _ in range(3))
    if varlen:
        cu_seqlens = torch.tensor([0, 70, T], dtype=torch.int32)
        chunk_indices = prepare_chunk_indices(cu_seqlens, CHUNK)
        chunk_offsets = prepare_chunk_offsets(cu_seqlens, CHUNK)
        bounds = [(0, 70), (70, T)]
    else:
        cu_seqlens = chunk_indices = chunk_offsets = None
        bounds = [(0, T)]
    chunks, seqs = [], []
    for bos, eos in bounds:
        seqs.append([(len(chunks) + i, t0, min(t0 + CHUNK, eos))
                     for i, t0 in enumerate(range(bos, eos, CHUNK))])
        chunks += seqs[-1]
    gk = -torch.rand(1, T, H, **f64) * 0.3
    gcum = torch.zeros_like(gk)
    for _, t0, t1 in chunks:
        gcum[:, t0:t1] = gk[:, t0:t1].cumsum(1)
    a = torch.randn(len(chunks), H, K, K, **f64)
    h = a @ a.transpose(-1, -2) / K                  # chunk-start states: symmetric
    dht = torch.randn(len(seqs), H, K, K, **f64)     # gradient of the final state: not symmetric

    # Stored as chunk_gka_fwd_h does: h / s with a scale per chunk and head (here >= max |h|).
    scale = h.abs().amax((-2, -1)) * (1 + torch.rand(len(chunks), H, **f64))
    states = ChunkStates(h / scale[..., None, None], scale)
    ds, dw = chunk_gka_bwd_ds(k, x, dqs, gcum, lam_c, beta, states, True, cu_seqlens, chunk_indices)
    dk, dgc = chunk_gka_bwd_dk(k, x, dqs, gcum, lam_c, beta, states, dgp, cu_seqlens, chunk_indices)
    dh0, dgc_later = chunk_gka_bwd_dh(k, gcum, ds, dw, dk, dgc, dht, len(seqs), cu_seqlens, chunk_offsets)
    dgc = dgc + dgc_later.sum(0)
    dh_r, dh0_r = adjoint_reference(k, x, dqs, gcum, lam_c, beta, h, dht, seqs)
    dk_r, dgc_r = dk_reference(k, x, dqs, gcum, lam_c, beta, dgp, h, dh_r, chunks)
    assert_close("dk", dk, dk_r, CPU_GRAD)
    assert_close("dgc", dgc, dgc_r, CPU_GRAD)
    assert_close("dh0", dh0, dh0_r, CPU_GRAD)
