"""ggml's K-quant scale searches (`make_qkx2_quants`, `make_qx_quants`), compiled with numba.

As whole-array numpy they were most of an edit's time (Q4_K's 21 trial scales each make a
dozen passes over memory). Here sub-blocks are taken TILE at a time: each trial runs over the
tile's values once for the codes and sums and once for the error, in cache, with the loop over
sub-blocks innermost so that it vectorises while every sum still runs over a sub-block's values
strictly in order, as ggml's C does. The arithmetic is `kquants`' numpy, operation for
operation, in float32 without fused multiply-adds (numba contracts only under fastmath), so the
bytes are the same (the tests check them against ggml's C).

Rounding uses `np.rint` when the trial's bound on |value| is below 2^22, where it equals ggml's
magic-number `nearest_int`; otherwise the exact emulation (`_nearest_int`) for that tile.
"""

from __future__ import annotations

import numba
import numpy as np

TILE = 64  # sub-blocks per tile: a tile's values, codes and shifted values stay in L1
_RINT_SAFE = np.float32(4.0e6)  # below 2^22 np.rint is ggml's nearest_int


@numba.njit(cache=True, inline="always", error_model="numpy")
def _nearest_int(v: float) -> np.float32:
    """ggml's nearest_int: add 1.5*2^23 in float32, read the low mantissa bits."""
    bits = np.float32(v + np.float32(12582912.0)).view(np.int32)
    return np.float32((bits & 0x7FFFFF) - 0x400000)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _levels(src: np.ndarray, iscale: np.ndarray, t: int, lo: np.float32, hi: np.float32, exact: bool,
            out: np.ndarray) -> None:
    """out[:, :t] = clip(nearest_int(src * iscale), lo, hi), column by column of the tile."""
    n = src.shape[0]
    if exact:
        for i in range(n):
            for j in range(t):
                out[i, j] = min(max(_nearest_int(src[i, j] * iscale[j]), lo), hi)
    else:
        for i in range(n):
            for j in range(t):
                out[i, j] = min(max(np.rint(src[i, j] * iscale[j]), lo), hi)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _unsafe(iscale: np.ndarray, reach: np.ndarray, reach2: np.ndarray, t: int) -> bool:
    """Whether some |iscale| * max(reach, reach2) is not below 2^22 (or is NaN): round exactly."""
    for j in range(t):
        if not (abs(iscale[j]) * reach[j] < _RINT_SAFE and abs(iscale[j]) * reach2[j] < _RINT_SAFE):
            return True
    return False


@numba.njit(cache=True, nogil=True, error_model="numpy")
def qkx2_search(x: np.ndarray, w: np.ndarray, xmin: np.ndarray, mx: np.ndarray, mn0: np.ndarray,
                sum_w: np.ndarray, sum_x: np.ndarray, flat: np.ndarray, nmax: int, rmin: float, rdelta: float,
                nstep: int, use_mad: bool, scale_out: np.ndarray, mn_out: np.ndarray, L: np.ndarray) -> None:
    """make_qkx2_quants on the columns of x (n, m), from numpy's per-column prologue (min, max,
    the starting min `mn0`, the weighted sums, which columns are flat): fills the scales, the
    mins (as ggml's `min`, not negated) and the codes L (n, m, float32)."""
    n, m = x.shape
    zero, one, top = np.float32(0), np.float32(1), np.float32(nmax)
    tiles, per = np.empty((4, n, TILE), np.float32), np.empty((13, TILE), np.float32)
    xt, wt, xm, lv = tiles[0], tiles[1], tiles[2], tiles[3]
    iscale, mn, span, reach, reach2, best, best_iscale = per[0], per[1], per[2], per[3], per[4], per[5], per[6]
    best_mn, scale, sl, sl2, sxl, err = per[7], per[8], per[9], per[10], per[11], per[12]
    for j0 in range(0, m, TILE):
        t = min(TILE, m - j0)
        for i in range(n):
            for j in range(t):
                xt[i, j] = x[i, j0 + j]
                wt[i, j] = w[i, j0 + j]
        for j in range(t):
            c = j0 + j
            mn[j] = mn0[c]
            span[j] = one if flat[c] else mx[c] - mn[j]
            iscale[j] = top / span[j]
            scale[j] = one / iscale[j]
        # the first trial: ggml's iscale = nmax/(max-min), its codes and error
        _shift(xt, mn, t, xm)
        _reaches(xmin, mx, mn, j0, t, reach, reach2)
        _levels(xm, iscale, t, zero, top, _unsafe(iscale, reach, reach2, t), lv)
        _error(lv, xt, wt, scale, mn, t, use_mad, best)
        for j in range(t):
            best_iscale[j], best_mn[j] = iscale[j], mn[j]
        for step in range(nstep + 1):
            factor = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + top
            for j in range(t):
                iscale[j] = factor / span[j]
            _levels(xm, iscale, t, zero, top, _unsafe(iscale, reach, reach2, t), lv)
            sl[:t] = zero
            sl2[:t] = zero
            sxl[:t] = zero
            for i in range(n):
                for j in range(t):
                    wl = wt[i, j] * lv[i, j]
                    sl[j] += wl
                    sl2[j] += wl * lv[i, j]
                    sxl[j] += wl * xt[i, j]
            moved = False
            for j in range(t):
                c = j0 + j
                d = sum_w[c] * sl2[j] - sl[j] * sl[j]
                this_scale = (sum_w[c] * sxl[j] - sum_x[c] * sl[j]) / d
                this_min = (sl2[j] * sum_x[c] - sl[j] * sxl[j]) / d
                if this_min > zero:
                    this_min = zero
                    this_scale = sxl[j] / sl2[j]
                # kept in the spare sums until the error is known
                sl[j], sl2[j], sxl[j] = this_scale, this_min, d
            _error(lv, xt, wt, sl, sl2, t, use_mad, err)
            for j in range(t):
                if sxl[j] > zero and err[j] < best[j] and not flat[j0 + j]:
                    best_iscale[j], best_mn[j], best[j] = iscale[j], mn[j], err[j]
                    scale[j], mn[j] = sl[j], sl2[j]
                    span[j] = mx[j0 + j] - mn[j]
                    moved = True
            if moved:
                _shift(xt, mn, t, xm)
                _reaches(xmin, mx, mn, j0, t, reach, reach2)
        # the codes of the best trial, from the iscale and min that produced them
        _shift(xt, best_mn, t, xm)
        _reaches(xmin, mx, best_mn, j0, t, reach, reach2)
        _levels(xm, best_iscale, t, zero, top, _unsafe(best_iscale, reach, reach2, t), lv)
        for j in range(t):
            c = j0 + j
            scale_out[c] = zero if flat[c] else scale[j]
            mn_out[c] = mn[j]
        for i in range(n):
            for j in range(t):
                L[i, j0 + j] = zero if flat[j0 + j] else lv[i, j]


