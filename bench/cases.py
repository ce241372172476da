"""What the kernel suite times: (op, implementation, shape, mode) cases with input builders.

Inputs are random (never zeros): unit-norm keys, decays ``log(sigmoid(.))`` between near 0 and
near 1, bf16 activations and fp32 gates and states. Peers get the same math in their own layout;
where a peer cannot read grouped key/value heads (fla's GDN and GLA), it is given keys/values
repeated to the query heads, as a converted model would have to feed it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from bench import peers
from bench.shapes import Shape

DT = torch.bfloat16


@dataclass
class Case:
    op: str           # gdn | gla | mamba2 | gka | attention
    impl: str         # ours | ours-cuda | fla | mamba_ssm | sdpa
    shape: Shape
    mode: str         # fwd | fwdbwd | decode
    params: dict = field(default_factory=dict)
    build: Callable[[], tuple[Callable[[], object], list]] | None = None

    @property
    def name(self) -> str:
        extra = "".join(f" {k}={v}" for k, v in self.params.items())
        return f"{self.op}/{self.impl} {self.shape.name} {self.mode}{extra}"


def _rand(*shape, dtype=DT, grad=False):
    return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_(grad)


def _keys(*shape, grad=False):
    return F.normalize(torch.randn(*shape, device="cuda", dtype=torch.float32), dim=-1).to(DT).requires_grad_(grad)


def _decay(B, T, H, grad=False):
    return F.logsigmoid(torch.randn(B, T, H, device="cuda") + 3.0).requires_grad_(grad)


def _gate(B, T, H, grad=False):
    return torch.rand(B, T, H, device="cuda").requires_grad_(grad)


def _expand_heads(x: torch.Tensor, H: int) -> torch.Tensor:
    return x.repeat_interleave(H // x.shape[2], dim=2).detach().requires_grad_(x.requires_grad)


def _train_step(fn: Callable[[], object], leaves: list[torch.Tensor], mode: str):
    """Forward only, or forward + backward of the first output with a fixed random cotangent."""
    if mode == "fwd":
        return (lambda: fn()), []
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    dout = torch.randn_like(out)

    def step():
        o = fn()
        o = o[0] if isinstance(o, tuple) else o
        o.backward(dout)

    return step, leaves


# ---------------------------------------------------------------- chunked (training / prefill)

def gdn_chunk(impl: str, sh: Shape, mode: str):
    B, T, H, HKV, D = sh.batch, sh.tokens, sh.heads, sh.kv_heads, sh.head_dim
    grad = mode == "fwdbwd"
    q, k, v = _rand(B, T, H, D, grad=grad), _keys(B, T, HKV, D, grad=grad), _rand(B, T, HKV, D, grad=grad)
    g, beta = _decay(B, T, H, grad), _gate(B, T, H, grad)
    if impl == "ours":
        from gka_kernels.gdn import chunk_gated_delta_rule as f
        return _train_step(lambda: f(q, k, v, g, beta, use_qk_l2norm_in_kernel=True), [q, k, v, g, beta], mode)
    fla = peers.load_fla()
    kx, vx = _expand_heads(k, H), _expand_heads(v, H)
    return _train_step(lambda: fla.chunk_gated_delta_rule(q, kx, vx, g, beta, use_qk_l2norm_in_kernel=True),
                       [q, kx, vx, g, beta], mode)


def gla_chunk(impl: str, sh: Shape, mode: str):
    B, T, H, HKV, D = sh.batch, sh.tokens, sh.heads, sh.kv_heads, sh.head_dim
    grad = mode == "fwdbwd"
    q, k, v = _rand(B, T, H, D, grad=grad), _keys(B, T, HKV, D, grad=grad), _rand(B, T, HKV, D, grad=grad)
    g = _decay(B, T, H, grad)
    if impl == "ours":
        from gka_kernels.gla import chunk_simple_gla as f
        return _train_step(lambda: f(q, k, v, g), [q, k, v, g], mode)
    fla = peers.load_fla()
    kx, vx = _expand_heads(k, H), _expand_heads(v, H)
    return _train_step(lambda: fla.chunk_simple_gla(q, kx, vx, g), [q, kx, vx, g], mode)


def _mamba_inputs(sh: Shape, grad: bool):
    B, T, H, G, P = sh.batch, sh.tokens, sh.heads, sh.kv_heads, sh.head_dim
    x = _rand(B, T, H, P, grad=grad)
    dt = (torch.rand(B, T, H, device="cuda") * 2 - 4).requires_grad_(grad)
    A = (-torch.rand(H, device="cuda") * 4 - 0.5).requires_grad_(grad)
    Bm, Cm = _rand(B, T, G, P, grad=grad), _rand(B, T, G, P, grad=grad)
    D = torch.ones(H, device="cuda").requires_grad_(grad)
    dt_bias = (torch.rand(H, device="cuda") - 2).requires_grad_(grad)
    return x, dt, A, Bm, Cm, D, dt_bias


def mamba2_chunk(impl: str, sh: Shape, mode: str, chunk: int = 256):
    x, dt, A, Bm, Cm, D, dt_bias = _mamba_inputs(sh, mode == "fwdbwd")
    if impl == "ours":
        from gka_kernels.mamba2 import mamba_chunk_scan_combined as f
    else:
        f = peers.load_mamba().mamba_chunk_scan_combined
    return _train_step(lambda: f(x, dt, A, Bm, Cm, chunk, D=D, dt_bias=dt_bias, dt_softplus=True),
                       [x, dt, A, Bm, Cm, D, dt_bias], mode)


def gka_chunk(impl: str, sh: Shape, mode: str, num_iter: int = 30):
    B, T, H, HKV, D = sh.batch, sh.tokens, sh.heads, sh.kv_heads, sh.head_dim
    grad = mode == "fwdbwd"
    q, k, v = _keys(B, T, H, D, grad=grad), _keys(B, T, HKV, D, grad=grad), _rand(B, T, HKV, D, grad=grad)
    g, alpha = _decay(B, T, H, grad), _gate(B, T, H, grad)
    from gka_kernels.gka import chunk_gka as f
    return _train_step(lambda: f(q, k, v, g, alpha=alpha, num_iter=num_iter), [q, k, v, g, alpha], mode)


def attention(impl: str, sh: Shape, mode: str):
    B, T, H, HKV, D = sh.batch, sh.tokens, sh.heads, sh.kv_heads, sh.head_dim
    grad = mode == "fwdbwd"
    q, k, v = _rand(B, H, T, D, grad=grad), _rand(B, HKV, T, D, grad=grad), _rand(B, HKV, T, D, grad=grad)
    return _train_step(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                       [q, k, v], mode)


# ---------------------------------------------------------------- decode steps

def _slot_indices(B: int, state_indices: torch.Tensor | None, indexed: bool) -> torch.Tensor | None:
    """The CUDA kernels' pool slots: the caller's tensor (e.g. one shared by many steps) or 0..B-1;
    None (``indexed=False``) makes the kernel address the pool by batch row, with no index load."""
    if not indexed:
        return None
    return state_indices if state_indices is not None else torch.arange(B, device="cuda", dtype=torch.int32)


def gdn_decode(impl: str, sh: Shape, mode: str, state_indices: torch.Tensor | None = None, indexed: bool = True):
    B, H, HKV, D = sh.batch, sh.heads, sh.kv_heads, sh.head_dim
    q, k, v = _rand(B, 1, H, D), _keys(B, 1, HKV, D), _rand(B, 1, HKV, D)
    g, beta = _decay(B, 1, H), _gate(B, 1, H)
    state = torch.randn(B, H, D, D, device="cuda") * 0.1
    if impl == "ours":
        from gka_kernels.gdn import fused_recurrent_gated_delta_rule as f
        return (lambda: f(q, k, v, g, beta, initial_state=state, output_final_state=True,
                          use_qk_l2norm_in_kernel=True)), []
    if impl == "ours-cuda":
        from gka_kernels.cuda import gdn_decode as f
        idx = _slot_indices(B, state_indices, indexed)
        return (lambda: f(q, k, v, g, beta, state, idx, use_qk_l2norm=True)), []
    fla = peers.load_fla()
    kx, vx = _expand_heads(k, H), _expand_heads(v, H)
    return (lambda: fla.fused_recurrent_gated_delta_rule(q, kx, vx, g, beta, initial_state=state,
                                                         output_final_state=True,
                                                         use_qk_l2norm_in_kernel=True)), []


def mamba2_decode(impl: str, sh: Shape, mode: str, state_indices: torch.Tensor | None = None,
                  indexed: bool = True):
    B, H, G, P = sh.batch, sh.heads, sh.kv_heads, sh.head_dim
    x, Bm, Cm = _rand(B, H, P), _rand(B, G, P), _rand(B, G, P)
    dt = torch.rand(B, H, device="cuda") * 2 - 4
    A = -torch.rand(H, device="cuda") * 4 - 0.5
    D, dt_bias = torch.ones(H, device="cuda"), torch.rand(H, device="cuda") - 2
    state = torch.randn(B, H, P, P, device="cuda") * 0.1
    if impl == "ours":
        from gka_kernels.mamba2 import selective_state_update as f
        return (lambda: f(state, x, dt, A, Bm, Cm, D=D, dt_bias=dt_bias, dt_softplus=True)), []
    if impl == "ours-cuda":
        from gka_kernels.cuda import mamba2_decode as f
        idx = _slot_indices(B, state_indices, indexed)
        return (lambda: f(state, x, dt, A, Bm, Cm, state_indices=idx, D=D, dt_bias=dt_bias,
                          dt_softplus=True)), []
    m = peers.load_mamba()
    # mamba_ssm's per-head form: dt/dt_bias/D/A broadcast over P (and N) through stride-0 views.
    dtx = dt[:, :, None].expand(B, H, P)
    Ax = A[:, None, None].expand(H, P, P)
    Dx, biasx = D[:, None].expand(H, P), dt_bias[:, None].expand(H, P)
    return (lambda: m.selective_state_update(state, x, dtx, Ax, Bm, Cm, D=Dx, dt_bias=biasx,
                                             dt_softplus=True)), []


def gka_decode(impl: str, sh: Shape, mode: str, num_iter: int = 30, state_indices: torch.Tensor | None = None,
               indexed: bool = True):
    B, H, HKV, D = sh.batch, sh.heads, sh.kv_heads, sh.head_dim
    q, k, v = _keys(B, 1, H, D), _keys(B, 1, HKV, D), _rand(B, 1, HKV, D)
    g, alpha = _decay(B, 1, H), _gate(B, 1, H)
    kk = torch.randn(B, H, D, D, device="cuda")
    h_kk = (kk @ kk.transpose(-1, -2)) / D
    h_kv = torch.randn(B, H, D, D, device="cuda") * 0.1
    if impl == "ours":
        from gka_kernels.gka import fused_recurrent_gka as f
        return (lambda: f(q, k, v, g, alpha=alpha, num_iter=num_iter, initial_state=(h_kk, h_kv),
                          output_final_state=True)), []
    from gka_kernels.cuda import gka_decode as f
    idx = _slot_indices(B, state_indices, indexed)
    return (lambda: f(q, k, v, g, alpha, h_kk, h_kv, idx, num_iter=num_iter)), []


def attention_decode(impl: str, sh: Shape, mode: str, context: int = 8192):
    B, H, HKV, D = sh.batch, sh.heads, sh.kv_heads, sh.head_dim
    q, k, v = _rand(B, H, 1, D), _rand(B, HKV, context, D), _rand(B, HKV, context, D)
    return (lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)), []


BUILDERS = {
    ("gdn", "chunk"): gdn_chunk, ("gla", "chunk"): gla_chunk, ("mamba2", "chunk"): mamba2_chunk,
    ("gka", "chunk"): gka_chunk, ("attention", "chunk"): attention,
    ("gdn", "decode"): gdn_decode, ("mamba2", "decode"): mamba2_decode, ("gka", "decode"): gka_decode,
    ("attention", "decode"): attention_decode,
}

#: Implementations per op: ours first, then the peers (skipped when not importable).
IMPLS = {
    ("gdn", "chunk"): ["ours", "fla"], ("gla", "chunk"): ["ours", "fla"],
    ("mamba2", "chunk"): ["ours", "mamba_ssm"], ("gka", "chunk"): ["ours"],
    ("attention", "chunk"): ["sdpa"],
    ("gdn", "decode"): ["ours", "ours-cuda", "fla"], ("mamba2", "decode"): ["ours", "ours-cuda", "mamba_ssm"],
    ("gka", "decode"): ["ours", "ours-cuda"], ("attention", "decode"): ["sdpa"],
}

#: Extra parameter sweeps per op.
SWEEPS = {
    ("gka", "chunk"): [{"num_iter": 30}, {"num_iter": 10}],
    ("gka", "decode"): [{"num_iter": 30}, {"num_iter": 10}, {"num_iter": 1}],
    ("attention", "decode"): [{"context": 8192}, {"context": 32768}],
}


def peer_available(impl: str) -> bool:
    if impl == "fla":
        return peers.load_fla() is not None
    if impl == "mamba_ssm":
        return peers.load_mamba() is not None
    if impl == "ours-cuda":
        import gka_kernels
        return gka_kernels.cuda_available()
    return True


def decode_set_bytes(op: str, sh: Shape, params: dict) -> int:
    """Device memory of one decode case's state (or KV cache): what must not stay in L2."""
    from bench.floors import kv_cache_bytes, state_bytes

    if op == "attention":
        return int(kv_cache_bytes(sh, params["context"]))
    return int(state_bytes(op, sh) // 2)  # state_bytes counts the read and the write


def decode_sets(op: str, sh: Shape, params: dict) -> int:
    """Independent input and state sets a decode case cycles through: one when its state is
    larger than L2 already (decode-64), else enough for ~4x L2, so that a small step (decode-1:
    2-4 MiB of state) reads its state from DRAM as it would between the layers of a model
    (PERF.md: rotate inputs larger than L2)."""
    from bench.timing import L2_BYTES, rotation_count

    per_set = decode_set_bytes(op, sh, params)
    return 1 if per_set >= L2_BYTES else rotation_count(per_set)


def rotated_decode(builder: Callable, op: str, impl: str, sh: Shape, mode: str, params: dict):
    """The decode case of ``builder`` over ``decode_sets`` sets, one set per call in turn."""
    from bench.timing import rotating

    sets = [builder(impl, sh, mode, **params) for _ in range(decode_sets(op, sh, params))]
    return rotating([fn for fn, _ in sets]), []


def make_cases(ops: list[str], shapes: list[Shape]) -> list[Case]:
    cases = []
    for op in ops:
        for sh in shapes:
            kind = "decode" if sh.is_decode else "chunk"
            if (op, kind) not in BUILDERS:
                continue
            modes = ["decode"] if kind == "decode" else ["fwd", "fwdbwd"]
            for mode in modes:
                for params in SWEEPS.get((op, kind), [{}]):
                    for impl in IMPLS[(op, kind)]:
                        builder = BUILDERS[(op, kind)]
                        if kind == "decode":
                            build = (lambda b=builder, o=op, i=impl, s=sh, m=mode, p=dict(params):
                                     rotated_decode(b, o, i, s, m, p))
                        else:
                            build = (lambda b=builder, i=impl, s=sh, m=mode, p=dict(params): b(i, s, m, **p))
                        cases.append(Case(op, impl, sh, mode, dict(params), build=build))
    return cases
