"""Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 quantizers, bit-exact with ggml's `quantize_row_*_ref`,
laid out for speed.

ggml's C does a 32-value block in a few nanoseconds. numpy, given blocks as rows of 32,
spends about 30 ns per block on any reduction along the row (the maximum) and on any
per-block broadcast (the scale), because each row is a separate inner loop; gguf-py's port
runs at a quarter of ggml's speed for that reason. So each chunk of blocks is first copied to
*lanes*: an (8, blocks, 4) array whose row r holds values 4r..4r+3 of every block (one 16-byte
transpose, about as costly as one pass of the data). There, a block maximum is a reduction
over the 8 rows plus three strided maxima, and a scale is spread over 4 contiguous lanes, so
every pass runs at memory speed. Codes are packed four to a 32-bit word and transposed back.

Exactness notes, each checked against ggml's C in tests/test_quants.py:

- The block maximum is taken on the float bits as integers: the signed maximum gives the
  largest positive value, the unsigned maximum the negative value of largest magnitude (both
  exact, and NaN or Inf show up as magnitudes at or above 0x7f800000, so these quantizers
  report non-finite input themselves). Q4_0/Q5_0 want the *first* value of largest magnitude;
  only blocks holding both +m and -m need that settled, which they are one by one.
- Q4_1/Q5_1 take the float minimum and maximum, also the first of equal values in ggml:
  that only shows for a zero extreme (+0.0 == -0.0), settled from the block's first zero.
- ggml's `roundf` (Q8_0) rounds half away from zero. trunc(|v| + 0.49999997) is roundf(|v|)
  for every float32 below 2^23 (the largest float below 0.5 is the one case where adding 0.5
  would round up to 1), and the sign is put back before the truncating cast.
- `(int8_t)(x*id + 8.5f)` is a float add then a truncating cast, so it is done the same way;
  codes never exceed 16 (or 32), so MIN(15, q) is q minus its bit 4, four codes a word.
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
LOAD = 1024  # blocks per transposing copy: its source stays in L1/L2 while 8 passes read it
CHUNK = 8192  # blocks per pass: the lanes and codes of a chunk stay in a 2 MB L2 cache
NON_FINITE = "cannot quantize NaN or Inf values"
_MAGNITUDE = np.int32(0x7FFFFFFF)
_SIGN = np.int32(-(2**31))
_ZERO = np.int32(0)
_NONFINITE = np.int32(0x7F800000)
_HALF_DOWN = np.nextafter(F32(0.5), F32(0))  # 0.49999997
_BYTE_LSB = np.uint32(0x01010101)
_LOW_NIBBLES = np.uint32(0x0F0F0F0F)
_GATHER_BYTE_LSB = np.uint32(0x01020408)  # (w & 0x01010101) * this >> 24: byte k's bit 0 -> bit k


class Lanes:
    """Work arrays for one chunk, reused chunk after chunk: glibc gives arrays of 128 KiB and
    more fresh pages from mmap, and faulting them in costs as much as a pass over the data."""

    def __init__(self, blocks: int = CHUNK):
        self.values = np.empty((8, blocks, 4), F32)
        self.scratch = np.empty((8, blocks, 4), F32)
        self.codes = np.empty((8, blocks, 4), np.int8)
        self.lane_max = np.empty((blocks, 4), np.int32)
        self.spread = np.empty((blocks, 2), np.uint64)
        self.words = np.empty((2, 4, blocks), np.uint32)
        self.top = np.empty((8, blocks), np.uint32)

    def load(self, blocks: np.ndarray) -> np.ndarray:
        """Copy (n, 32) blocks into lanes (8, n, 4)."""
        n = blocks.shape[0]
        values = self.values[:, :n]
        dst = values.view("V16").reshape(8, n)
        src = blocks.view("V16")
        for i in range(0, n, LOAD):
            np.copyto(dst[:, i : i + LOAD], src[i : i + LOAD].T)
        return values

    def block_reduce(self, a: np.ndarray, op: np.ufunc) -> np.ndarray:
        """Per block, `op` (np.maximum or np.minimum) over the 32 lanes of an (8, n, 4) array."""
        m = self.lane_max[: a.shape[1]].view(a.dtype)
        op.reduce(a, axis=0, out=m)
        return op(op(m[:, 0], m[:, 1]), op(m[:, 2], m[:, 3]))

    def spread4(self, v: np.ndarray) -> np.ndarray:
        """(n,) float32 -> (n, 4), the value in each of a block's 4 lanes."""
        two = v.view(np.uint32).astype(np.uint64) * np.uint64(0x100000001)
        out = self.spread[: v.shape[0]]
        out[:, 0] = two
        out[:, 1] = two
        return out.view(F32).reshape(-1, 4)

    def words_of(self, codes: np.ndarray, bias: np.float32 | None = None) -> np.ndarray:
        """Lanes (8, n, 4) float32 (plus `bias`: a float32 add, then C's truncating cast to int8,
        in one call that casts through a small buffer) as (8, n) 32-bit words of int8 codes."""
        n = codes.shape[1]
        q = self.codes[:, :n]
        if bias is None:
            np.copyto(q, codes, casting="unsafe")
        else:
            np.add(codes, bias, out=q, casting="unsafe")
        return q.view(np.uint32).reshape(8, n)


