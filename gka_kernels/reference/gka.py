"""Token-by-token reference for Gated KalmaNet (SPEC section 5), written from the math:
``gka_ref`` (the whole op) and ``gka_solve_ref`` (its ridge-solve half, ``x_t``).

Per query head, two states are formed explicitly at every token:

    H_t  = exp(gk_t) H_{t-1} + k_t k_t^T                 [K, K]   ("h_kk")
    U_t  = exp(g_t)  U_{t-1} + k_t v_t^T                 [K, V]   ("h_kv")
    fro_t = ||H_t||_F  (1 where it is 0);  lam_t = ridge_ratio * fro_t
    x_t  = (H_t + lam_t I)^{-1} q_t   by Chebyshev iteration (or an exact solve)
    qm_t = q_t + alpha_t (x_t - q_t)
    o_t  = scale * U_t^T qm_t

Chebyshev iteration on the spectrum interval [mu, L] = [lam_t, lam_t + fro_t] (SPEC 5):

    rho = (L - mu) / (L + mu);  x_{-1} = 0;  x_0 = 2 q / (L + mu);  w_0 = 2
    w_i = 4 / (4 - rho^2 w_{i-1})
    x_i = x_{i-1} - (2 w_i / (L + mu)) (A x_{i-1} - q) + (w_i - 1)(x_{i-1} - x_{i-2})

Everything is plain differentiable PyTorch, so autograd gives the gradient of the truncated
iteration (``solver="chebyshev"``) or the exact gradient of the exact solve (``solver="exact"``),
including the path through ``lam_t = ridge_ratio * ||H_t||_F``. It runs in the dtype of its inputs
(float64 for the tests). Loops over tokens: for test shapes only.
"""

from __future__ import annotations

import torch

from gka_kernels.reference._common import spans


def _frobenius(h: torch.Tensor) -> torch.Tensor:
    """``||h||_F`` over the last two dims, 1 where it is 0, with a gradient that stays finite."""
    sq = (h * h).sum((-2, -1))
    return torch.sqrt(torch.where(sq > 0, sq, torch.ones_like(sq)))


def _chebyshev(h: torch.Tensor, lam: torch.Tensor, fro: torch.Tensor, rhs: torch.Tensor,
               num_iter: int) -> torch.Tensor:
    """``num_iter`` Chebyshev steps for ``(h + lam I) x = rhs``; h [H,K,K], lam/fro [H], rhs [H,K]."""
    mu = lam
    big_l = lam + fro
    rho = (big_l - mu) / (big_l + mu)
    step = 2.0 / (big_l + mu)

    def apply_a(x):
        return torch.einsum("hij,hj->hi", h, x) + lam[:, None] * x

    x_prev = torch.zeros_like(rhs)
    x = step[:, None] * rhs
    w = torch.full_like(lam, 2.0)
    for _ in range(num_iter):
        w = 4.0 / (4.0 - rho * rho * w)
        x_new = x - (step * w)[:, None] * (apply_a(x) - rhs) + (w - 1.0)[:, None] * (x - x_prev)
        x_prev, x = x, x_new
    return x


