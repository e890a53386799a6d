"""The integer codes inside quantized blocks: read them, write them back, and what they are worth.

Each value ggml dequantizes is `a * table[code] + b`, with `a` and `b` fixed per (sub-)block
by the scale bytes. Quantization-aware rounding keeps the scales ggml chose and moves single
codes, so it needs each type's code bit layout; `levels` recovers a and b through
`quants.dequantize`. The common types also decode their scales (`steps`), and then that is
how `quants.dequantize` reads them: codes times steps, in ggml's own order of operations.
One small class per type, registered by type.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gguf_abliterate import quants
from gguf_abliterate.quants.bits import (bitplanes, crumbs, low_bits32, nibbles, pack_bitplanes, pack_crumbs,
                                         pack_low_bits32, pack_nibbles)
from gguf_abliterate.quants.iquants import KVALUES

Q = GGMLQuantizationType
F32 = np.float32


class Layout:
    """Where one type keeps its codes. `table[code]` is the multiple of the block step a code means."""

    qtype: GGMLQuantizationType
    table: np.ndarray
    first: np.float32 | None  # table[0] when the table is consecutive integers (set on registering)

    def get(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 blocks (nb, type_size) -> codes (nb, block_size), each in range(len(table))."""
        raise NotImplementedError

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        """Write codes into the blocks in place; scale bytes are left as they are."""
        raise NotImplementedError

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Per (sub-)block, (a, b) as float32 (nb, sub-blocks) computed as ggml's to_float does,
        b None where ggml adds nothing (adding 0 would turn -0.0 into +0.0). Only the types in
        `DECODED` have it."""
        raise NotImplementedError


def _half(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of each block, as float32."""
    return blocks.view(np.float16)[:, offset // 2].astype(F32)


def dequantize_blocks(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """uint8 blocks (nb, type_size) of a type in `DECODED` -> float32 (nb, block_size),
    bit-exact with ggml's to_float."""
    layout = LAYOUTS[qtype]
    a, b = layout.steps(blocks)
    nb, groups = a.shape
    c = layout.get(blocks)
    if layout.first is None:
        y = np.take(layout.table, c)
    else:
        y = c.astype(F32)  # table[c] is c + first: a cast (and an exact add) beats a lookup
        if layout.first:
            y += layout.first
    y = y.reshape(nb, groups, -1)
    y *= a[:, :, None]
    if b is not None:
        y += b[:, :, None]
    return y.reshape(nb, -1)


LAYOUTS: dict[GGMLQuantizationType, Layout] = {}


def _register(cls: type[Layout]) -> type[Layout]:
    layout = LAYOUTS[cls.qtype] = cls()
    t = layout.table
    layout.first = t[0] if np.array_equal(t, t[0] + np.arange(len(t), dtype=F32)) else None
    return cls


class _Nibbles32(Layout):
    """4-bit codes after `start` scale bytes, two per byte, halves of 32."""

    start = 2

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return nibbles(blocks[:, self.start :], 16)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, self.start :] = pack_nibbles(codes, 16)


class _Scaled(Layout):
    """ggml's `x * d`, with the block scale d the float16 in front."""

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return _half(blocks, 0)[:, None], None


class _ScaledMin(Layout):
    """ggml's `x * d + m`, d and m the two float16 in front."""

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return _half(blocks, 0)[:, None], _half(blocks, 2)[:, None]


@_register
class Q4_0(_Nibbles32, _Scaled):
    qtype, table = Q.Q4_0, np.arange(-8, 8, dtype=F32)


@_register
class Q4_1(_Nibbles32, _ScaledMin):
    qtype, table, start = Q.Q4_1, np.arange(16, dtype=F32), 4


@_register
class IQ4_NL(_Nibbles32, _Scaled):
    qtype, table = Q.IQ4_NL, KVALUES


@_register
class IQ4_XS(_Nibbles32):
    qtype, table, start = Q.IQ4_XS, KVALUES, 8

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`d * (ls - 32)` per 32 values: ls is a nibble of scales_l (bytes 4-7, low nibble
        first) with two bits of the 16-bit scales_h (bytes 2-3) on top."""
        low = np.empty((blocks.shape[0], 8), np.uint8)
        low[:, 0::2], low[:, 1::2] = blocks[:, 4:8] & 15, blocks[:, 4:8] >> 4
        high = (blocks.view(np.uint16)[:, 1:2] >> (2 * np.arange(8, dtype=np.uint16))) & 3
        ls = (low | (high << 4)).astype(np.int32) - 32
        return _half(blocks, 0)[:, None] * ls.astype(F32), None


class _Q5(Layout):
    """Q5_0/Q5_1: 4-bit nibbles plus a 32-bit word of high bits."""

    start = 2

    def get(self, blocks: np.ndarray) -> np.ndarray:
        low = nibbles(blocks[:, self.start + 4 :], 16)
        return low | (low_bits32(blocks[:, self.start : self.start + 4]) << 4)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, self.start : self.start + 4] = pack_low_bits32(codes >> 4)
        blocks[:, self.start + 4 :] = pack_nibbles(codes & 0xF, 16)


@_register
class Q5_0(_Q5, _Scaled):
    qtype, table = Q.Q5_0, np.arange(-16, 16, dtype=F32)


@_register
class Q5_1(_Q5, _ScaledMin):
    qtype, table, start = Q.Q5_1, np.arange(32, dtype=F32), 4


@_register
class Q8_0(_Scaled):
    qtype, table = Q.Q8_0, np.arange(-128, 128, dtype=F32)

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return blocks[:, 2:] ^ np.uint8(0x80)  # int8 q -> q + 128

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 2:] = codes ^ np.uint8(0x80)


@_register
class Q2_K(Layout):
    qtype, table = Q.Q2_K, np.arange(4, dtype=F32)

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return crumbs(blocks[:, 16:80])

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 16:80] = pack_crumbs(codes)


@_register
class Q3_K(Layout):
    """Code = low 2 bits + 4 * hmask bit; ggml's value is d_sub * (code - 4)."""

    qtype, table = Q.Q3_K, np.arange(-4, 4, dtype=F32)

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return crumbs(blocks[:, 32:96]) | (bitplanes(blocks[:, 0:32]) << 2)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 0:32] = pack_bitplanes(codes >> 2)
        blocks[:, 32:96] = pack_crumbs(codes & 3)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for all 8 sub-blocks: 12 bytes (nb, 12) -> 6-bit scales and
    mins (nb, 8). Bytes 0-3 / 4-7 hold scales / mins 0-3 and the top bits of 4-7; 8-11 the rest."""
    sc, mn = np.empty((s.shape[0], 8), np.uint8), np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


class _KScaleMin(Layout):
    """Q4_K/Q5_K: `d * sc * q - dmin * m` per 32 values, (d * sc) and (dmin * m) first."""

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        return _half(blocks, 0)[:, None] * sc.astype(F32), -(_half(blocks, 2)[:, None] * mn.astype(F32))


@_register
class Q4_K(_KScaleMin):
    qtype, table = Q.Q4_K, np.arange(16, dtype=F32)

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return nibbles(blocks[:, 16:], 32)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 16:] = pack_nibbles(codes, 32)


@_register
class Q5_K(_KScaleMin):
    qtype, table = Q.Q5_K, np.arange(32, dtype=F32)

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return nibbles(blocks[:, 48:], 32) | (bitplanes(blocks[:, 16:48]) << 4)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 16:48] = pack_bitplanes(codes >> 4)
        blocks[:, 48:] = pack_nibbles(codes & 0xF, 32)


@_register
class Q6_K(Layout):
    qtype, table = Q.Q6_K, np.arange(-32, 32, dtype=F32)

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return nibbles(blocks[:, :128], 64) | (crumbs(blocks[:, 128:192]) << 4)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, :128] = pack_nibbles(codes & 0xF, 64)
        blocks[:, 128:192] = pack_crumbs(codes >> 4)

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`d * sc * q` per 16 values, with sc the int8 scales at bytes 192-207."""
        return _half(blocks, 208)[:, None] * blocks[:, 192:208].view(np.int8).astype(F32), None


# the types whose scales are decoded here (their layout defines `steps`)
DECODED = frozenset(t for t, layout in LAYOUTS.items() if type(layout).steps is not Layout.steps)


def levels(blocks: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """Per value, (a, b) such that code c dequantizes to about `a * table[c] + b`.

    Found by dequantizing the blocks with every code set to the level nearest zero, then to
    the next: exact up to float32 rounding, which is all a rounding decision needs (the bytes
    written are measured exactly afterwards).
    """
    layout = LAYOUTS[qtype]
    bs = GGML_QUANT_SIZES[qtype][0]
    first = int(np.abs(layout.table).argmin())
    probe = blocks.copy()
    vals = []
    for code in (first, first + 1):
        layout.put(probe, np.full((blocks.shape[0], bs), code, np.uint8))
        vals.append(quants.dequantize(probe, qtype).reshape(blocks.shape[0], bs))
    t0, t1 = layout.table[first], layout.table[first + 1]
    a = (vals[1] - vals[0]) / (t1 - t0)
    return a, vals[0] - a * t0