def _inverse(d: np.ndarray) -> np.ndarray:
    """ggml's `d ? 1.0f/d : 0.0f` (denormal d may still give inf, as in C: callers silence
    numpy's overflow and divide warnings once for the whole tensor)."""
    inv = F32(1) / d
    inv[d == 0] = 0
    return inv


def _store_half(out: np.ndarray, d: np.ndarray) -> None:
    """fp16 d into the first two bytes of each row of `out` (GGML_FP32_TO_FP16 rounds to even)."""
    out.view(np.uint16)[:, 0] = d.astype(np.float16).view(np.uint16)


def _store_words(out: np.ndarray, words: np.ndarray) -> None:
    """(R, n) 32-bit words into (n, 4R) bytes of blocks, a row at a time: one long strided copy
    each, where a transposing copy would loop over 4-word rows."""
    dst = out.view(np.uint32)
    for r, row in enumerate(words):
        dst[:, r] = row


def _check_finite(magnitude_bits: np.ndarray) -> None:
    if magnitude_bits.max() >= _NONFINITE:
        raise ValueError(NON_FINITE)


def _first_absmax(lanes: Lanes, values: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Per block, the first value of largest magnitude (ggml's `max` in Q4_0/Q5_0).

    With P the largest positive value (+0 if none) and N the negative one of largest magnitude
    (P if none), that is max(P, -N) with the sign of P + N, in a few whole-array float ops; a
    tie (+a and -a both present) is settled by position, block by block.
    """
    bits = values.view(np.int32)
    pos = lanes.block_reduce(bits, np.maximum)  # largest positive value's bits; < 0 if none
    neg = lanes.block_reduce(bits.view(np.uint32), np.maximum).view(np.int32)  # sign set if any negative
    np.maximum(pos, _ZERO, out=pos)
    p, n = pos.view(F32), neg.view(F32)
    amax = np.negative(n)
    np.maximum(amax, p, out=amax)
    if not math.isfinite(amax.max()):  # NaN propagates through both maxima
        raise ValueError(NON_FINITE)
    total = np.add(p, n, out=n)
    ties = np.flatnonzero(total == 0)
    ties = ties[p[ties] != 0]  # +a and -a in one block (all-zero blocks come out +0.0 already)
    m = np.copysign(amax, total, out=amax)
    for i in ties:
        row = blocks[i]
        m[i] = row[np.argmax(np.abs(row))]
    return m


def _min_max(lanes: Lanes, values: np.ndarray, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block, ggml's `min` and `max` (Q4_1/Q5_1): the first value that compares lowest or
    highest, which only matters for a zero extreme (+0.0 and -0.0 compare equal), settled by
    the first zero of those blocks."""
    hi = lanes.block_reduce(values, np.maximum)
    lo = lanes.block_reduce(values, np.minimum)
    if not (np.isfinite(hi.max()) and np.isfinite(lo.min())):  # both propagate NaN
        raise ValueError(NON_FINITE)
    zero = np.flatnonzero((hi == 0) | (lo == 0))
    if zero.size:
        rows = blocks[zero]
        first = rows[np.arange(zero.size), np.argmax(rows == 0, axis=1)]
        hi[zero] = np.where(hi[zero] == 0, first, hi[zero])
        lo[zero] = np.where(lo[zero] == 0, first, lo[zero])
    return lo, hi


def _codes(lanes: Lanes, values: np.ndarray, d: np.ndarray, bias: float, top: int | None,
           low: np.ndarray | None = None) -> np.ndarray:
    """(8, n) words of ggml's codes `(int8_t)((x - low) * id + bias)` with id = 1/d (0 if d is 0),
    then MIN(2**top - 1, code) if `top` is given: a code never exceeds 2**top, so that is the code
    minus its bit `top`."""
    if low is not None:
        np.subtract(values, lanes.spread4(low), out=values)
    np.multiply(values, lanes.spread4(_inverse(d)), out=values)
    words = lanes.words_of(values, F32(bias))
    if top is not None:
        over = lanes.top[:, : words.shape[1]]
        np.right_shift(words, np.uint32(top), out=over)
        over &= _BYTE_LSB
        words -= over
    return words


def _store_nibbles(out: np.ndarray, words: np.ndarray, lanes: Lanes, wide: bool = False) -> None:
    """16 bytes: code j in the low nibble of byte j, code j+16 in the high one (only the low 4
    bits of `wide` codes)."""
    packed = lanes.words[0, :, : words.shape[1]]
    if wide:
        low = lanes.words[1, :, : words.shape[1]]
        np.bitwise_and(words[4:], _LOW_NIBBLES, out=packed)
        packed <<= 4
        np.bitwise_and(words[:4], _LOW_NIBBLES, out=low)
        packed |= low
    else:
        np.left_shift(words[4:], 4, out=packed)
        packed |= words[:4]
    _store_words(out, packed)


def _store_high_bits(out: np.ndarray, words: np.ndarray, lanes: Lanes) -> None:
    """4 bytes, a little-endian word whose bit j is code j's bit 4 (Q5_0, Q5_1)."""
    bits = lanes.top[:, : words.shape[1]]
    np.right_shift(words, np.uint32(4), out=bits)
    bits &= _BYTE_LSB
    bits *= _GATHER_BYTE_LSB
    bits >>= np.uint32(24)  # row r: the high bits of codes 4r..4r+3
    bits <<= (np.arange(8, dtype=np.uint32) * 4)[:, None]
    _store_words(out, np.bitwise_or.reduce(bits, axis=0)[None])


def quantize_q4_0(blocks: np.ndarray, out: np.ndarray, lanes: Lanes) -> None:
    """(n, 32) float32 -> out (n, 18): fp16 d = max/-8, 16 nibble bytes of MIN(15, x/d + 8.5)."""
    values = lanes.load(blocks)
    d = _first_absmax(lanes, values, blocks) / F32(-8)
    words = _codes(lanes, values, d, 8.5, 4)
    _store_half(out, d)
    _store_nibbles(out[:, 2:], words, lanes)


def quantize_q5_0(blocks: np.ndarray, out: np.ndarray, lanes: Lanes) -> None:
    """(n, 32) -> out (n, 22): fp16 d = max/-16, high bits, nibbles of MIN(31, x/d + 16.5)."""
    values = lanes.load(blocks)
    d = _first_absmax(lanes, values, blocks) / F32(-16)
    words = _codes(lanes, values, d, 16.5, 5)
    _store_half(out, d)
    _store_high_bits(out[:, 2:6], words, lanes)
    _store_nibbles(out[:, 6:], words, lanes, wide=True)


def quantize_q4_1(blocks: np.ndarray, out: np.ndarray, lanes: Lanes) -> None:
    """(n, 32) -> out (n, 20): fp16 d = (max-min)/15, fp16 min, nibbles of MIN(15, (x-min)/d + .5)."""
    values = lanes.load(blocks)
    lo, hi = _min_max(lanes, values, blocks)
    d = (hi - lo) / F32(15)
    words = _codes(lanes, values, d, 0.5, 4, lo)
    _store_half(out, d)
    _store_half(out[:, 2:], lo)
    _store_nibbles(out[:, 4:], words, lanes)


def quantize_q5_1(blocks: np.ndarray, out: np.ndarray, lanes: Lanes) -> None:
    """(n, 32) -> out (n, 24): fp16 d = (max-min)/31, fp16 min, high bits, nibbles of
    (uint8_t)((x-min)/d + .5) (no MIN here in ggml)."""
    values = lanes.load(blocks)
    lo, hi = _min_max(lanes, values, blocks)
    d = (hi - lo) / F32(31)
    words = _codes(lanes, values, d, 0.5, None, lo)
    _store_half(out, d)
    _store_half(out[:, 2:], lo)
    _store_high_bits(out[:, 4:8], words, lanes)
    _store_nibbles(out[:, 8:], words, lanes, wide=True)


def quantize_q8_0(blocks: np.ndarray, out: np.ndarray, lanes: Lanes) -> None:
    """(n, 32) -> out (n, 34): fp16 d = amax/127, then 32 int8 roundf(x/d)."""
    n = blocks.shape[0]
    values = lanes.load(blocks)
    bits = values.view(np.int32)
    mag = lanes.scratch[:, :n]
    np.bitwise_and(bits, _MAGNITUDE, out=mag.view(np.int32))
    amax = lanes.block_reduce(mag.view(np.int32), np.maximum)
    _check_finite(amax)
    d = amax.view(F32) / F32(127)
    np.multiply(mag, lanes.spread4(_inverse(d)), out=mag)
    mag += _HALF_DOWN
    np.bitwise_and(bits, _SIGN, out=bits)
    np.bitwise_or(mag.view(np.int32), bits, out=mag.view(np.int32))
    words = lanes.words_of(mag)
    _store_half(out, d)
    _store_words(out[:, 2:], words)