def gka_solve_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    gk: torch.Tensor,
    ridge_ratio: float = 0.02,
    num_iter: int = 30,
    solver: str = "chebyshev",
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    bp_lambda: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ridge-solve half of GKA: ``x_t = (H_t + ridge_ratio ||H_t||_F I)^{-1} q_t`` with
    ``H_t = exp(gk_t) H_{t-1} + k_t k_t^T`` formed explicitly at every token.

    Args:
        q: ``[B, T, H, K]``; k: ``[B, T, HKV, K]``; gk: ``[B, T, H]``.
        initial_state: ``h_kk [N, H, K, K]`` or None. Other arguments as in :func:`gka_ref`.

    Returns:
        ``x [B, T, H, K]`` (dtype of ``q``) and the final ``h_kk [N, H, K, K]`` or None.
    """
    if solver not in ("chebyshev", "exact"):
        raise ValueError(f"solver: expected 'chebyshev' or 'exact', got {solver!r}")
    B, T, H, K = q.shape
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    dt = q.dtype
    gk = gk.to(dt)
    eye = torch.eye(K, dtype=dt, device=q.device)
    xs, finals = [], []
    for n, (b, s, e) in enumerate(spans(B, T, cu_seqlens)):
        h_kk = initial_state[n].to(dt) if initial_state is not None else q.new_zeros(H, K, K)
        for t in range(s, e):
            kt, qt = k[b, t], q[b, t]
            h_kk = torch.exp(gk[b, t])[:, None, None] * h_kk + kt[:, :, None] * kt[:, None, :]
            fro = _frobenius(h_kk)
            if not bp_lambda:
                fro = fro.detach()
            lam = ridge_ratio * fro
            if solver == "exact":
                xs.append(torch.linalg.solve(h_kk + lam[:, None, None] * eye, qt.unsqueeze(-1)).squeeze(-1))
            else:
                xs.append(_chebyshev(h_kk, lam, fro, qt, num_iter))
        finals.append(h_kk)
    x = torch.stack(xs, 0).view(B, T, H, K) if xs else q.new_zeros(B, T, H, K)
    return x, (torch.stack(finals, 0) if output_final_state else None)


def gka_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    gk: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    scale: float | None = None,
    ridge_ratio: float = 0.02,
    num_iter: int = 30,
    solver: str = "chebyshev",
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    bp_lambda: bool = True,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Gated KalmaNet by a token loop that forms ``H_t`` and ``U_t`` explicitly.

    Args:
        q: ``[B, T, H, K]`` queries (already L2-normalized).
        k: ``[B, T, HKV, K]`` keys (normalized, beta-scaled); ``H % HKV == 0``.
        v: ``[B, T, HKV, V]`` values (beta-scaled).
        g: ``[B, T, H]`` log-decay of ``U`` (``<= 0``).
        gk: ``[B, T, H]`` log-decay of ``H``; ``None`` means ``gk = g``.
        alpha: ``[B, T, H]`` mix between ``q`` and the ridge solution; ``None`` means 1.
        scale: readout scale, default ``K ** -0.5``.
        ridge_ratio: ``lam_t = ridge_ratio * ||H_t||_F``.
        num_iter: Chebyshev iterations (ignored by ``solver="exact"``).
        solver: ``"chebyshev"`` (autograd through the iterations) or ``"exact"``
            (``torch.linalg.solve``; autograd gives the exact gradient).
        initial_state: ``(h_kk [N, H, K, K], h_kv [N, H, K, V])``.
        output_final_state: return ``(h_kk, h_kv)`` after the last token of each sequence.
        cu_seqlens: ``[N + 1]`` offsets of packed sequences (``B == 1``).
        bp_lambda: ``False`` detaches ``||H_t||_F`` (so ``lam_t`` is a constant for autograd).

    Returns:
        ``o [B, T, H, V]`` in the dtype of ``q`` and the final states or ``None``.
    """
    B, T, H, K = q.shape
    V = v.shape[3]
    dt = q.dtype
    x, h_kk = gka_solve_ref(q, k, g if gk is None else gk, ridge_ratio, num_iter, solver,
                            None if initial_state is None else initial_state[0], True, cu_seqlens,
                            bp_lambda)
    qm = x if alpha is None else q + alpha.to(dt)[..., None] * (x - q)
    k = k.repeat_interleave(H // k.shape[2], dim=2)
    v = v.repeat_interleave(H // v.shape[2], dim=2)
    g = g.to(dt)
    scale = K ** -0.5 if scale is None else scale
    outs, finals = [], []
    for n, (b, s, e) in enumerate(spans(B, T, cu_seqlens)):
        h_kv = initial_state[1][n].to(dt) if initial_state is not None else q.new_zeros(H, K, V)
        for t in range(s, e):
            h_kv = torch.exp(g[b, t])[:, None, None] * h_kv + k[b, t][:, :, None] * v[b, t][:, None, :]
            outs.append(scale * torch.einsum("hkv,hk->hv", h_kv, qm[b, t]))
        finals.append(h_kv)
    o = torch.stack(outs, 0).view(B, T, H, V) if outs else q.new_zeros(B, T, H, V)
    final = (h_kk, torch.stack(finals, 0)) if output_final_state else None
    return o, final
