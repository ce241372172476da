"""Microbenchmarks for gka-kernels, run from the repository: ``python -m bench --help``.

Modules: ``timing`` (CUDA-event medians, CUDA-graph timing for decode), ``ceilings`` (copy bandwidth
and bf16 matmul rate measured in the same run), ``floors`` (FLOPs and bytes per op), ``peers``
(optional adapters for fla, mamba_ssm and SDPA attention), ``cases`` (what is timed),
``report`` (JSON + Markdown).
"""
