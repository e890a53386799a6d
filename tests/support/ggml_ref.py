"""ggml's own C quantizers, called through ctypes: the oracle our numpy engine is checked against.

Uses the `libggml-base` shared library that llama-cpp-python ships (built with
CMAKE_ARGS=-DGGML_NATIVE=OFF here; see docs/platforms/linux.md). `ggml_quantize_chunk(..., imatrix=NULL)`
is what llama-quantize runs when it has no importance matrix; `to_float` is ggml's dequantizer.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np
from gguf import GGMLQuantizationType

from gguf_abliterate.quants import row_bytes
from gguf_abliterate.runtime.library import ggml_base_path


class _TypeTraits(ctypes.Structure):
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@cache
def lib() -> ctypes.CDLL:
    """libggml-base from the installed llama-cpp-python."""
    import llama_cpp  # (loads the library and its dependencies first)

    so = ctypes.CDLL(str(ggml_base_path(llama_cpp)))
    so.ggml_quantize_chunk.restype = ctypes.c_size_t
    so.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p
    ]
    so.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    so.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return so


def quantize(values: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk over float32 rows (by default without an importance matrix):
    uint8 (rows, row_bytes). Types such as IQ2_XXS abort in ggml without one."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    rows, n = values.reshape(-1, values.shape[-1]).shape
    out = np.zeros((rows, row_bytes(qtype, n)), dtype=np.uint8)
    im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    written = lib().ggml_quantize_chunk(int(qtype), values.ctypes.data, out.ctypes.data, 0, rows, n,
                                        None if im is None else im.ctypes.data)
    assert written == out.nbytes, (written, out.nbytes)
    return out.reshape(*values.shape[:-1], -1)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType, n_per_row: int) -> np.ndarray:
    """ggml's to_float over uint8 rows: float32 (rows, n_per_row)."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if qtype == GGMLQuantizationType.F32:  # ggml has no to_float for its own float type
        return data.view(np.float32).reshape(-1, n_per_row).copy()
    rows = data.size // row_bytes(qtype, n_per_row)
    out = np.zeros((rows, n_per_row), dtype=np.float32)
    fn = _TO_FLOAT(lib().ggml_get_type_traits(int(qtype)).contents.to_float)
    fn(data.ctypes.data, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
    return out
