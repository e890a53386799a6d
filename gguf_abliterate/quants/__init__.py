"""Quantize and dequantize GGML tensor rows: the one pair the rest of the project calls.

`quantize(values, qtype)` takes float32 `(rows, n_per_row)` and returns uint8
`(rows, row_bytes)`; `dequantize(data, qtype)` takes uint8 `(..., row_bytes)` and returns
float32 `(..., n_per_row)`. Dequantization covers every type gguf-py knows (bit-exact with
ggml). Quantization covers the types whose numpy port is bit-exact with ggml's reference
quantizers; `can_quantize` tells which, so callers refuse the rest before writing anything.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as _gq

from gguf_abliterate.quants import codes, iquants, kquants, legacy

Q = GGMLQuantizationType

# gguf-py's numpy quantizers, each bit-exact with ggml's quantize_row_*_ref (checked in tests).
_GGUF_PY_QUANTIZE = frozenset({Q.F32, Q.F16, Q.TQ1_0, Q.TQ2_0})

# Our lane-layout ports of the common 32-value types, several times faster than gguf-py's:
# (n, 32) blocks -> out (n, bytes), with a work area reused chunk to chunk. They check for
# NaN/Inf themselves, on the block maxima they compute anyway.
_LANE_QUANTIZE = {
    Q.Q4_0: legacy.quantize_q4_0,
    Q.Q4_1: legacy.quantize_q4_1,
    Q.Q5_0: legacy.quantize_q5_0,
    Q.Q5_1: legacy.quantize_q5_1,
    Q.Q8_0: legacy.quantize_q8_0,
}

# Our own ports, each bit-exact with ggml's reference quantizer: blocks (nb, block) -> (nb, bytes).
_OWN_QUANTIZE = {
    Q.Q2_K: kquants.quantize_q2_k,
    Q.Q3_K: kquants.quantize_q3_k,
    Q.Q4_K: kquants.quantize_q4_k,
    Q.Q5_K: kquants.quantize_q5_k,
    Q.Q6_K: kquants.quantize_q6_k,
    Q.IQ4_NL: iquants.quantize_iq4_nl,
    Q.IQ4_XS: iquants.quantize_iq4_xs,
}
# blocks quantized per call: big enough to amortise numpy's per-call cost, small enough for cache
_BLOCKS_PER_CALL = 512

# Types whose scales `codes` decodes are dequantized there, a cache-sized run of values per
# call (several times gguf-py's speed, which broadcasts through many small per-row loops).
_DEQUANTIZE_VALUES = 1 << 16

# Types that ggml cannot quantize well (or at all) without an importance matrix.
NEEDS_IMATRIX = frozenset({Q.IQ1_S, Q.IQ1_M, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ2_S, Q.IQ3_XXS, Q.IQ3_S})


def block_size(qtype: GGMLQuantizationType) -> int:
    """Elements per quantization block (1 for plain float types)."""
    return GGML_QUANT_SIZES[qtype][0]


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes one row of `n_per_row` values takes in `qtype`."""
    bs, ts = GGML_QUANT_SIZES[qtype]
    if n_per_row % bs:
        raise ValueError(f"row of {n_per_row} values is not a multiple of {qtype.name}'s block of {bs}")
    return n_per_row // bs * ts


