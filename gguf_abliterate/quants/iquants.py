"""IQ4_NL and IQ4_XS quantizers, bit-exact with what `ggml_quantize_chunk` writes without an
importance matrix.

Note: `ggml_quantize_chunk` runs `quantize_iq4_nl` / `quantize_iq4_xs`, which search 15 scale
candidates (ntry = 7) with weights x^2; ggml's separate `quantize_row_iq4_nl_ref` uses no
search. We match the former, since that is what llama-quantize produces.
"""

from __future__ import annotations

import numpy as np

from gguf_abliterate.quants.bits import pack_nibbles
from gguf_abliterate.quants.ggml_math import F32, GROUP_MAX_EPS, columns, first_max_abs, nearest_int, ordered_sum

KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=F32)
NTRY = 7


# Twice the midpoints between neighbouring grid values (integers): x rounds to the upper one
# exactly when floor(2x) reaches it, so a table over floor(2x) gives the index.
_MID2 = KVALUES[:-1] + KVALUES[1:]
_SLOTS = np.arange(-256, 256, dtype=F32)
_INDEX = np.searchsorted(_MID2, _SLOTS, side="right").astype(np.uint8)
_VALUE = KVALUES[_INDEX]


def _slot(x: np.ndarray) -> np.ndarray:
    """floor(2x) clipped to the table, as an index into `_INDEX` / `_VALUE` (NaN: the top)."""
    f = np.floor(x * F32(2))
    np.fmin(f, F32(255), out=f)  # fmin, unlike minimum, turns NaN into the bound
    np.maximum(f, F32(-256), out=f)
    return f.astype(np.int32) + 256


def best_index(x: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 over the IQ4 grid: the nearest value's index, ties going up.

    ggml compares x - lo < hi - x. Wherever that is close, |x| >= 4.5 and both differences are
    exact in float32, so it is x < (lo + hi) / 2: one lookup on floor(2x), 10x a binary search.
    NaN (0 * inf on denormal input) gives 15, as in ggml.
    """
    return _INDEX[_slot(x)]


def _block_scales(x: np.ndarray) -> np.ndarray:
    """The per-32 scale search of quantize_row_iq4_nl_impl, on columns of x (32, m)."""
    cols = np.arange(x.shape[1])
    mx = x[np.abs(x).argmax(axis=0), cols]
    skip = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(skip, F32(1), mx)
    w = x * x

    def sums(ident: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = _VALUE[_slot(ident * x)]  # KVALUES[best_index(.)] in one lookup
        wq = w * q
        return ordered_sum(wq * x), ordered_sum(wq * q)

    d = -mx / KVALUES[0]
    sumqx, sumq2 = sums(F32(1) / d)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = sums((F32(itry) + KVALUES[0]) / mx)
        with np.errstate(divide="ignore", invalid="ignore"):
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
        best = np.where(better, d * sumqx, best)
    return np.where(skip, F32(0), d)


def quantize_iq4_nl(x: np.ndarray) -> np.ndarray:
    """float32 (nb, 32) -> IQ4_NL blocks (nb, 18): d, qs[16]."""
    d = _block_scales(columns(x, 32))
    d16 = d.astype(np.float16)
    with np.errstate(divide="ignore"):
        ident = np.where(d != 0, F32(1) / d, F32(0))
    L = best_index(ident[:, None] * x)
    return np.concatenate([d16.view(np.uint8).reshape(-1, 2), pack_nibbles(L.astype(np.uint8), 16)], 1)


def quantize_iq4_xs(x: np.ndarray) -> np.ndarray:
    """float32 (nb, 256) -> IQ4_XS blocks (nb, 136): d, scales_h (u16), scales_l[4], qs[128]."""
    nb = x.shape[0]
    scales = _block_scales(columns(x, 32)).reshape(nb, 8)
    _, max_scale = first_max_abs(scales)
    d = -max_scale / F32(32)
    with np.errstate(divide="ignore"):
        ident = np.where(d != 0, F32(1) / d, F32(0))
    l = np.clip(nearest_int(ident[:, None] * scales), -32, 31)
    dl = d[:, None] * l
    with np.errstate(divide="ignore"):
        idl = np.where(dl != 0, F32(1) / dl, F32(0))
    L = best_index(idl[:, :, None] * x.reshape(nb, 8, 32)).reshape(nb, 256)
    code = (l + 32).astype(np.int64)
    scales_l = ((code[:, 0::2] & 0xF) | ((code[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = np.bitwise_or.reduce((code >> 4) << (2 * np.arange(8)), axis=1).astype("<u2")
    return np.concatenate([d.astype(np.float16).view(np.uint8).reshape(nb, 2),
                           scales_h.view(np.uint8).reshape(nb, 2), scales_l, pack_nibbles(L.astype(np.uint8), 16)], 1)
