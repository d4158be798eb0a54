"""The dropout mask of the Triton kernels: :func:`fastbert.reference.dropout_keep`, drawn four
elements to a Philox call (element counter c takes word c & 3 of ``tl.rand4x`` at c >> 2)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, row_counters, first, BLOCK: tl.constexpr, dropout_p):
    """The keep mask ``[R, BLOCK]`` of the elements whose counters are ``row_counters[i] + first + j``
    (``row_counters`` int64 ``[R]``; it and ``first`` multiples of 4, so each row's elements 4g to
    4g + 3 share the call at counter (row_counters[i] + first) / 4 + g, whose four words are
    interleaved back into the row). Rows narrower than a call pick each element's word instead."""
    if BLOCK >= 4:
        groups = (row_counters >> 2)[:, None] + (first >> 2) + tl.arange(0, BLOCK // 4)[None, :]
        u0, u1, u2, u3 = tl.rand4x(seed, groups)
        # Compared before interleaving, so that the interleave moves masks rather than floats.
        k0, k1, k2, k3 = u0 > dropout_p, u1 > dropout_p, u2 > dropout_p, u3 > dropout_p
        keep = tl.interleave(tl.interleave(k0, k2), tl.interleave(k1, k3))  # k0, k1, k2, k3, k0, ...
    else:
        counters = row_counters[:, None] + first + tl.arange(0, BLOCK)[None, :]
        u0, u1, u2, u3 = tl.rand4x(seed, counters >> 2)
        word = counters & 3
        keep = tl.where(word == 0, u0, tl.where(word == 1, u1, tl.where(word == 2, u2, u3))) > dropout_p
    return keep
