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

Each returns the blocks with every field but the codes, and the codes (nb, 256) as uint8: the
type's `put` (`types.py`) packs them, so each layout's packing is written once, and aware
rounding can move the codes before they are packed.

Everything is vectorised over sub-blocks: arrays are laid out (elements, sub-blocks) so that
each of the 16 or 32 ordered additions is one contiguous vector operation. The trial-scale
searches of Q2_K and Q4_K to Q6_K, most of their time, are compiled (`scale_search`), with the
same layout and the same order of operations.
"""

from __future__ import annotations

import numpy as np

from gguf_abliterate.quants.ggml_math import F32, GROUP_MAX_EPS, columns, first_max_abs, nearest_int, ordered_sum

QK_K = 256


def _blocks(size: int, *fields: tuple[int, np.ndarray]) -> np.ndarray:
    """Blocks of `size` bytes, zero but for the (offset, uint8 (nb, n) or float16 (nb,)) fields."""
    nb = len(fields[0][1])
    out = np.zeros((nb, size), np.uint8)
    for at, field in fields:
        raw = field.view(np.uint8).reshape(nb, -1)
        out[:, at : at + raw.shape[1]] = raw
    return out


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's make_qkx2_quants on columns of x (n, m): (scale, -min, L).

    numpy takes each column's start (min, max, weighted sums: one cheap pass each); the trial
    scales, most of a K-quant's time, run compiled (`scale_search`).
    """
    from gguf_abliterate.quants.scale_search import qkx2_search  # numba: imported only when quantizing

    xmin, mx = x.min(axis=0), x.max(axis=0)
    mn = np.minimum(xmin, F32(0))
    scale, mins, L = np.empty_like(mx), np.empty_like(mx), np.empty_like(x)
    qkx2_search(x, w, xmin, mx, mn, ordered_sum(w), ordered_sum(w * x), mx == mn, nmax, rmin, rdelta, nstep,
                use_mad, scale, mins, L)
    return scale, -mins, L


def make_qx_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's make_qx_quants with rmse_type 1 and no weights, on columns of x (n, m): (scale, L).

    numpy finds each column's first value of largest magnitude; the trials run compiled.
    """
    from gguf_abliterate.quants.scale_search import qx_search

    cols = np.arange(x.shape[1])
    mx = x[np.abs(x).argmax(axis=0), cols]
    amax = np.abs(mx)
    zero = amax < GROUP_MAX_EPS
    scale, L = np.empty_like(mx), np.empty_like(x)
    qx_search(x, np.where(zero, F32(1), mx), amax, zero, nmax, scale, L)
    return scale, L


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


def quantize_q2_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (nb, 256) -> Q2_K blocks (nb, 84): scales[16], qs[64] (left zero), d, dmin; and the codes."""
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
    return _blocks(84, (0, sc), (80, d16), (82, dmin16)), L


def _per16(x: np.ndarray, make) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """Run a scale search over the 16-value sub-blocks: scales (nb, 16), codes (nb, 16, 16)."""
    scales, L = make(columns(x, 16))
    return scales.reshape(x.shape[0], 16), L.T.reshape(x.shape[0], 16, 16)


def quantize_q3_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (nb, 256) -> Q3_K blocks (nb, 110): hmask[32], qs[64] (both left zero), scales[12], d;
    and the codes (the low two bits go to qs, the third to hmask)."""
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
    return _blocks(110, (96, packed.astype(np.uint8)), (108, d16)), L


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


def quantize_q4_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (nb, 256) -> Q4_K blocks (nb, 144): d, dmin, scales[12], qs[128] (left zero); and the codes."""
    d16, dmin16, scales, L = _qkx_superblocks(x, 15, -1.0, 0.1, 20)
    return _blocks(144, (0, d16), (2, dmin16), (4, scales)), L


def quantize_q5_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (nb, 256) -> Q5_K blocks (nb, 176): d, dmin, scales[12], qh[32], qs[128] (both left
    zero); and the codes."""
    d16, dmin16, scales, L = _qkx_superblocks(x, 31, -0.5, 0.1, 15)
    return _blocks(176, (0, d16), (2, dmin16), (4, scales)), L


def quantize_q6_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (nb, 256) -> Q6_K blocks (nb, 210): ql[128], qh[64] (both left zero), scales[16]
    (int8), d; and the codes."""
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
    # ggml zeroes a block whose values are all (near) zero, codes included
    L[empty] = 0
    blocks = _blocks(210, (192, sc.view(np.uint8)), (208, d16))
    blocks[empty] = 0
    return blocks, L
