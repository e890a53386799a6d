"""The inner search of aware rounding (`rounding._settle`), compiled with numba.

Group by group, which moves to take is a short sequential search: pick the cheapest moves per
unit of gain, take as many as pay, repeat with smaller moves. As whole-array numpy it ran a
dozen temporaries and a partial sort over every group on every pass (90% of aware rounding's
time on a 1.5B ffn_down). Here a group is copied once, in visiting order, into contiguous
buffers; a pass computes every value's cost per gain in one loop that vectorises, then keeps
the best `k` in a max-heap; the group's error component is updated by its moves rather than
summed again. The rule is the one `rounding`'s docstring gives; among equal ratios the lower
index in the group goes first. Values are read through any strides (a group may be a column
of a row-major block).
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, inline="always", error_model="numpy")
def _move(j: int, a: float, ui: float, want: float, padded: np.ndarray, unit: bool) -> tuple[float, int]:
    """The move a value at padded index j offers (towards want along u): (delta, step)."""
    if unit:
        up = a if j < len(padded) - 2 else np.float32(np.nan)
        down = -a if j > 1 else np.float32(np.nan)
    else:
        here = padded[j]
        up = a * (padded[j + 1] - here)
        down = a * (padded[j - 1] - here)
    if (up * ui) * want > 0:
        return up, 1
    return down, -1


@numba.njit(cache=True, inline="always", error_model="numpy")
def _before(ra: float, pa: int, rb: float, pb: int, order: np.ndarray) -> bool:
    """Candidate order: lower ratio first, then lower index in the group (positions are in
    visiting order; `order` maps them back, so ties do not depend on that order)."""
    return ra < rb or (ra == rb and order[pa] < order[pb])


@numba.njit(cache=True, inline="always", error_model="numpy")
def _sift_down(ratio: np.ndarray, pos: np.ndarray, at: int, size: int, order: np.ndarray) -> None:
    """Restore the max-heap (by `_before`) below `at`."""
    while True:
        big, left = at, 2 * at + 1
        if left < size and _before(ratio[big], pos[big], ratio[left], pos[left], order):
            big = left
        if left + 1 < size and _before(ratio[big], pos[big], ratio[left + 1], pos[left + 1], order):
            big = left + 1
        if big == at:
            return
        ratio[at], ratio[big] = ratio[big], ratio[at]
        pos[at], pos[big] = pos[big], pos[at]
        at = big


@numba.njit(cache=True, nogil=True, error_model="numpy")
def settle_groups(code: np.ndarray, a: np.ndarray, b: np.ndarray, target: np.ndarray, u: np.ndarray,
                  order: np.ndarray, padded: np.ndarray, unit: bool, tol: float, limit: float, k: int, passes: int,
                  weight: float) -> None:
    """Move the codes of groups (rows of `code`, (groups, n), any strides) in place; value i
    of group g dequantizes to `a[g, i] * table[code] + b[g, i]` and should sum along u like
    `target[g]`. `padded` is the type's table with NaN at both ends; with `unit`, levels are
    consecutive integers and a step is exactly `a`. Values are visited in `order`, a
    permutation of range(n): largest |u| first, the cheapest moves per unit of gain are mostly
    there, so the candidates fill with good moves early and few are displaced (on a 1.5B
    ffn_down, 34 displacements per group and pass instead of 122; 40% less time)."""
    n_groups, n = code.shape
    ratio, pos, ig, ag, eg, q = _buffers(n, k)
    uo = u[order]
    place = np.empty(n, np.int64)  # each value's place in visiting order
    place[order] = np.arange(n)
    for g in range(n_groups):
        r = 0.0  # the group's error component along u, summed in the group's own order
        for i in range(n):
            j = place[i]
            ig[j] = code[g, i] + 1
            ag[j] = a[g, i]
            eg[j] = ag[j] * padded[ig[j]] + b[g, i] - target[g, i]
            r += np.float64(eg[j]) * np.float64(u[i])
        _settle_group(ig, ag, eg, uo, order, padded, unit, r, tol, limit, passes, weight, ratio, pos, q)
        for i in range(n):
            code[g, i] = ig[place[i]] - 1


@numba.njit(cache=True)
def _buffers(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A search's working arrays: the best k candidates of a pass (ratio, pos: a max-heap while
    scanning, then sorted best first), and one group of n values in visiting order as
    padded-table indices, steps, errors and the cost per gain of their moves, contiguous."""
    k = min(k, n)
    return (np.empty(k, np.float32), np.empty(k, np.int64), np.empty(n, np.int32), np.empty(n, np.float32),
            np.empty(n, np.float32), np.empty(n, np.float32))


