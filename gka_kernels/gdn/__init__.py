"""Gated DeltaNet (SPEC 3)."""

from gka_kernels.gdn import l2norm as _l2norm  # noqa: F401  (registers its AOT specs)
from gka_kernels.gdn.chunk import chunk_gated_delta_rule
from gka_kernels.gdn.fused_recurrent import fused_recurrent_gated_delta_rule

__all__ = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"]
