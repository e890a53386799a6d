"""Quantize and dequantize GGML tensor rows: the one pair the rest of the project calls.

`quantize(values, qtype)` takes float32 `(rows, n_per_row)` and returns uint8
`(rows, row_bytes)`; `dequantize(data, qtype)` takes uint8 `(..., row_bytes)` and returns
float32 `(..., n_per_row)`. Dequantization covers every type gguf-py knows (bit-exact with
ggml). Quantization covers the types whose port is bit-exact with ggml's reference
quantizers; `can_quantize` tells which, so callers refuse the rest before writing anything.
Each type's parts live in one record in `types.py`.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gguf_abliterate.quants.types import TYPES, QuantType, get_type

__all__ = ["QuantType", "block_size", "can_quantize", "dequantize", "get_type", "needs_imatrix", "quantize",
           "quantize_split", "row_bytes", "writable_types"]


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
    return get_type(qtype).writable


def needs_imatrix(qtype: GGMLQuantizationType) -> bool:
    """Whether ggml cannot quantize this type (well) without an importance matrix."""
    return get_type(qtype).needs_imatrix


def writable_types() -> list[GGMLQuantizationType]:
    """Every type `quantize` writes, in GGML's numbering."""
    return sorted((t for t, record in TYPES.items() if record.writable), key=int)


def quantize(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Quantize float32 rows to the bytes ggml would write for them (no importance matrix)."""
    record = get_type(qtype)
    if not record.writable:
        raise NotImplementedError(f"quantizing to {qtype.name} is not supported yet")
    values = np.ascontiguousarray(values, dtype=np.float32)
    row_bytes(qtype, values.shape[-1])  # raises unless rows are whole blocks
    return record.quantize(values)


def quantize_split(values: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """`quantize` for an integer-coded type, with the codes apart: (bytes whose code fields
    may be unwritten, codes (rows, n_per_row) uint8). For aware rounding, which moves codes
    and then writes them all (`rounding.keep_edit(..., codes=)`)."""
    record = get_type(qtype)
    if not (record.writable and record.has_codes):
        raise NotImplementedError(f"{qtype.name} has no codes to split")
    values = np.ascontiguousarray(values, dtype=np.float32)
    row_bytes(qtype, values.shape[-1])
    return record.quantize_split(values)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Dequantize uint8 rows of `qtype` to float32, exactly as ggml's to_float does."""
    data = np.ascontiguousarray(data).view(np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/Inf scales in a damaged file stay visible
        return get_type(qtype).dequantize(data)