@numba.njit(cache=True, error_model="numpy")
def _settle_group(ig: np.ndarray, ag: np.ndarray, eg: np.ndarray, u: np.ndarray, order: np.ndarray,
                  padded: np.ndarray, unit: bool, r: float, tol: float, limit: float, passes: int, weight: float,
                  ratio: np.ndarray, pos: np.ndarray, q: np.ndarray) -> None:
    """One group's search: padded-table indices `ig`, steps `ag`, errors `eg` and `u`, all in
    visiting order (`order` gives each one's place in the group), move in place; `r` is the
    group's error component along u. (ratio, pos) is the candidates' buffer, its length the
    number of candidates per pass; q is scratch for the scan."""
    n = len(ig)
    for _ in range(passes):
        size = abs(r)
        if not size > tol:
            break
        want = np.float32(-1.0) if r > 0 else np.float32(1.0)
        reach = np.float32(2 * size)
        filled = _candidates(ig, ag, eg, u, order, padded, unit, want, reach, q, ratio, pos)
        # heap sort: the worst goes to the end, leaving the candidates best first
        for end in range(filled - 1, 0, -1):
            ratio[0], ratio[end] = ratio[end], ratio[0]
            pos[0], pos[end] = pos[end], pos[0]
            _sift_down(ratio, pos, 0, end, order)
        # take the first `count` candidates: count minimises cost spent + what the
        # component left costs (and, heavily, whatever of it exceeds the leak limit)
        count, cum, spent = 0, 0.0, 0.0
        over = max(size - limit, 0.0)
        best = weight * n * size * size + 1e6 * n * over * over
        for c in range(filled):
            i = pos[c]
            delta, _ = _move(ig[i], ag[i], u[i], want, padded, unit)
            cum += np.float64((delta * u[i]) * want)
            spent += np.float64(delta * (eg[i] + eg[i] + delta))
            left = size - cum
            over = max(abs(left) - limit, 0.0)
            value = spent + weight * n * left * left + 1e6 * n * over * over
            if value < best:
                best, count = value, c + 1
        if count == 0:
            break
        for c in range(count):
            i = pos[c]
            delta, step = _move(ig[i], ag[i], u[i], want, padded, unit)
            ig[i] += step
            eg[i] += delta
            r += np.float64(delta) * np.float64(u[i])


