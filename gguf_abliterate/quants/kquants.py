"""K-quant quantizers (Q2_K to Q6_K), bit-exact with ggml's `quantize_row_*_ref`.

ggml's reference quantizers are what `ggml_quantize_chunk` runs without an importance matrix
(what llama-quantize does when given none). To match them byte for byte:

- every sum over a sub-block is taken strictly in order, in float32, as the C loops do
  (`ggml_math.ordered_sum`); numpy's `sum` is pairwise and rounds differently;
- `nearest_int` is ggml's magic-number rounding (`ggml_math.nearest_int`): round-half-to-even for
  ordinary values, but inf gives -4194304 and NaN 0 (the overflow of `15/(max-min)` on
  denormal-range input), which `np.rint` does not reproduce;
- expressions are evaluated in the C order, e.g. `w*l*x` is `(w*l)*x`, constants in float32;
- `make_qkx2_quants` updates `min` inside its search loop, and later steps use the new min.

Everything is vectorised over sub-blocks: arrays are laid out (elements, sub-blocks) so that
each of the 16 or 32 ordered additions is one contiguous vector operation.
"""

from __future__ import annotations

import numpy as np

from gguf_abliterate.quants.bits import pack_bitplanes, pack_crumbs, pack_nibbles
from gguf_abliterate.quants.ggml_math import F32, GROUP_MAX_EPS, columns, first_max_abs, nearest_int, ordered_sum

QK_K = 256


_RINT_SAFE = F32(4.0e6)  # below 2^22 ggml's nearest_int is exactly np.rint


