"""``nn.Module`` layers (SPEC 6): ``GatedKalmaNet``, ``GatedDeltaNet``, ``Mamba2``, their building
blocks (short convolution, gated RMSNorm, L2 norm) and their inference caches.

Every layer: ``forward(hidden_states [B,T,hidden], attention_mask=None, cache=None, use_cache=False)
-> (output, cache)``; ``backend`` in ``"auto" | "triton" | "cuda" | "torch"`` (``dispatch``).
"""

from gka_kernels.layers.cache import GDNCache, GKACache, LayerCache, Mamba2Cache
from gka_kernels.layers.conv import ShortConvolution
from gka_kernels.layers.gdn import GatedDeltaNet
from gka_kernels.layers.gka import GatedKalmaNet
from gka_kernels.layers.mamba2 import Mamba2
from gka_kernels.layers.norm import GatedRMSNorm, l2_norm
from gka_kernels.layers.padding import Packing

__all__ = [
    "GatedKalmaNet", "GatedDeltaNet", "Mamba2",
    "ShortConvolution", "GatedRMSNorm", "l2_norm",
    "LayerCache", "GKACache", "GDNCache", "Mamba2Cache",
    "Packing",
]