@numba.njit(cache=True, error_model="numpy")
def _candidates(ig: np.ndarray, ag: np.ndarray, eg: np.ndarray, u: np.ndarray, order: np.ndarray,
                padded: np.ndarray, unit: bool, want: float, reach: float, q: np.ndarray, ratio: np.ndarray,
                pos: np.ndarray) -> int:
    """Fill the max-heap (ratio, pos) with the best moves (at most its size) and return how
    many it holds: each move gains along u in the wanted sense, by less than `reach`; ranked
    by weight error added per unit gained.

    First every value's cost per gain goes into q (NaN where it offers no move), in a loop
    without branches that vectorises; then one pass keeps the best: once the heap is full a
    value enters only if it beats the worst kept, rarely, so that branch is predictable."""
    n, k = len(ig), len(ratio)
    nan = np.float32(np.nan)
    if unit:
        for i in range(n):
            q[i] = _ratio(ig[i], ag[i], eg[i], u[i], want, reach, padded, True, nan)
    else:
        for i in range(n):
            q[i] = _ratio(ig[i], ag[i], eg[i], u[i], want, reach, padded, False, nan)
    filled, i = 0, 0
    while filled < k and i < n:  # the first k moves, as they come
        qi = q[i]
        if qi == qi:
            at = filled  # sift up
            filled += 1
            while at > 0 and _before(ratio[(at - 1) // 2], pos[(at - 1) // 2], qi, i, order):
                ratio[at], pos[at] = ratio[(at - 1) // 2], pos[(at - 1) // 2]
                at = (at - 1) // 2
            ratio[at], pos[at] = qi, i
        i += 1
    worst = ratio[0]
    for j in range(i, n):  # NaN never beats the worst kept
        if q[j] <= worst and _before(q[j], j, worst, pos[0], order):
            ratio[0], pos[0] = q[j], j
            _sift_down(ratio, pos, 0, k, order)
            worst = ratio[0]
    return filled


@numba.njit(cache=True, inline="always", error_model="numpy")
def _ratio(j: int, a: float, e: float, ui: float, want: float, reach: float, padded: np.ndarray, unit: bool,
           nan: float) -> float:
    """A value's move as weight error added per unit of gain along u, or NaN if it gains
    nothing in the wanted sense or more than `reach`."""
    delta, _ = _move(j, a, ui, want, padded, unit)
    gain = (delta * ui) * want
    return delta * (e + e + delta) / gain if gain > 0 and gain < reach else nan


@numba.njit(cache=True, nogil=True, error_model="numpy")
def compensate_columns(codes: np.ndarray, a: np.ndarray, b: np.ndarray, w: np.ndarray, errs: np.ndarray,
                       chol: np.ndarray, u: np.ndarray, order: np.ndarray, padded: np.ndarray, first: int,
                       p0: int, p1: int, tol: float, limit: float, k: int, passes: int, weight: float) -> None:
    """Columns p0..p1 of every column block, one after the other, as `rounding.keep_edit_compensated`
    describes: (blocks, width, rows) arrays, act-ordered. For column p of a block: the carried
    target is clipped to the scales' range (its component along u kept), rounded to the nearest
    code, settled along u; its error, without its component along u and divided by U_pp, goes to
    `errs[:, p - p0]` and to the batch's later columns (the rest is one matmul, left to numpy)."""
    nb, width, n = w.shape
    top = len(padded) - 3  # the last code
    ratio, pos, ig, ag, eg, scratch = _buffers(n, k)
    t, code, e = np.empty(n, np.float32), np.empty(n, np.int32), np.empty(n, np.float32)
    uo = u[order]
    uu = np.float32(0.0)
    for i in range(n):
        uu += u[i] * u[i]
    for p in range(p0, p1):
        for blk in range(nb):
            ap, bp, wp = a[blk, p], b[blk, p], w[blk, p]
            # what earlier columns pushed beyond the scales' range is dropped (carried on, it
            # could push later columns further out), but not its component along u
            dropped = np.float32(0.0)
            for i in range(n):
                lo = ap[i] * first + bp[i]
                hi = ap[i] * (first + top) + bp[i]
                t[i] = min(max(wp[i], min(lo, hi)), max(lo, hi))
                dropped += (wp[i] - t[i]) * u[i]
            for i in range(n):
                t[i] += dropped * u[i] / uu
                near = np.rint((t[i] - bp[i]) / ap[i]) - first
                code[i] = np.int32(min(max(near, 0.0), float(top)) if np.isfinite(near) else 0.0) + 1
                e[i] = ap[i] * padded[code[i]] + bp[i] - t[i]
            r = 0.0
            for i in range(n):
                r += np.float64(e[i]) * np.float64(u[i])
            for j in range(n):
                ig[j], ag[j], eg[j] = code[order[j]], ap[order[j]], e[order[j]]
            _settle_group(ig, ag, eg, uo, order, padded, True, r, tol, limit, passes, weight, ratio, pos, scratch)
            for j in range(n):
                codes[blk, p, order[j]] = ig[j] - 1
                e[order[j]] = eg[j]
            # the error carried on, without its component along u (later columns keep the target's)
            along = np.float32(0.0)
            for i in range(n):
                along += -e[i] * u[i]
            pivot = chol[blk, p, p]
            for i in range(n):
                errs[blk, p - p0, i] = (-e[i] - along * u[i] / uu) / pivot
            for q in range(p + 1, p1):
                c = chol[blk, p, q]
                for i in range(n):
                    w[blk, q, i] -= c * errs[blk, p - p0, i]