def _levels_into(v: np.ndarray, bound: np.ndarray, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
    """clip(nearest_int(v), lo, hi) into `out`, fast.

    `bound` bounds |v| per column; np.rint is used where it is below 2^22 (where it equals
    ggml's nearest_int), the exact emulation only on the rare columns where it is not
    (non-finite or huge scales).
    """
    np.rint(v, out=out)
    np.clip(out, lo, hi, out=out)
    odd = ~(bound < _RINT_SAFE)
    if odd.any():
        out[:, odd] = np.clip(nearest_int(v[:, odd]), lo, hi)
    return out


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants on columns of x (n, m): (scale, -min, L).

    Instead of copying the codes of every improving step, it keeps the (iscale, min) that
    produced them and recomputes the codes once at the end: same codes, far fewer passes.
    Work arrays are reused in place, and `x - min` is recomputed only when a min changed.
    """
    xmin, mx = x.min(axis=0), x.max(axis=0)
    mn = np.minimum(xmin, F32(0))
    sum_w = ordered_sum(w)
    sum_x = ordered_sum(w * x)
    flat = mx == mn
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = F32(nmax) / np.where(flat, F32(1), mx - mn)
    scale = F32(1) / iscale
    xm, dev, lv, tmp = (np.empty_like(x) for _ in range(4))

    def levels(iscale: np.ndarray, mn: np.ndarray, xm: np.ndarray) -> np.ndarray:
        np.multiply(xm, iscale, out=dev)
        bound = np.abs(iscale) * np.maximum(mx - mn, np.abs(xmin - mn))
        return _levels_into(dev, bound, 0, nmax, lv)

    def error_sum(scale: np.ndarray, mn: np.ndarray) -> np.ndarray:
        np.multiply(lv, scale, out=tmp)
        np.add(tmp, mn, out=tmp)
        np.subtract(tmp, x, out=tmp)
        if use_mad:
            np.abs(tmp, out=tmp)
        else:
            np.multiply(tmp, tmp, out=tmp)
        np.multiply(tmp, w, out=tmp)
        return ordered_sum(tmp)

    np.subtract(x, mn, out=xm)
    levels(iscale, mn, xm)
    best = error_sum(scale, mn)
    best_iscale, best_mn = iscale.copy(), mn.copy()
    span = np.where(flat, F32(1), mx - mn)
    for step in range(nstep + 1):
        factor = F32(rmin) + F32(rdelta) * F32(step) + F32(nmax)
        iscale = factor / span
        levels(iscale, mn, xm)
        np.multiply(w, lv, out=tmp)  # w*l
        sum_l = ordered_sum(tmp)
        np.multiply(tmp, lv, out=dev)
        sum_l2 = ordered_sum(dev)
        np.multiply(tmp, x, out=dev)
        sum_xl = ordered_sum(dev)
        d = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / d
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d
        positive = np.flatnonzero(this_min > 0)
        this_min[positive] = 0
        this_scale[positive] = sum_xl[positive] / sum_l2[positive]
        cur = error_sum(this_scale, this_min)
        better = np.flatnonzero((d > 0) & (cur < best) & ~flat)
        if better.size:
            best_iscale[better] = iscale[better]
            best_mn[better] = mn[better]
            best[better] = cur[better]
            scale[better] = this_scale[better]
            mn[better] = this_min[better]
            span[better] = mx[better] - mn[better]
            xm[:, better] = x[:, better] - mn[better]
    np.subtract(x, best_mn, out=xm)
    L = levels(best_iscale, best_mn, xm).copy()
    L[:, flat] = 0
    scale[flat] = 0
    return scale, -mn, L


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 and no weights, on columns of x (n, m): (scale, L).

    Like make_qkx2_quants, it remembers the best iscale and computes the codes once.
    """
    cols = np.arange(x.shape[1])
    mx = x[np.abs(x).argmax(axis=0), cols]
    amax = np.abs(mx)
    zero = amax < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    w = x * x
    wx = w * x
    lv, tmp = np.empty_like(x), np.empty_like(x)

    def levels(iscale: np.ndarray) -> np.ndarray:
        np.multiply(x, iscale, out=tmp)
        return _levels_into(tmp, np.abs(iscale) * amax, -nmax, nmax - 1, lv)

    def trial(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        levels(iscale)
        np.multiply(wx, lv, out=tmp)
        sumlx = ordered_sum(tmp)
        np.multiply(w, lv, out=tmp)
        np.multiply(tmp, lv, out=tmp)
        return sumlx, ordered_sum(tmp)

    best_iscale = F32(-nmax) / mx
    sumlx, suml2 = trial(best_iscale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F32(nmax) + F32(0.1) * F32(step)) / mx
        sumlx, suml2 = trial(iscale)
        with np.errstate(divide="ignore", invalid="ignore"):
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = np.where(better, sumlx / suml2, scale)
        best_iscale = np.where(better, iscale, best_iscale)
        best = np.where(better, scale * sumlx, best)
    L = levels(best_iscale) + nmax
    L[:, zero] = 0
    return np.where(zero, F32(0), scale), L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_q3_quants with do_rmse on columns of x (n, m): (scale, L).

    Its coordinate descent is sequential over elements; C stops after a pass that changes
    nothing, which is the same as running all five passes (a pass without change leaves the
    state, and so every later pass, unchanged).
    """
    cols = np.arange(x.shape[1])
    mx = x[np.abs(x).argmax(axis=0), cols]
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, F32(1), mx)
    L = np.clip(nearest_int((F32(-nmax) / mx) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = ordered_sum(wx * L)
    suml2 = ordered_sum(w * L * L)
    for _ in range(5):
        for i in range(x.shape[0]):
            li = L[i]
            slx = sumlx - wx[i] * li
            sl2 = suml2 - w[i] * li * li
            with np.errstate(divide="ignore", invalid="ignore"):
                new = np.clip(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
            slx2 = slx + wx[i] * new
            sl22 = sl2 + w[i] * new * new
            take = (slx > 0) & (new != li) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = np.where(take, new, li)
            sumlx = np.where(take, slx2, sumlx)
            suml2 = np.where(take, sl22, suml2)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0))
    return np.where(zero, F32(0), scale), np.where(zero, F32(0), L + nmax)


def quantize_q2_k(x: np.ndarray) -> np.ndarray:
    """float32 (nb, 256) -> Q2_K blocks (nb, 84): scales[16], qs[64], d, dmin."""
    nb = x.shape[0]
    sub = columns(x, 16)
    scales, mins, L = make_qkx2_quants(sub, np.abs(sub), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    L = L.T.reshape(nb, 16, 16)
    max_scale = np.fmax(np.fmax.reduce(scales, axis=1), F32(0))
    max_min = np.fmax(np.fmax.reduce(mins, axis=1), F32(0))
    q4 = F32(15)
    with np.errstate(divide="ignore", invalid="ignore"):
        ls = np.where((max_scale > 0)[:, None], nearest_int((q4 / max_scale)[:, None] * scales), F32(0))
        lm = np.where((max_min > 0)[:, None], nearest_int((q4 / max_min)[:, None] * mins), F32(0))
    # uint8 stores: the scale code, then |= the min code << 4, both wrapping
    sc = ((ls.astype(np.int64) & 0xFF) | ((lm.astype(np.int64) << 4) & 0xFF)).astype(np.uint8)
    d16 = np.where(max_scale > 0, max_scale / q4, F32(0)).astype(np.float16)
    dmin16 = np.where(max_min > 0, max_min / q4, F32(0)).astype(np.float16)
    d = d16.astype(F32)[:, None] * (sc & 0xF).astype(F32)
    dm = dmin16.astype(F32)[:, None] * (sc >> 4).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(nearest_int((x.reshape(nb, 16, 16) + dm[:, :, None]) / d[:, :, None]), 0, 3)
    L = np.where((d != 0)[:, :, None], fresh, L).astype(np.uint8).reshape(nb, QK_K)
    return np.concatenate([sc, pack_crumbs(L), d16.view(np.uint8).reshape(nb, 2),
                           dmin16.view(np.uint8).reshape(nb, 2)], 1)


def _per16(x: np.ndarray, make) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Run a scale search over the 16-value sub-blocks: scales (nb, 16), codes (nb, 16, 16)."""
    scales, L = make(columns(x, 16))
    return scales.reshape(x.shape[0], 16), L.T.reshape(x.shape[0], 16, 16)


def quantize_q3_k(x: np.ndarray) -> np.ndarray:
    """float32 (nb, 256) -> Q3_K blocks (nb, 110): hmask[32], qs[64], scales[12], d."""
    nb = x.shape[0]
    scales, L = _per16(x, lambda sub: make_q3_quants(sub, 4))
    _, max_scale = first_max_abs(scales)
    has = max_scale != 0
    with np.errstate(divide="ignore"):
        iscale = F32(-32) / np.where(has, max_scale, F32(1))
    raw = nearest_int(iscale[:, None] * scales).astype(np.int64)
    l6 = np.clip(((raw + 128) & 0xFF) - 128, -32, 31) + 32  # int8 store, then clamp
    l6 = np.where(has[:, None], l6, 0)
    packed = np.zeros((nb, 12), np.int64)
    packed[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    hi = l6 >> 4  # (nb, 16): two bits each into scales[8 + j%4] at 2*(j//4)
    for j in range(16):
        packed[:, 8 + j % 4] |= hi[:, j] << (2 * (j // 4))
    d16 = np.where(has, F32(1) / iscale, F32(0)).astype(np.float16)
    d = d16.astype(F32)[:, None] * np.where(has[:, None], l6 - 32, -32).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(nearest_int(x.reshape(nb, 16, 16) / d[:, :, None]), -4, 3) + 4
    L = np.where((d != 0)[:, :, None], fresh, L).astype(np.uint8).reshape(nb, QK_K)
    hmask = pack_bitplanes((L > 3).astype(np.uint8))
    L = np.where(L > 3, L - 4, L)
    return np.concatenate([hmask, pack_crumbs(L), packed.astype(np.uint8), d16.view(np.uint8).reshape(nb, 2)], 1)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins (nb, 8) into ggml's 12-byte K_SCALE layout."""
    out = np.zeros((ls.shape[0], 12), np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    return out


def _qkx_superblocks(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):  # type: ignore[no-untyped-def]
    """Shared Q4_K/Q5_K steps: per-32 scales and mins, their 6-bit codes, d/dmin, final codes."""
    nb = x.shape[0]
    sub = columns(x, 32)  # (32, sub-blocks)
    sum_x2 = ordered_sum(sub * sub)
    av_x = np.sqrt(sum_x2 / F32(32))
    weights = av_x + np.abs(sub)
    scales, mins, L = make_qkx2_quants(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    L = L.T.reshape(nb, 8, 32)
    # C keeps a running max from 0 with `>`, which passes over NaN: fmax does too
    max_scale = np.fmax(np.fmax.reduce(scales, axis=1), F32(0))
    max_min = np.fmax(np.fmax.reduce(mins, axis=1), F32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
        inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
    # C stores nearest_int() in a uint8 (wrapping negatives), then takes MIN(63, .)
    ls = np.minimum(nearest_int(inv_scale[:, None] * scales).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    lm = np.minimum(nearest_int(inv_min[:, None] * mins).astype(np.int64) & 0xFF, 63).astype(np.uint8)
    d16 = (max_scale / F32(63)).astype(np.float16)
    dmin16 = (max_min / F32(63)).astype(np.float16)
    d = d16.astype(F32)[:, None] * ls.astype(F32)
    dm = dmin16.astype(F32)[:, None] * lm.astype(F32)
    xs = x.reshape(nb, 8, 32)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(nearest_int((xs + dm[:, :, None]) / d[:, :, None]), 0, nmax)
    L = np.where((d != 0)[:, :, None], fresh, L).astype(np.uint8).reshape(nb, QK_K)
    return d16, dmin16, _pack_scales_k4(ls, lm), L


def quantize_q4_k(x: np.ndarray) -> np.ndarray:
    """float32 (nb, 256) -> Q4_K blocks (nb, 144): d, dmin, scales[12], qs[128]."""
    d16, dmin16, scales, L = _qkx_superblocks(x, 15, -1.0, 0.1, 20)
    nb = x.shape[0]
    return np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2), scales,
                           pack_nibbles(L, 32)], 1)


def quantize_q5_k(x: np.ndarray) -> np.ndarray:
    """float32 (nb, 256) -> Q5_K blocks (nb, 176): d, dmin, scales[12], qh[32], qs[128]."""
    d16, dmin16, scales, L = _qkx_superblocks(x, 31, -0.5, 0.1, 15)
    nb = x.shape[0]
    return np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2),
                           scales, pack_bitplanes(L >> 4), pack_nibbles(L & 0xF, 32)], 1)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """float32 (nb, 256) -> Q6_K blocks (nb, 210): ql[128], qh[64], scales[16] (int8), d."""
    nb = x.shape[0]
    scales, L = _per16(x, lambda sub: make_qx_quants(sub, 32))
    max_abs, max_scale = first_max_abs(scales)
    empty = max_abs < GROUP_MAX_EPS
    with np.errstate(divide="ignore"):
        iscale = F32(-128) / np.where(empty, F32(1), max_scale)
    d16 = (F32(1) / iscale).astype(np.float16)
    sc = np.minimum(nearest_int(iscale[:, None] * scales), 127).astype(np.int8)
    d = d16.astype(F32)[:, None] * sc.astype(F32)
    xs = x.reshape(nb, 16, 16)
    with np.errstate(divide="ignore", invalid="ignore"):
        fresh = np.clip(nearest_int(xs / d[:, :, None]), -32, 31) + 32
    L = np.where((d != 0)[:, :, None], fresh, L).astype(np.uint8).reshape(nb, QK_K)
    blocks = np.concatenate([pack_nibbles(L & 0xF, 64), pack_crumbs(L >> 4), sc.view(np.uint8),
                             d16.view(np.uint8).reshape(nb, 2)], 1)
    blocks[empty] = 0
    return blocks
