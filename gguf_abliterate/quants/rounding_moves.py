"""The inner search of aware rounding (`rounding.keep_edit` and `keep_edit_compensated`), compiled with numba.

Group by group, which moves to take is a short sequential search: pick the cheapest moves per
unit of gain, take as many as pay, repeat with smaller moves. As whole-array numpy it ran a
dozen temporaries and a partial sort over every group on every pass (90% of aware rounding's
time on a 1.5B ffn_down). Here a group's values are copied once into contiguous buffers; a
pass computes every value's cost per gain in one loop that vectorises, then keeps the best few
(`START`, more while passes take all they kept) in a max-heap of integer keys; the group's
error component is updated by its moves rather than summed again.
The rule is the one `rounding`'s docstring gives; among equal ratios the lower index in the
group goes first.
"""

from __future__ import annotations

import numba
import numpy as np

# candidates a group's first pass keeps (see `_settle_group`): on a 1.5B ffn_down a pass takes
# about 0.3 * sqrt(group size) moves; 8 then doubling was 25-30% faster than 32 from the start,
# for the same leak and weight error
START = 8
# `_candidates` estimates its threshold from every SAMPLE-th value of a group (8-32 ran alike)
SAMPLE = 16


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


# the key of a value that offers no move: after every real key
NONE = np.int64(0x7FFFFFFFFFFFFFFF)


@numba.njit(cache=True, inline="always", error_model="numpy")
def _sift_down(heap: np.ndarray, at: int, size: int) -> None:
    """Restore the max-heap of keys below `at`."""
    while True:
        big = 2 * at + 1
        if big >= size:
            return
        if big + 1 < size and heap[big + 1] > heap[big]:
            big += 1
        if heap[big] <= heap[at]:
            return
        heap[at], heap[big] = heap[big], heap[at]
        at = big


@numba.njit(cache=True, nogil=True, error_model="numpy")
def settle_rows(code: np.ndarray, a: np.ndarray, b: np.ndarray, target: np.ndarray, u: np.ndarray,
                order: np.ndarray, padded: np.ndarray, unit: bool, tol: float, limit: float, k: int, passes: int,
                weight: float) -> None:
    """Move the codes of groups (rows of `code`, (groups, n)) in place; value i of group g
    dequantizes to `a[g, i] * table[code] + b[g, i]` and should sum along u like `target[g]`.
    `padded` is the type's table with NaN at both ends; with `unit`, levels are consecutive
    integers and a step is exactly `a`. `order` is range(n) by falling |u| (see `_candidates`)."""
    n_groups, n = code.shape
    heap, q, key, kept = _buffers(n, k)
    ig, ag, eg = np.empty(n, np.int32), np.empty(n, np.float32), np.empty(n, np.float32)
    for g in range(n_groups):
        r = 0.0  # the group's error component along u
        for i in range(n):
            ig[i] = code[g, i] + 1
            ag[i] = a[g, i]
            eg[i] = ag[i] * padded[ig[i]] + b[g, i] - target[g, i]
            r += np.float64(eg[i]) * np.float64(u[i])
        _settle_group(ig, ag, eg, u, order, padded, unit, r, tol, limit, passes, weight, heap, q, key, kept)
        for i in range(n):
            code[g, i] = ig[i] - 1


# columns settled together by `settle_columns`: one 64-byte line of each row of float32
TILE = 16


@numba.njit(cache=True, nogil=True, error_model="numpy")
def settle_columns(code: np.ndarray, sa: np.ndarray, sb: np.ndarray, per: int, target: np.ndarray, u: np.ndarray,
                   order: np.ndarray, padded: np.ndarray, unit: bool, tol: float, limit: float, k: int,
                   passes: int, weight: float) -> None:
    """`settle_rows` for groups that are the columns of row-major arrays: `code` and `target`
    (n, columns), and the value at (i, c) has step `sa[i, c // per]` and offset `sb[i, c // per]`
    (a block's sub-block scales; `per` and the number of columns are multiples of TILE).

    A column read alone touches one cache line per value, and a 1536-row block of columns
    does not stay in L2. So TILE columns are read at once, row by row (one line of `target`,
    one step and offset), and their errors and codes stored straight into one contiguous
    buffer per column; codes go back row by row. (numba unrolls these 16-column loops into
    scalar code: computing a TILE x TILE square first and transposing it was slower, and
    writing codes back column by column, one line per value, slower still.) On a 1.5B
    ffn_down the copying takes 0.035 s (squares: 0.060 s, column by column: 0.10 s)."""
    n, width = code.shape
    assert per % TILE == 0 and width % TILE == 0  # else a tile would straddle two sub-blocks
    heap, q, key, kept = _buffers(n, k)
    ig, eg = np.empty((TILE, n), np.int32), np.empty((TILE, n), np.float32)
    row = np.empty(TILE, np.float32)
    r = np.empty(TILE, np.float64)
    ag = np.empty(n, np.float32)
    for c0 in range(0, width, TILE):
        s = c0 // per
        r[:] = 0.0  # each column's error component along u, summed in row order
        for i in range(n):
            ag[i], b, ui = sa[i, s], sb[i, s], np.float64(u[i])
            for c in range(TILE):
                row[c] = ag[i] * padded[np.int32(code[i, c0 + c]) + 1] + b - target[i, c0 + c]
            for c in range(TILE):
                r[c] += np.float64(row[c]) * ui
            for c in range(TILE):
                eg[c, i] = row[c]
            for c in range(TILE):
                ig[c, i] = np.int32(code[i, c0 + c]) + 1
        for c in range(TILE):
            _settle_group(ig[c], ag, eg[c], u, order, padded, unit, r[c], tol, limit, passes, weight, heap, q, key,
                          kept)
        for i in range(n):
            for c in range(TILE):
                code[i, c0 + c] = ig[c, i] - 1


