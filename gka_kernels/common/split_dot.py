"""Products of float32 tiles on 16-bit tensor cores: operands split into a 16-bit hi + lo pair.

``a ~= hi + lo`` with ``hi = round(a)`` and ``lo = round(a - hi)`` in a 16-bit dtype ``DT`` carries
about twice ``DT``'s mantissa (bf16: ~16 bits, fp16: ~22 bits). A product takes one ``tl.dot`` per
pair of parts that matters: ``hi_a hi_b``, plus ``lo_a hi_b`` when ``a`` is split, plus ``hi_a lo_b``
when ``b`` is split (``lo_a lo_b`` is below the rounding of the others). An operand whose values are
exact in ``DT`` (16-bit inputs) is not split, so a product with one exact side costs two dots, not
three.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def split_hi_lo(a, DT: tl.constexpr):
    """``a ~= hi + lo`` with both terms in the dot dtype ``DT`` (``lo`` is the rounding error of
    ``hi``): ``dot(hi, b) + dot(lo, b)`` multiplies ``a`` at ~twice ``DT``'s mantissa."""
    hi = a.to(DT)
    return hi, (a - hi.to(a.dtype)).to(DT)


@triton.jit
def dot_hi_lo(a, b, SPLIT_A: tl.constexpr, SPLIT_B: tl.constexpr, DT: tl.constexpr, ACC: tl.constexpr,
              PREC: tl.constexpr):
    """``a @ b`` (``a [M, K]``, ``b [K, N]``, both held in ``ACC``) accumulated in ``ACC`` from ``DT``
    operands; ``SPLIT_A`` / ``SPLIT_B``: that operand enters as hi + lo (see the module docstring).
    Without splits this is one ``tl.dot`` of the rounded operands."""
    a_hi = a.to(DT)
    b_hi = b.to(DT)
    c = tl.dot(a_hi, b_hi, out_dtype=ACC, input_precision=PREC)
    if SPLIT_A:
        c = tl.dot((a - a_hi.to(a.dtype)).to(DT), b_hi, c, out_dtype=ACC, input_precision=PREC)
    if SPLIT_B:
        c = tl.dot(a_hi, (b - b_hi.to(b.dtype)).to(DT), c, out_dtype=ACC, input_precision=PREC)
    return c
