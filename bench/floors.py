"""FLOPs and bytes per op: the floor of each benchmark is max(FLOPs / matmul rate, bytes / copy rate).

Conventions (per head and token unless stated; C = chunk size, K = key dim, V = value dim):
- Chunked simple GLA forward (GKA readout, Mamba-2 SSD with K=N, V=P): intra-chunk scores 2CK,
  scores x values 2CV, query x state 2KV, state update 2KV.
- Gated DeltaNet forward adds the WY representation: k k^T 2CK, w = T k 2CK, u = T v 2CV, w S 2KV.
- GKA forward: chunk-start H states (2K^2), Frobenius-norm terms (2CK + 2K^2), num_iter Chebyshev
  iterations of 2K^2 + 4CK each, then the GLA readout.
- Backward: twice the forward for GLA/GDN/SSD (the usual ratio of a chunked linear-attention
  backward); for GKA one more full solve plus twice the H-state and readout work.
- Bytes: every input read once and every output written once (bf16 activations, fp32 gates);
  forward+backward counts 3x the forward bytes (inputs re-read, gradients written). Decode counts
  the fp32 recurrent state read and written once (the inputs are negligible).
Only matmul-shaped FLOPs are counted; the floor is a lower bound, not a prediction.
"""

from __future__ import annotations

from bench.shapes import Shape


def _gla_fwd_flops(C: int, K: int, V: int) -> int:
    return 2 * C * K + 2 * C * V + 4 * K * V


def fwd_flops_per_token_head(op: str, sh: Shape, *, chunk: int = 64, num_iter: int = 30) -> int:
    K = V = sh.head_dim
    if op in ("gla", "mamba2"):
        return _gla_fwd_flops(chunk, K, V)
    if op == "gdn":
        return _gla_fwd_flops(chunk, K, V) + 4 * chunk * K + 2 * chunk * V + 2 * K * V
    if op == "gka":
        return (2 * K * K) + (2 * chunk * K + 2 * K * K) + num_iter * (2 * K * K + 4 * chunk * K) \
            + _gla_fwd_flops(chunk, K, V)
    if op == "attention":
        return 2 * 2 * sh.tokens * K // 2  # causal: half of QK^T and PV over the context
    raise ValueError(f"unknown op {op}")


def flops(op: str, sh: Shape, mode: str, **kw) -> float:
    fwd = fwd_flops_per_token_head(op, sh, **kw) * sh.batch * sh.tokens * sh.heads
    if mode == "fwd":
        return float(fwd)
    if op == "gka":
        K, C, it = sh.head_dim, kw.get("chunk", 64), kw.get("num_iter", 30)
        solve = it * (2 * K * K + 4 * C * K) * sh.batch * sh.tokens * sh.heads
        return float(fwd + solve + 2 * (fwd - solve))
    return float(3 * fwd)


def activation_bytes(op: str, sh: Shape, mode: str, *, elem: int = 2) -> float:
    """Bytes of inputs read and outputs written (see module docstring)."""
    tok = sh.batch * sh.tokens
    H, HKV, D = sh.heads, sh.kv_heads, sh.head_dim
    if op == "mamba2":  # x (H*P), B (G*N), C (G*N), dt, z absent, y (H*P)
        per_tok = elem * (H * D + 2 * HKV * D + H * D) + 4 * H
    elif op == "attention":
        per_tok = elem * (2 * H * D + 2 * HKV * D)
    else:  # q (H), k, v (HKV), o (H); gates fp32 (g, beta or alpha)
        per_tok = elem * (2 * H * D + 2 * HKV * D) + 2 * 4 * H
    fwd = per_tok * tok
    return float(fwd if mode == "fwd" else 3 * fwd)


def state_bytes(op: str, sh: Shape) -> float:
    """fp32 recurrent state read + written once per decode step."""
    D = sh.head_dim
    elems = D * D * (2 if op == "gka" else 1)
    return float(2 * 4 * sh.batch * sh.heads * elems)


def kv_cache_bytes(sh: Shape, context: int, *, elem: int = 2) -> float:
    """bf16 keys and values of ``context`` tokens read once by an attention decode step."""
    return float(2 * elem * sh.batch * sh.kv_heads * context * sh.head_dim)


def floor_ms(op: str, sh: Shape, mode: str, ceilings: dict[str, float], **kw) -> dict[str, float]:
    """Floor time and the two terms it is the maximum of."""
    if mode == "decode" and op == "attention":
        nbytes, nflops = kv_cache_bytes(sh, kw["context"]), 0.0
    elif mode == "decode":
        nbytes, nflops = state_bytes(op, sh), 0.0
    else:
        nbytes, nflops = activation_bytes(op, sh, mode), flops(op, sh, mode, **kw)
    t_bytes = nbytes / ceilings["copy_bytes_per_s"] * 1e3
    t_flops = nflops / ceilings["bf16_flops_per_s"] * 1e3
    return {"bytes": nbytes, "flops": nflops, "floor_ms_bytes": t_bytes, "floor_ms_flops": t_flops,
            "floor_ms": max(t_bytes, t_flops)}
