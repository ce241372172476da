"""Gated DeltaNet kernels (SPEC 3).

Public API (drop-in for the ``fla`` names)::

    chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                           use_qk_l2norm_in_kernel=False, cu_seqlens=None) -> (o, final_state | None)
    fused_recurrent_gated_delta_rule(...same...) -> (o, final_state | None)       # forward only

``q [B,T,H,K]``, ``k [B,T,HKV,K]``, ``v [B,T,HKV,V]``, ``g``/``beta [B,T,H]``, states ``[N,H,K,V]``
float32 (key-major). Per query head ``h`` (key/value head ``h // (H // HKV)``)::

    S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale S_t^T q_t

Kernel pipeline (chunks of ``BT = 64`` tokens; ``G`` = chunk-local cumulative sum of ``g``)
------------------------------------------------------------------------------------------
Forward (``chunk.py``), 4 launches (+2 with the L2 norm):

1. ``l2norm.l2norm_scale_kernel`` (only with ``use_qk_l2norm_in_kernel``, once for ``q``, once for
   ``k``): inverse norms ``rq [B,T,H]``, ``rk [B,T,HKV]``. Normalized copies are never
   materialized: every kernel applies the factors to rows/columns of its products, so 16-bit
   inputs feed the tensor cores unrounded.
2. ``common.cumsum.chunk_local_cumsum``: ``G``.
3. ``wy.wy_fwd_kernel`` (parallel over chunks x query heads): ``A = strictly_lower(beta k k^T * exp(G_i-G_j))``,
   ``Tm = (I + A)^-1`` (in float32 registers), ``w = Tm diag(beta exp(G)) k``, ``u = Tm diag(beta) v``.
4. ``state.state_fwd_kernel`` (sequential over chunks; grid V/BV x sequences x heads, so one long
   sequence still fills the GPU): stores ``h_c``; ``v_new = u - w h_c``;
   ``h_{c+1} = exp(G_L) h_c + k^T (exp(G_L - G) v_new)``; optional final state.
5. ``output.output_fwd_kernel`` (parallel): ``o = scale (exp(G) q h_c + (q k^T * M) v_new)``.

When gradients are needed the forward also saves ``G``, ``Tm`` (rows of ``(I + A)^-1`` per chunk,
in the input dtype) and ``rq``/``rk``.

Backward, 7 launches (+1 for ``dk`` with ``H > HKV`` and no L2 norm, +2 with the L2 norm):

1. recompute ``w``, ``u`` from the saved ``Tm`` (``wy_fwd_kernel``) and the chunk states ``h``,
   ``v_new`` (``state_fwd_kernel``);
2. ``output.dv_local_kernel``: ``scale (q k^T * M)^T do``;
3. ``state.state_bwd_kernel`` (reverse chunk order): ``dv_new``, ``dh_c`` and the initial-state
   gradient;
4. ``output.dqkw_kernel`` (one key/value head per program, its query heads summed in registers):
   ``dq``, the output/state part ``dk_part`` of ``dk`` ``[B,T,HKV,K]`` (float32), ``dw = -dv_new h^T``
   and gate-gradient partials;
5. ``wy_backward.wy_bwd_kernel`` (one query head per program, through ``Tm``): ``dbeta``, ``dg``
   (a reverse chunk-local cumsum) and that head's WY part of ``dk``;
6. ``wy_backward.wy_dv_kernel`` (one key/value head per program): ``dv = sum_h beta_h Tm_h^T dv_new_h``
   over the group's query heads, accumulated in registers (no per-query-head ``dv``);
7. with the L2 norm, ``l2norm.l2norm_bwd_kernel`` for ``dq`` and for ``dk``; for ``dk`` it first sums
   the per-query-head WY parts over each group and adds ``dk_part``. Without the L2 norm and with
   ``H > HKV``, ``common.group_sum`` does that sum; with ``H == HKV`` ``wy_bwd_kernel`` adds
   ``dk_part`` and writes ``dk`` itself.

Grouped heads never materialize repeated keys/values. The only per-query-head gradient
temporary is the WY part of ``dk`` (``H > HKV``): ``[B,T,H,K]`` float32, ``4 H K`` bytes per token
(16 KB for H=32, K=128), written by ``wy_bwd_kernel`` and read once by the L2-norm backward (or
``group_sum``).

Memory: saved for the backward beyond the inputs, per token and query head, ``BT`` values of
``Tm`` in the input dtype (128 B in 16-bit) plus float32 ``G``/``rq``/``rk`` (about 12 B). The
backward's transient buffers are about ``4 H K V / BT + 2 H (2 K + 4 V) + 4 HKV K + 4 H K`` bytes
per token for 16-bit inputs (chunk states and their gradients; ``w``/``dw``/``u``/``v_new``/
``dv_local``/``dv_new``; float32 ``dk_part``; the float32 WY part of ``dk`` when ``H > HKV``), plus
``4 H K`` for the float32 ``dq`` before the L2-norm backward: about 116 KB per token for H=32,
HKV=8, K=V=128 with the L2 norm.

Precision: accumulation, ``Tm``, gates and states in float32; stored intermediates in the input
dtype when it is 16-bit (float32 otherwise, float64 for float64 inputs, which is what gradcheck
uses). ``fused_recurrent_gated_delta_rule`` keeps one ``[K, BV]`` state slice in registers and
walks the tokens (decoding with ``T == 1``).
"""

from gka_kernels.gdn import l2norm as _l2norm  # noqa: F401  (registers its AOT specs)
from gka_kernels.gdn.chunk import chunk_gated_delta_rule
from gka_kernels.gdn.fused_recurrent import fused_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]
