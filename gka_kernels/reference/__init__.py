"""Readable PyTorch references written from the math (SPEC 3-5): token-by-token loops that run in
float64 on the CPU and are differentiable with autograd. Every test compares against these.

- ``gka_kernels.reference.gdn.gated_delta_rule_ref``
- ``gka_kernels.reference.mamba2.ssd_ref``
- ``gka_kernels.reference.gla.simple_gla_ref``
- ``gka_kernels.reference.gka.gka_ref`` (Chebyshev at a given ``num_iter`` or exact solve)
"""