def can_quantize(qtype: GGMLQuantizationType) -> bool:
    """Whether `quantize` can write this type."""
    return qtype in _GGUF_PY_QUANTIZE or qtype in _OWN_QUANTIZE or qtype in _LANE_QUANTIZE or qtype == Q.BF16


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize float32 rows to the bytes ggml would write for them (no importance matrix)."""
    if not can_quantize(qtype):
        raise NotImplementedError(f"quantizing to {qtype.name} is not supported yet")
    values = np.ascontiguousarray(values, dtype=np.float32)
    row_bytes(qtype, values.shape[-1])  # raises unless rows are whole blocks
    lane = _LANE_QUANTIZE.get(qtype)
    if lane is not None:
        return _quantize_lanes(values, qtype, lane)
    own = _OWN_QUANTIZE.get(qtype)
    if own is not None:
        bs, ts = GGML_QUANT_SIZES[qtype]
        blocks = values.reshape(-1, bs)
        out = np.empty((blocks.shape[0], ts), np.uint8)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            for i in range(0, blocks.shape[0], _BLOCKS_PER_CALL):
                chunk = blocks[i : i + _BLOCKS_PER_CALL]
                _check_finite(chunk)  # a chunk at a time: no tensor-sized mask
                out[i : i + _BLOCKS_PER_CALL] = own(chunk)
        return out.reshape(*values.shape[:-1], -1)
    _check_finite(values)
    if qtype == Q.BF16:
        return _to_bf16(values)
    # gguf-py divides by block scales that underflow on denormal input; ggml does the same
    # and the bytes still match, so the floating-point warnings are noise.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        out = _gq.quantize(values, qtype)
    return np.ascontiguousarray(out).view(np.uint8).reshape(*values.shape[:-1], -1)


def _to_bf16(values: np.ndarray) -> np.ndarray:
    """ggml's fp32 -> bf16 for finite values: round the top 16 bits to nearest even (no
    overflow in 32 bits: the largest finite pattern plus 0x8000 stays below 2^32)."""
    u = values.view(np.uint32)
    r = (u >> np.uint32(16)) & np.uint32(1)
    r += np.uint32(0x7FFF)
    r += u
    r >>= np.uint32(16)
    return r.astype(np.uint16).view(np.uint8).reshape(*values.shape[:-1], -1)


def _check_finite(values: np.ndarray) -> None:
    if not np.isfinite(values).all():
        raise ValueError(legacy.NON_FINITE)


def _quantize_lanes(values: np.ndarray, qtype: GGMLQuantizationType,
                    fn: Callable[[np.ndarray, np.ndarray, legacy.Lanes], None]) -> np.ndarray:
    bs, ts = GGML_QUANT_SIZES[qtype]
    blocks = values.reshape(-1, bs)
    out = np.empty((blocks.shape[0], ts), np.uint8)
    lanes = legacy.Lanes(min(legacy.CHUNK, blocks.shape[0]))
    # Denormal-range input makes 1/d overflow to inf, as it does in ggml; the bytes still match.
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        for i in range(0, blocks.shape[0], legacy.CHUNK):
            fn(blocks[i : i + legacy.CHUNK], out[i : i + legacy.CHUNK], lanes)
    return out.reshape(*values.shape[:-1], -1)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Dequantize uint8 rows of `qtype` to float32, exactly as ggml's to_float does."""
    data = np.ascontiguousarray(data).view(np.uint8)
    if qtype == Q.F32:
        return data.view(np.float32)
    if qtype == Q.F16:
        return data.view(np.float16).astype(np.float32)
    if qtype == Q.BF16:  # the top half of a float32
        return (data.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)
    bs, ts = GGML_QUANT_SIZES[qtype]
    shape = (*data.shape[:-1], data.shape[-1] // ts * bs)
    n_blocks = data.size // ts
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf scales in a damaged file stay visible
        if qtype in codes.DECODED:
            blocks = data.reshape(-1, ts)
            out = np.empty((n_blocks, bs), np.float32)
            step = max(1, _DEQUANTIZE_VALUES // bs)
            for i in range(0, n_blocks, step):
                out[i : i + step] = codes.dequantize_blocks(blocks[i : i + step], qtype)
            return out.reshape(shape)
        # gguf-py works through a few rows per call: short rows (single blocks) make that
        # per-call cost dominate, so hand it rows of up to 256 blocks (blocks are independent).
        rows = data.reshape(-1, ts * math.gcd(n_blocks, 256))
        return np.asarray(_gq.dequantize(rows, qtype), dtype=np.float32).reshape(shape)
