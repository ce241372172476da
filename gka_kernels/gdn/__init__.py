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
Forward (``chunk.py``), 4 launches (+1 with the L2 norm):

1. ``l2norm.l2norm_scale_kernel`` (only with ``use_qk_l2norm_in_kernel``): inverse norms
   ``rq [B,T,H]``, ``rk [B,T,HKV]``. Normalized copies are never materialized: every kernel
   applies the factors to rows/columns of its products, so 16-bit inputs feed the tensor cores
   unrounded.
2. ``common.cumsum.chunk_local_cumsum``: ``G``.
3. ``wy.wy_fwd_kernel`` (parallel over chunks x heads): ``A = strictly_lower(beta k k^T * exp(G_i-G_j))``,
   ``Tm = (I + A)^-1`` (four 16x16 diagonal blocks by forward substitution in float32, merged by
   block back-substitution), ``w = Tm diag(beta exp(G)) k``, ``u = Tm diag(beta) v``.
4. ``state.state_fwd_kernel`` (sequential over chunks; grid V/BV x sequences x heads, so one long
   sequence still fills the GPU): stores ``h_c``; ``v_new = u - w h_c``;
   ``h_{c+1} = exp(G_L) h_c + k^T (exp(G_L - G) v_new)``; optional final state.
5. ``output.output_fwd_kernel`` (parallel): ``o = scale (exp(G) q h_c + (q k^T * M) v_new)``.

Backward, 8 launches (+2 with the L2 norm): recompute 1-4 (storing ``Tm``), then
``output.dv_local_kernel`` (``scale (q k^T * M)^T do``), ``state.state_bwd_kernel`` (reverse
chunk order: ``dv_new``, ``dh_c`` and the initial-state gradient), ``output.dqkw_kernel`` (``dq``,
the output/state part of ``dk``, ``dw = -dv_new h^T`` and gate-gradient partials) and
``wy.wy_bwd_kernel`` (through ``Tm``: ``dk``, ``dv``, ``dbeta``, ``dg`` as a reverse chunk-local
cumsum). The last two run one key/value head per program and sum the query heads of its group in
registers, so grouped heads never materialize repeated keys/values or per-query-head ``dk``/``dv``.

Memory: the forward saves only its inputs for the backward (0 extra bytes per token beyond
``q, k, v, g, beta`` and the initial state that autograd already holds). The backward recomputes
the chunk-local quantities and the chunk states; its transient buffers are about
``4 H K V / BT + 2 H (2 K + 4 V) + 4 H BT`` bytes per token for 16-bit inputs (chunk states and
their gradients, ``w``/``dw``/``u``/``v_new``/``dv_local``/``dv_new``, float32 ``Tm``), about 90 KB
per token for H=32, K=V=128.

Precision: accumulation, ``Tm``, gates and states in float32; stored intermediates in the input
dtype when it is 16-bit (float32 otherwise, float64 for float64 inputs, which is what gradcheck
uses). ``fused_recurrent_gated_delta_rule`` keeps one ``[K, BV]`` state slice in registers and
walks the tokens (decoding with ``T == 1``).
"""

from gka_kernels.gdn import l2norm as _l2norm  # noqa: F401  (registers its AOT specs)
from gka_kernels.gdn.chunk import chunk_gated_delta_rule
from gka_kernels.gdn.fused_recurrent import fused_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]