@numba.njit(cache=True, inline="always", error_model="numpy")
def _shift(xt: np.ndarray, mn: np.ndarray, t: int, xm: np.ndarray) -> None:
    """xm = x - min, per column of the tile."""
    for i in range(xt.shape[0]):
        for j in range(t):
            xm[i, j] = xt[i, j] - mn[j]


@numba.njit(cache=True, inline="always", error_model="numpy")
def _reaches(xmin: np.ndarray, mx: np.ndarray, mn: np.ndarray, j0: int, t: int, reach: np.ndarray,
             reach2: np.ndarray) -> None:
    """How far x - min reaches per column: max - min and |min(x) - min| (numpy's bound)."""
    for j in range(t):
        reach[j] = mx[j0 + j] - mn[j]
        reach2[j] = abs(xmin[j0 + j] - mn[j])


@numba.njit(cache=True, inline="always", error_model="numpy")
def _error(lv: np.ndarray, xt: np.ndarray, wt: np.ndarray, scale: np.ndarray, mn: np.ndarray, t: int,
           use_mad: bool, out: np.ndarray) -> None:
    """Per column, the weighted error sum of (L*scale + min - x), squared or absolute, in order."""
    out[:t] = np.float32(0)
    for i in range(lv.shape[0]):
        for j in range(t):
            e = lv[i, j] * scale[j] + mn[j] - xt[i, j]
            e = abs(e) if use_mad else e * e
            out[j] += e * wt[i, j]


@numba.njit(cache=True, nogil=True, error_model="numpy")
def qx_search(x: np.ndarray, mx: np.ndarray, amax: np.ndarray, zero_col: np.ndarray, nmax: int,
              scale_out: np.ndarray, L: np.ndarray) -> None:
    """make_qx_quants (rmse_type 1, no weights) on the columns of x (n, m), from numpy's
    per-column prologue (the first value of largest magnitude, or 1 where the column is all
    but zero): fills the scales and the codes L (n, m, float32, already offset by nmax)."""
    n, m = x.shape
    zero, top = np.float32(0), np.float32(nmax)
    lo, hi = np.float32(-nmax), np.float32(nmax - 1)
    tiles, per = np.empty((4, n, TILE), np.float32), np.empty((7, TILE), np.float32)
    xt, w, wx, lv = tiles[0], tiles[1], tiles[2], tiles[3]
    iscale, best_iscale, best, scale, slx, sl2, reach = per[0], per[1], per[2], per[3], per[4], per[5], per[6]
    for j0 in range(0, m, TILE):
        t = min(TILE, m - j0)
        for i in range(n):
            for j in range(t):
                v = x[i, j0 + j]
                xt[i, j] = v
                w[i, j] = v * v
                wx[i, j] = w[i, j] * v
        for j in range(t):
            reach[j] = amax[j0 + j]
        for trial in range(19):  # the first guess, then steps -9..9 but 0
            step = trial - 10 if trial <= 9 else trial - 9
            for j in range(t):
                shift = np.float32(0.1) * np.float32(step) if trial else zero
                iscale[j] = -(top + shift) / mx[j0 + j] if trial else np.float32(-nmax) / mx[j0 + j]
            _levels(xt, iscale, t, lo, hi, _unsafe(iscale, reach, reach, t), lv)
            slx[:t] = zero
            sl2[:t] = zero
            for i in range(n):
                for j in range(t):
                    slx[j] += wx[i, j] * lv[i, j]
                    sl2[j] += w[i, j] * lv[i, j] * lv[i, j]
            for j in range(t):
                if trial == 0:
                    scale[j] = slx[j] / sl2[j] if sl2[j] != zero else zero
                    best[j], best_iscale[j] = scale[j] * slx[j], iscale[j]
                elif sl2[j] > zero and slx[j] * slx[j] > best[j] * sl2[j]:
                    scale[j] = slx[j] / sl2[j]
                    best[j], best_iscale[j] = scale[j] * slx[j], iscale[j]
        _levels(xt, best_iscale, t, lo, hi, _unsafe(best_iscale, reach, reach, t), lv)
        for j in range(t):
            scale_out[j0 + j] = zero if zero_col[j0 + j] else scale[j]
        for i in range(n):
            for j in range(t):
                L[i, j0 + j] = zero if zero_col[j0 + j] else lv[i, j] + top
