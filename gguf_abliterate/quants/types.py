"""One record per GGML type: how rows are quantized to it and read back, and where its codes are.

Each type is a small class registered by type (`__init_subclass__`, as gguf-py's quants.py
does), so adding a type is one class here:

- `quantize(values)`: float32 rows -> the bytes ggml writes for them without an importance
  matrix. Types without it (`writable` False) are refused before anything is written.
- `dequantize(data)`: stored rows -> float32, bit-exact with ggml's `to_float`. gguf-py's
  unless the type decodes its own scales (`steps`): then codes times steps, in ggml's order
  of operations, a cache-sized run per call (several times gguf-py's speed).
- For integer-coded types, the code layout that quantization-aware rounding moves codes in:
  each value is `a * table[code] + b`, `a` and `b` fixed per (sub-)block by the scale bytes;
  `get`/`put` read and write the codes without touching the scale bytes.

Mixins give the shared parts: where the quantizer comes from (gguf-py, a block port, a lane
port) and how the codes are packed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _gq

from gguf_abliterate.quants import iquants, kquants, legacy, mxfp4
from gguf_abliterate.quants.bits import (bitplanes, crumbs, low_bits32, nibbles, pack_bitplanes, pack_crumbs,
                                         pack_low_bits32, pack_nibbles)
from gguf_abliterate.quants.iquants import KVALUES

Q = GGMLQuantizationType
F32 = np.float32

# blocks quantized per call: big enough to amortise numpy's per-call cost, small enough for cache
BLOCKS_PER_CALL = 512
# values dequantized per call by the types that decode their scales
DEQUANTIZE_VALUES = 1 << 16


class QuantType:
    """A GGML type. The base knows only gguf-py's dequantizer; subclasses add the rest."""

    qtype: GGMLQuantizationType
    needs_imatrix: ClassVar[bool] = False  # ggml cannot quantize it (well) without an importance matrix
    table: ClassVar[np.ndarray | None] = None  # code -> multiple of the block step (integer-coded types)
    first: np.float32 | None = None  # table[0] when the table is consecutive integers (set on registering)

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if qtype is not None:
            cls.qtype = qtype
            _register(cls())

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    @property
    def writable(self) -> bool:
        return type(self).quantize is not QuantType.quantize

    @property
    def has_codes(self) -> bool:
        """Whether aware rounding can move its codes (every integer-coded type we write)."""
        return self.table is not None

    def quantize(self, values: np.ndarray) -> np.ndarray:
        """C-contiguous float32 rows of whole blocks -> uint8 (rows, row_bytes)."""
        raise NotImplementedError(f"quantizing to {self.qtype.name} is not supported yet")

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        """uint8 rows (..., row_bytes), C-contiguous -> float32 (..., n_per_row)."""
        bs, ts = self.block_size, self.type_size
        n_blocks = data.size // ts
        # gguf-py works through a few rows per call: short rows (single blocks) make that
        # per-call cost dominate, so hand it rows of up to 256 blocks (blocks are independent).
        rows = data.reshape(-1, ts * math.gcd(n_blocks, 256))
        out = np.asarray(_gq.dequantize(rows, self.qtype), dtype=np.float32)
        return out.reshape(*data.shape[:-1], data.shape[-1] // ts * bs)

    def quantize_split(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`quantize` for aware rounding, which moves codes before they are packed: the blocks
        (their code fields may be left unwritten: `put` completes them) and the codes
        (rows, n_per_row) uint8. Here the whole blocks and their codes read back, a chunk at a time."""
        data = self.quantize(values)
        return data, self.read_codes(data.reshape(-1, self.type_size)).reshape(values.shape)

    def read_codes(self, blocks: np.ndarray) -> np.ndarray:
        """`get` over many blocks, BLOCKS_PER_CALL at a time (no temporaries the size of a tensor)."""
        codes = np.empty((blocks.shape[0], self.block_size), np.uint8)
        for i in range(0, blocks.shape[0], BLOCKS_PER_CALL):
            codes[i : i + BLOCKS_PER_CALL] = self.get(blocks[i : i + BLOCKS_PER_CALL])
        return codes

    def write_codes(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        """`put` over many blocks, as `read_codes` reads them."""
        for i in range(0, blocks.shape[0], BLOCKS_PER_CALL):
            self.put(blocks[i : i + BLOCKS_PER_CALL], codes[i : i + BLOCKS_PER_CALL])

    def get(self, blocks: np.ndarray) -> np.ndarray:
        """uint8 blocks (nb, type_size) -> codes (nb, block_size), each in range(len(table))."""
        raise NotImplementedError

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        """Write codes into the blocks in place; scale bytes are left as they are."""
        raise NotImplementedError

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Per (sub-)block, (a, b) as float32 (nb, sub-blocks) computed as ggml's to_float does,
        b None where ggml adds nothing (adding 0 would turn -0.0 into +0.0)."""
        raise NotImplementedError


TYPES: dict[GGMLQuantizationType, QuantType] = {}


def _register(record: QuantType) -> None:
    t = record.table
    if t is not None:
        record.first = t[0] if np.array_equal(t, t[0] + np.arange(len(t), dtype=F32)) else None
    TYPES[record.qtype] = record


class _Other(QuantType):
    """A type we only read (through gguf-py)."""

    def __init__(self, qtype: GGMLQuantizationType, needs_imatrix: bool = False):
        self.qtype = qtype
        self.needs_imatrix = needs_imatrix  # type: ignore[misc]


def get_type(qtype: GGMLQuantizationType) -> QuantType:
    """The record of any GGML type (a read-only one for types we cannot write)."""
    record = TYPES.get(qtype)
    if record is None:
        record = TYPES[qtype] = _Other(qtype)
    return record


def check_finite(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise ValueError(legacy.NON_FINITE)


# -- where the quantizer comes from ------------------------------------------------------------


class _GgufPyQuantize(QuantType):
    """gguf-py's numpy quantizer, bit-exact with ggml's quantize_row_*_ref (checked in tests)."""

    def quantize(self, values: np.ndarray) -> np.ndarray:
        check_finite(values)
        # gguf-py divides by block scales that underflow on denormal input; ggml does the same
        # and the bytes still match, so the floating-point warnings are noise.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            out = _gq.quantize(values, self.qtype)
        return np.ascontiguousarray(out).view(np.uint8).reshape(*values.shape[:-1], -1)


class _BlockQuantize(QuantType):
    """Our own port, bit-exact with ggml: blocks (nb, block) -> (nb, bytes), BLOCKS_PER_CALL at a time."""

    block_fn: ClassVar[Callable[[np.ndarray], np.ndarray]]

    def quantize(self, values: np.ndarray) -> np.ndarray:
        return self._by_chunk(values, lambda first, chunk: type(self).block_fn(chunk))

    def _by_chunk(self, values: np.ndarray, fn: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
        """The blocks `fn(first block's index, chunk)` returns for each chunk of BLOCKS_PER_CALL
        blocks, each chunk checked for NaN/Inf first (no tensor-sized mask)."""
        blocks = values.reshape(-1, self.block_size)
        out = np.empty((blocks.shape[0], self.type_size), np.uint8)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            for i in range(0, blocks.shape[0], BLOCKS_PER_CALL):
                chunk = blocks[i : i + BLOCKS_PER_CALL]
                check_finite(chunk)
                out[i : i + BLOCKS_PER_CALL] = fn(i, chunk)
        return out.reshape(*values.shape[:-1], -1)


class _SplitQuantize(_BlockQuantize):
    """A port (`kquants`) whose block function returns the blocks without their codes and the
    codes: `quantize` packs them with `put`, `quantize_split` keeps them apart (a Q5_K or
    Q6_K tensor's codes take as long to unpack as to pack, each about 7% of the quantizer's time)."""

    split_fn: ClassVar[Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]]

    def quantize(self, values: np.ndarray) -> np.ndarray:
        def packed(first: int, chunk: np.ndarray) -> np.ndarray:
            head, codes = type(self).split_fn(chunk)
            self.put(head, codes)
            return head

        return self._by_chunk(values, packed)

    def quantize_split(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = np.empty((values.size // self.block_size, self.block_size), np.uint8)

        def apart(first: int, chunk: np.ndarray) -> np.ndarray:
            head, codes[first : first + len(chunk)] = type(self).split_fn(chunk)
            return head

        return self._by_chunk(values, apart), codes.reshape(values.shape)


class _LaneQuantize(QuantType):
    """A lane-layout port of a 32-value type (`legacy`), several times faster than gguf-py's;
    it checks for NaN/Inf itself, on the block maxima it computes anyway."""

    lane_fn: ClassVar[Callable[[np.ndarray, np.ndarray, legacy.Lanes], None]]

    def quantize(self, values: np.ndarray) -> np.ndarray:
        blocks = values.reshape(-1, self.block_size)
        out = np.empty((blocks.shape[0], self.type_size), np.uint8)
        lanes = legacy.Lanes(min(legacy.CHUNK, blocks.shape[0]))
        fn = type(self).lane_fn
        # Denormal-range input makes 1/d overflow to inf, as it does in ggml; the bytes still match.
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            for i in range(0, blocks.shape[0], legacy.CHUNK):
                fn(blocks[i : i + legacy.CHUNK], out[i : i + legacy.CHUNK], lanes)
        return out.reshape(*values.shape[:-1], -1)


class _Decoded(QuantType):
    """Dequantized here from `steps` and the codes: y = a * table[c] (+ b)."""

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        bs, ts = self.block_size, self.type_size
        blocks = data.reshape(-1, ts)
        out = np.empty((blocks.shape[0], bs), np.float32)
        step = max(1, DEQUANTIZE_VALUES // bs)
        for i in range(0, blocks.shape[0], step):
            out[i : i + step] = self._blocks(blocks[i : i + step])
        return out.reshape(*data.shape[:-1], data.shape[-1] // ts * bs)

    def _blocks(self, blocks: np.ndarray) -> np.ndarray:
        a, b = self.steps(blocks)
        nb, groups = a.shape
        c = self.get(blocks)
        if self.first is None:
            assert self.table is not None
            y = np.take(self.table, c)
        else:
            y = c.astype(F32)  # table[c] is c + first: a cast (and an exact add) beats a lookup
            if self.first:
                y += self.first
        y = y.reshape(nb, groups, -1)
        y *= a[:, :, None]
        if b is not None:
            y += b[:, :, None]
        return y.reshape(nb, -1)


# -- float types -------------------------------------------------------------------------------


class F32_(_GgufPyQuantize, qtype=Q.F32):
    def dequantize(self, data: np.ndarray) -> np.ndarray:
        return data.view(np.float32)


class F16_(_GgufPyQuantize, qtype=Q.F16):
    def dequantize(self, data: np.ndarray) -> np.ndarray:
        return data.view(np.float16).astype(np.float32)


class BF16_(QuantType, qtype=Q.BF16):
    def quantize(self, values: np.ndarray) -> np.ndarray:
        """ggml's fp32 -> bf16 for finite values: round the top 16 bits to nearest even (no
        overflow in 32 bits: the largest finite pattern plus 0x8000 stays below 2^32)."""
        check_finite(values)
        u = values.view(np.uint32)
        r = (u >> np.uint32(16)) & np.uint32(1)
        r += np.uint32(0x7FFF)
        r += u
        r >>= np.uint32(16)
        return r.astype(np.uint16).view(np.uint8).reshape(*values.shape[:-1], -1)

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        return (data.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)  # the top half


class TQ1_0(_GgufPyQuantize, qtype=Q.TQ1_0):
    pass


class TQ2_0(_GgufPyQuantize, qtype=Q.TQ2_0):
    pass


for _t in (Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S):
    _register(_Other(_t, needs_imatrix=True))


# -- integer-coded types: code layouts ---------------------------------------------------------


def _half(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 at byte `offset` of each block, as float32."""
    return blocks.view(np.float16)[:, offset // 2].astype(F32)


class _Nibbles32(QuantType):
    """4-bit codes after `start` scale bytes, two per byte, halves of 32."""

    start = 2

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return nibbles(blocks[:, self.start :], 16)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, self.start :] = pack_nibbles(codes, 16)


class _Scaled(_Decoded):
    """ggml's `x * d`, with the block scale d the float16 in front."""

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return _half(blocks, 0)[:, None], None


class _ScaledMin(_Decoded):
    """ggml's `x * d + m`, d and m the two float16 in front."""

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return _half(blocks, 0)[:, None], _half(blocks, 2)[:, None]


class Q4_0(_LaneQuantize, _Nibbles32, _Scaled, qtype=Q.Q4_0):
    table, lane_fn = np.arange(-8, 8, dtype=F32), legacy.quantize_q4_0


class Q4_1(_LaneQuantize, _Nibbles32, _ScaledMin, qtype=Q.Q4_1):
    table, start, lane_fn = np.arange(16, dtype=F32), 4, legacy.quantize_q4_1


class IQ4_NL(_BlockQuantize, _Nibbles32, _Scaled, qtype=Q.IQ4_NL):
    table, block_fn = KVALUES, iquants.quantize_iq4_nl


class IQ4_XS(_BlockQuantize, _Nibbles32, _Decoded, qtype=Q.IQ4_XS):
    table, start, block_fn = KVALUES, 8, iquants.quantize_iq4_xs

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`d * (ls - 32)` per 32 values: ls is a nibble of scales_l (bytes 4-7, low nibble
        first) with two bits of the 16-bit scales_h (bytes 2-3) on top."""
        low = np.empty((blocks.shape[0], 8), np.uint8)
        low[:, 0::2], low[:, 1::2] = blocks[:, 4:8] & 15, blocks[:, 4:8] >> 4
        high = (blocks.view(np.uint16)[:, 1:2] >> (2 * np.arange(8, dtype=np.uint16))) & 3
        ls = (low | (high << 4)).astype(np.int32) - 32
        return _half(blocks, 0)[:, None] * ls.astype(F32), None


def _mxfp4_blocks(blocks: np.ndarray) -> np.ndarray:
    return np.asarray(_gq.quantize(blocks, Q.MXFP4), dtype=np.uint8)


class MXFP4(_BlockQuantize, _Nibbles32, _Decoded, qtype=Q.MXFP4):
    """gguf-py's quantizer (bit-exact with ggml), a chunk of blocks at a time: it holds 16
    errors per value. Codes here are ranks among the 15 distinct levels (aware rounding moves
    a code to its neighbouring level); the nibbles hold ggml's codes, translated both ways."""

    table, start, block_fn = mxfp4.LEVELS, 1, _mxfp4_blocks

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return mxfp4.RANK_OF_CODE[super().get(blocks)]

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        super().put(blocks, mxfp4.CODE_OF_RANK[codes])

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return mxfp4.half_scale(blocks[:, 0])[:, None], None


class _Q5(QuantType):
    """Q5_0/Q5_1: 4-bit nibbles plus a 32-bit word of high bits."""

    start = 2

    def get(self, blocks: np.ndarray) -> np.ndarray:
        low = nibbles(blocks[:, self.start + 4 :], 16)
        return low | (low_bits32(blocks[:, self.start : self.start + 4]) << 4)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, self.start : self.start + 4] = pack_low_bits32(codes >> 4)
        blocks[:, self.start + 4 :] = pack_nibbles(codes & 0xF, 16)


class Q5_0(_LaneQuantize, _Q5, _Scaled, qtype=Q.Q5_0):
    table, lane_fn = np.arange(-16, 16, dtype=F32), legacy.quantize_q5_0


class Q5_1(_LaneQuantize, _Q5, _ScaledMin, qtype=Q.Q5_1):
    table, start, lane_fn = np.arange(32, dtype=F32), 4, legacy.quantize_q5_1


class Q8_0(_LaneQuantize, _Scaled, qtype=Q.Q8_0):
    table, lane_fn = np.arange(-128, 128, dtype=F32), legacy.quantize_q8_0

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return blocks[:, 2:] ^ np.uint8(0x80)  # int8 q -> q + 128

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 2:] = codes ^ np.uint8(0x80)


class Q2_K(_SplitQuantize, qtype=Q.Q2_K):
    table, split_fn = np.arange(4, dtype=F32), kquants.quantize_q2_k

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return crumbs(blocks[:, 16:80])

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 16:80] = pack_crumbs(codes)

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`d * sc * q - dmin * m` per 16 values, sc and m the low and high nibbles of bytes
        0-15, d and dmin the float16 at bytes 80 and 82; (d * sc) and (dmin * m) first.
        (Only rounding reads it: dequantization stays gguf-py's.)"""
        sc = blocks[:, 0:16]
        return _half(blocks, 80)[:, None] * (sc & 15).astype(F32), -(_half(blocks, 82)[:, None] * (sc >> 4).astype(F32))


class Q3_K(_SplitQuantize, qtype=Q.Q3_K):
    """Code = low 2 bits + 4 * hmask bit; ggml's value is d_sub * (code - 4)."""

    table, split_fn = np.arange(-4, 4, dtype=F32), kquants.quantize_q3_k

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return crumbs(blocks[:, 32:96]) | (bitplanes(blocks[:, 0:32]) << 2)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 0:32] = pack_bitplanes(codes >> 2)
        blocks[:, 32:96] = pack_crumbs(codes & 3)

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`d * (sc - 32)` per 16 values: scale j has the low nibble of byte 96 + j % 8 (j < 8
        low, else high) and, on top, bits 2 * (j // 4) of byte 104 + j % 4; d the float16 at
        byte 108. (Only rounding reads it: dequantization stays gguf-py's.)"""
        s = blocks[:, 96:108].astype(np.int32)
        j = np.arange(16)
        low = np.where(j < 8, s[:, j % 8] & 15, s[:, j % 8] >> 4)
        sc = low | (((s[:, 8 + j % 4] >> (2 * (j // 4))) & 3) << 4)
        return _half(blocks, 108)[:, None] * (sc - 32).astype(F32), None


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for all 8 sub-blocks: 12 bytes (nb, 12) -> 6-bit scales and
    mins (nb, 8). Bytes 0-3 / 4-7 hold scales / mins 0-3 and the top bits of 4-7; 8-11 the rest."""
    sc, mn = np.empty((s.shape[0], 8), np.uint8), np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4], mn[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


class _KScaleMin(_Decoded):
    """Q4_K/Q5_K: `d * sc * q - dmin * m` per 32 values, (d * sc) and (dmin * m) first."""

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        sc, mn = _scale_min_k4(blocks[:, 4:16])
        return _half(blocks, 0)[:, None] * sc.astype(F32), -(_half(blocks, 2)[:, None] * mn.astype(F32))


class Q4_K(_SplitQuantize, _KScaleMin, qtype=Q.Q4_K):
    table, split_fn = np.arange(16, dtype=F32), kquants.quantize_q4_k

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return nibbles(blocks[:, 16:], 32)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 16:] = pack_nibbles(codes, 32)


class Q5_K(_SplitQuantize, _KScaleMin, qtype=Q.Q5_K):
    table, split_fn = np.arange(32, dtype=F32), kquants.quantize_q5_k

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return nibbles(blocks[:, 48:], 32) | (bitplanes(blocks[:, 16:48]) << 4)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, 16:48] = pack_bitplanes(codes >> 4)
        blocks[:, 48:] = pack_nibbles(codes & 0xF, 32)


class Q6_K(_SplitQuantize, _Decoded, qtype=Q.Q6_K):
    table, split_fn = np.arange(-32, 32, dtype=F32), kquants.quantize_q6_k

    def get(self, blocks: np.ndarray) -> np.ndarray:
        return nibbles(blocks[:, :128], 64) | (crumbs(blocks[:, 128:192]) << 4)

    def put(self, blocks: np.ndarray, codes: np.ndarray) -> None:
        blocks[:, :128] = pack_nibbles(codes & 0xF, 64)
        blocks[:, 128:192] = pack_crumbs(codes >> 4)

    def steps(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """`d * sc * q` per 16 values, with sc the int8 scales at bytes 192-207."""
        return _half(blocks, 208)[:, None] * blocks[:, 192:208].view(np.int8).astype(F32), None