@numba.njit(cache=True)
def _buffers(n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A search's working arrays: the candidates' keys (room for the most a pass may keep, k:
    a max-heap while scanning, then sorted best first), every value's cost per gain and key,
    and room for the keys a threshold keeps."""
    return np.empty(min(k, n), np.int64), np.empty(n, np.float32), np.empty(n, np.int64), np.empty(n, np.int64)


@numba.njit(cache=True, error_model="numpy")
def _settle_group(ig: np.ndarray, ag: np.ndarray, eg: np.ndarray, u: np.ndarray, order: np.ndarray,
                  padded: np.ndarray, unit: bool, r: float, tol: float, limit: float, passes: int, weight: float,
                  heap: np.ndarray, q: np.ndarray, key: np.ndarray, kept: np.ndarray) -> None:
    """One group's search: padded-table indices `ig`, steps `ag` and errors `eg` of its values
    move in place; `r` is the group's error component along u. `heap` is the candidates'
    buffer, its length the most candidates a pass may keep; q, key and kept are scratch.

    A pass keeps few candidates (each costs a heap displacement) and doubles them, up to the
    buffer, after a pass that took all it kept: a group far from its target (Q2_K under a
    massive activation) then still settles within `passes`."""
    n = len(ig)
    k = min(START, len(heap))
    for _ in range(passes):
        size = abs(r)
        if not size > tol:
            break
        want = np.float32(-1.0) if r > 0 else np.float32(1.0)
        reach = np.float32(2 * size)
        filled = _candidates(ig, ag, eg, u, order, padded, unit, want, reach, q, key, kept, heap[:k])
        # heap sort: the worst goes to the end, leaving the candidates best first; then
        # each key is replaced by its value's index
        for end in range(filled - 1, 0, -1):
            heap[0], heap[end] = heap[end], heap[0]
            _sift_down(heap, 0, end)
        for c in range(filled):
            heap[c] &= 0xFFFFFFFF
        # take the first `count` candidates: count minimises cost spent + what the
        # component left costs (and, heavily, whatever of it exceeds the leak limit)
        count, cum, spent = 0, 0.0, 0.0
        over = max(size - limit, 0.0)
        best = weight * n * size * size + 1e6 * n * over * over
        for c in range(filled):
            i = heap[c]
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
        if count == k:
            k = min(2 * k, len(heap))
        for c in range(count):
            i = heap[c]
            delta, step = _move(ig[i], ag[i], u[i], want, padded, unit)
            ig[i] += step
            eg[i] += delta
            r += np.float64(delta) * np.float64(u[i])


@numba.njit(cache=True, error_model="numpy")
def _candidates(ig: np.ndarray, ag: np.ndarray, eg: np.ndarray, u: np.ndarray, order: np.ndarray,
                padded: np.ndarray, unit: bool, want: float, reach: float, q: np.ndarray, key: np.ndarray,
                kept: np.ndarray, heap: np.ndarray) -> int:
    """Fill the max-heap of keys with the best moves (at most its size) and return how many
    it holds: each move gains along u in the wanted sense, by less than `reach`; ranked by
    weight error added per unit gained, then by index in the group.

    First every value's cost per gain goes into q (NaN where it offers no move), and its key
    into `key`: the cost's float bits made to sort as integers, above the value's index, so
    that one integer comparison ranks two candidates (the heap's compares were branches on
    two fields, 40-50 ns a displacement). Both loops are without branches and vectorise.

    Then a threshold that about k + 2 * SAMPLE keys pass (`_threshold`); those are copied to
    `kept` without a branch, and the heap is built from them alone: a heap displacement
    costs 25-45 ns (its branches mispredict), and a scan of every key against the heap's
    worst took 25-100 of them per pass. Where too few keys pass (late passes, when few moves
    are small enough), `_fill_and_scan`. The result is the best `k` either way."""
    n, k = len(ig), len(heap)
    nan = np.float32(np.nan)
    if unit:
        for i in range(n):
            q[i] = _ratio(ig[i], ag[i], eg[i], u[i], want, reach, padded, True, nan)
    else:
        for i in range(n):
            q[i] = _ratio(ig[i], ag[i], eg[i], u[i], want, reach, padded, False, nan)
    bits = q.view(np.int32)
    for i in range(n):
        b = bits[i]  # negative floats: flip all but the sign, and the bits sort as the floats
        key[i] = (np.int64(b ^ ((b >> 31) & 0x7FFFFFFF)) << 32) + i if q[i] == q[i] else NONE
    t = _threshold(key, heap, min(k // SAMPLE + 2, k))  # the heap is its scratch
    count = 0
    if t != NONE:
        for i in range(n):
            kept[count] = key[i]
            count += key[i] <= t
    if count < k:
        return _fill_and_scan(key, order, heap)
    for c in range(k):
        _push(heap, c, kept[c])
    _keep_best(heap, kept[k:count])
    return k


@numba.njit(cache=True, inline="always", error_model="numpy")
def _threshold(key: np.ndarray, heap: np.ndarray, m: int) -> np.int64:
    """The m-th smallest of every SAMPLE-th key (`heap` is scratch), NONE if fewer are real:
    about m * SAMPLE keys are at or below it."""
    f, i = 0, 0
    while f < m and i < len(key):
        if key[i] != NONE:
            _push(heap, f, key[i])
            f += 1
        i += SAMPLE
    if f < m:
        return NONE
    _keep_best(heap[:m], key[i::SAMPLE])
    return heap[0]


@numba.njit(cache=True, error_model="numpy")
def _fill_and_scan(key: np.ndarray, order: np.ndarray, heap: np.ndarray) -> int:
    """The heap of the best keys without a threshold: filled from the values of largest |u|
    (`order`), where the cheapest moves per gain mostly are, so that it starts with good
    moves (on a 1.5B ffn_down, 34 displacements per pass instead of 122); then one scan in
    group order keeps the best."""
    n, k = len(key), len(heap)
    filled, j = 0, 0
    while filled < k and j < n:
        i = order[j]
        if key[i] != NONE:
            _push(heap, filled, key[i])
            filled += 1
        key[i] = NONE  # seen: the scan below skips it
        j += 1
    if filled == k:
        _keep_best(heap, key)
    return filled


@numba.njit(cache=True, inline="always", error_model="numpy")
def _push(heap: np.ndarray, size: int, k: np.int64) -> None:
    """Add k to the max-heap heap[:size] (it becomes heap[:size + 1])."""
    at = size
    while at > 0 and heap[(at - 1) // 2] < k:
        heap[at] = heap[(at - 1) // 2]
        at = (at - 1) // 2
    heap[at] = k


@numba.njit(cache=True, inline="always", error_model="numpy")
def _keep_best(heap: np.ndarray, keys: np.ndarray) -> None:
    """Let each of `keys` replace the full heap's worst if it is better: a branch rarely taken."""
    worst = heap[0]
    for i in range(len(keys)):
        if keys[i] < worst:
            heap[0] = keys[i]
            _sift_down(heap, 0, len(heap))
            worst = heap[0]


@numba.njit(cache=True, inline="always", error_model="numpy")
def _ratio(j: int, a: float, e: float, ui: float, want: float, reach: float, padded: np.ndarray, unit: bool,
           nan: float) -> float:
    """A value's move as weight error added per unit of gain along u, or NaN if it gains
    nothing in the wanted sense or more than `reach`."""
    delta, _ = _move(j, a, ui, want, padded, unit)
    gain = (delta * ui) * want
    # + 0.0 turns -0.0 into 0.0, so that both get the same key
    return delta * (e + e + delta) / gain + np.float32(0.0) if gain > 0 and gain < reach else nan


@numba.njit(cache=True, nogil=True, error_model="numpy")
def compensate_columns(codes: np.ndarray, a: np.ndarray, b: np.ndarray, sub: np.ndarray, w: np.ndarray,
                       errs: np.ndarray, chol: np.ndarray, u: np.ndarray, order: np.ndarray, padded: np.ndarray,
                       first: int, p0: int, p1: int, tol: float, limit: float, k: int, passes: int,
                       weight: float) -> None:
    """Columns p0..p1 of every column block, one after the other, as `rounding.keep_edit_compensated`
    describes: `w` and `codes` (blocks, width, rows), act-ordered; column p of block blk has the
    rows' steps and offsets `a[blk, sub[blk, p]]` and `b[...]` ((blocks, sub-blocks, rows): a
    sub-block's columns share them, so they are not spread per column). For each: the carried
    target is clipped to the scales' range (its component along u kept), rounded to the nearest
    code, settled along u; its error, without its component along u and divided by U_pp, goes to
    `errs[:, p - p0]` and to the batch's later columns (the rest is one matmul, left to numpy)."""
    nb, width, n = w.shape
    top = len(padded) - 3  # the last code
    heap, scratch, key, kept = _buffers(n, k)
    t, code, e = np.empty(n, np.float32), np.empty(n, np.int32), np.empty(n, np.float32)
    uu = np.float32(0.0)
    for i in range(n):
        uu += u[i] * u[i]
    for p in range(p0, p1):
        for blk in range(nb):
            ap, bp, wp = a[blk, sub[blk, p]], b[blk, sub[blk, p]], w[blk, p]
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
            _settle_group(code, ap, e, u, order, padded, True, r, tol, limit, passes, weight, heap, scratch, key, kept)
            for i in range(n):
                codes[blk, p, i] = code[i] - 1
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
