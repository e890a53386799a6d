"""ggml's float arithmetic, reproduced in numpy: what every bit-exact quantizer port needs.

ggml sums strictly in order in float32, rounds with a magic-number trick, and keeps the first
of equal maxima; numpy does none of these by default. Shared by the K-quant and IQ4 ports.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


_MAGIC = F32(12582912.0)  # 1.5 * 2**23


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int(): add 1.5*2^23 in float32, read the low mantissa bits (as float32)."""
    bits = (np.asarray(v, dtype=F32) + _MAGIC).view(np.int32)
    return ((bits & 0x7FFFFF) - 0x400000).astype(F32)


def _ordered_sum_loop(t: np.ndarray) -> np.ndarray:
    """Sum over axis 0, strictly first to last, in float32."""
    acc = t[0].copy()
    for row in t[1:]:
        acc += row
    return acc


def _reduce_is_ordered() -> bool:
    """numpy reduces a C-ordered array over axis 0 row by row (pairwise summation is used only
    along the contiguous axis), which is the order we need, in one call. Not documented, so
    checked on values where any other order rounds differently."""
    probe = np.array([[2.0**24], [1.0], [1.0], [-(2.0**24)]] * 8, dtype=F32).repeat(3, axis=1)
    probe[:, 1] = probe[::-1, 0]
    return np.array_equal(probe.sum(axis=0), _ordered_sum_loop(probe))


_REDUCE_IS_ORDERED = _reduce_is_ordered()


def ordered_sum(t: np.ndarray) -> np.ndarray:
    """Sum over axis 0, strictly first to last: one numpy call for C-ordered input."""
    if _REDUCE_IS_ORDERED and t.flags.c_contiguous:
        return t.sum(axis=0)
    return _ordered_sum_loop(t)


def columns(x: np.ndarray, n: int) -> np.ndarray:
    """Blocks of n consecutive values as the columns of a C-ordered (n, m) array."""
    return np.ascontiguousarray(x.reshape(-1, n).T)


def first_max_abs(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, C's `if (|s| > amax) {amax = |s|; max = s;}` from 0: (amax, max); NaN never wins."""
    mag = np.where(np.isnan(scales), F32(-1), np.abs(scales))
    first = mag.argmax(axis=1)
    amax = np.maximum(mag[np.arange(len(first)), first], F32(0))
    return amax, np.where(amax > 0, scales[np.arange(len(first)), first], F32(0))
