"""Chunk-start states of the key covariance ``H`` (forward), one sequential pass over chunks.

    H_t = exp(gk_t) H_{t-1} + k_t k_t^T          per query head, k read from head h // (H // HKV)

With ``G`` the chunk-local cumulative sum of ``gk`` and ``G_last`` its value at the chunk's last
valid token, the state after a chunk is

    H_next = exp(G_last) H_c + sum_j exp(G_last - G_j) k_j k_j^T

``h[slot(c)]`` stores ``H_c`` (the state *before* chunk ``c``), the only ``K x K`` matrices ever
written. The recurrence accumulates in float32 registers (float64 for float64 inputs) and the
stored copies are float32/64: the solve amplifies any error of ``H_c`` by the condition number.
The decay-weighted keys enter the chunk's dot as float16 for 16-bit inputs (``solve_dot_dtype``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gka_kernels.common.aot import AotSpec, register_aot
from gka_kernels.common.triton_utils import autotune, compute_dtype
from gka_kernels.gka._common import CHUNK, dot_precision, sequence_coords, solve_dot_dtype


@autotune(
    configs=[
        triton.Config({"BKI": bki, "BKJ": bkj}, num_warps=w, num_stages=s)
        for bki, bkj in ((64, 64), (32, 64), (32, 32))
        for w in (4, 8)
        for s in (2, 3)
    ],
    key=["K", "H", "IS_VARLEN"],
)
@triton.jit
def chunk_gka_fwd_h_kernel(
    k, gcum, h, h0, ht, cu_seqlens, chunk_offsets, T, NT,
    H: tl.constexpr, HKV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
    BKI: tl.constexpr, BKJ: tl.constexpr,
    USE_H0: tl.constexpr, STORE_FINAL: tl.constexpr, IS_VARLEN: tl.constexpr,
    ACC: tl.constexpr, DT: tl.constexpr, PREC: tl.constexpr,
):
    """Grid (cdiv(K, BKI), cdiv(K, BKJ), N*H): each program owns a [BKI, BKJ] tile of one head's
    state and walks the sequence chunk by chunk: per chunk one [BKI, BT] x [BT, BKJ] dot."""
    i_i = tl.program_id(0)
    i_j = tl.program_id(1)
    i_nh = tl.program_id(2)
    i_n = i_nh // H
    i_h = i_nh % H
    i_hk = i_h // (H // HKV)
    bos, seq_len, n_chunks, boh = sequence_coords(i_n, cu_seqlens, chunk_offsets, T, NT, BT, IS_VARLEN)

    o_i = i_i * BKI + tl.arange(0, BKI)
    o_j = i_j * BKJ + tl.arange(0, BKJ)
    m_ij = (o_i[:, None] < K) & (o_j[None, :] < K)
    o_ij = o_i[:, None] * K + o_j[None, :]
    o_t = tl.arange(0, BT)

    b_h = tl.zeros([BKI, BKJ], dtype=ACC)
    if USE_H0:
        b_h += tl.load(h0 + i_nh.to(tl.int64) * K * K + o_ij, mask=m_ij, other=0).to(ACC)
    for i_t in range(n_chunks):
        tl.store(h + ((boh + i_t) * H + i_h) * K * K + o_ij, b_h.to(h.dtype.element_ty), mask=m_ij)
        rows = tl.minimum(seq_len - i_t * BT, BT)
        m_t = o_t < rows
        tok = bos + i_t * BT + o_t
        b_g = tl.load(gcum + tok * H + i_h, mask=m_t, other=0).to(ACC)
        g_last = tl.load(gcum + (bos + i_t * BT + rows - 1) * H + i_h).to(ACC)
        p_k = k + (tok * HKV + i_hk) * K
        b_ki = tl.load(p_k[:, None] + o_i[None, :], mask=m_t[:, None] & (o_i[None, :] < K), other=0).to(ACC)
        b_kj = tl.load(p_k[:, None] + o_j[None, :], mask=m_t[:, None] & (o_j[None, :] < K), other=0).to(ACC)
        b_ki = b_ki * tl.exp(g_last - b_g)[:, None]
        b_h = b_h * tl.exp(g_last) + tl.dot(tl.trans(b_ki.to(DT)), b_kj.to(DT),
                                            input_precision=PREC, out_dtype=ACC)
    if STORE_FINAL:
        tl.store(ht + i_nh.to(tl.int64) * K * K + o_ij, b_h.to(ht.dtype.element_ty), mask=m_ij)


def chunk_gka_fwd_h(
    k: torch.Tensor,
    gcum: torch.Tensor,
    num_heads: int,
    num_seqs: int,
    n_slots: int,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_offsets: torch.Tensor | None,
    state_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk-start states of ``H``.

    Args:
        k: ``[B, T, HKV, K]`` keys (contiguous).
        gcum: ``[B, T, H]`` chunk-local cumulative sum of ``gk`` (float32/64).
        num_heads: ``H``; ``num_seqs``: ``N``; ``n_slots``: ``B * NT`` or the total chunk count.
        initial_state: ``[N, H, K, K]`` or None.
        state_dtype: dtype of the stored chunk states (``_common.state_dtype``).

    Returns:
        ``h [n_slots, H, K, K]`` (state before each chunk) and the final state ``[N, H, K, K]``
        (float32, float64 for float64 inputs) or None.
    """
    B, T, HKV, K = k.shape
    H = num_heads
    NT = triton.cdiv(T, CHUNK)
    acc = compute_dtype(k.dtype)
    h = k.new_empty(n_slots, H, K, K, dtype=state_dtype)
    final_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    ht = k.new_empty(num_seqs, H, K, K, dtype=final_dtype) if output_final_state else None
    def grid(meta):
        return (triton.cdiv(K, meta["BKI"]), triton.cdiv(K, meta["BKJ"]), num_seqs * H)
    chunk_gka_fwd_h_kernel[grid](
        k, gcum, h, initial_state, ht, cu_seqlens, chunk_offsets, T, NT,
        H=H, HKV=HKV, K=K, BT=CHUNK,
        USE_H0=initial_state is not None, STORE_FINAL=output_final_state,
        IS_VARLEN=cu_seqlens is not None, ACC=acc, DT=solve_dot_dtype(k.dtype),
        PREC=dot_precision(k.dtype),
    )
    return h, ht


register_aot(AotSpec(
    name="gka.chunk_fwd_h[bf16,k128,varlen]",
    kernel=chunk_gka_fwd_h_kernel,
    types={"k": "*bf16", "gcum": "*fp32", "h": "*fp32", "h0": "*fp32", "ht": "*fp32",
           "cu_seqlens": "*i32", "chunk_offsets": "*i64", "T": "i32", "NT": "i32"},
    constexprs={"H": 32, "HKV": 8, "K": 128, "BT": CHUNK, "BKI": 64, "BKJ": 64, "USE_H0": True,
                "STORE_FINAL": True, "IS_VARLEN": True, "ACC": tl.float32, "DT": tl.float16, "PREC": "ieee"},
    num_warps=4, num_stages=2,
))
