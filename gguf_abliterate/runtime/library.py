"""llama-cpp-python, imported only when a command runs a model, and the ggml library inside it.

The pure edit path never imports this: llama-cpp-python is an optional extra.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Any

import numpy as np

from gguf_abliterate.errors import UserError

# Idle OpenMP threads otherwise spin and slow decoding tenfold when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_llama_cpp() -> Any:
    """The llama_cpp module, or a clear error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("running models needs llama-cpp-python: pip install 'gguf-abliterate[llama]' "
                        "(build it with CMAKE_ARGS=-DGGML_NATIVE=OFF, see the README)") from None
    silence_logs(llama_cpp)
    return llama_cpp


class Ggml:
    """The few ggml functions the hook needs, from llama-cpp-python's libggml-base."""

    def __init__(self, llama_cpp: Any):
        so = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
        so.ggml_get_name.restype = ctypes.c_char_p
        so.ggml_get_name.argtypes = [ctypes.c_void_p]
        for fn in (so.ggml_backend_tensor_get, so.ggml_backend_tensor_set):
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.so = so

    def name(self, t: int) -> str:
        return (self.so.ggml_get_name(t) or b"").decode(errors="replace")

    @staticmethod
    def rows(t: int) -> int:
        """ne[1] of a tensor (struct ggml_tensor: int type; void *buffer; int64_t ne[4] ...)."""
        return (ctypes.c_int64 * 4).from_address(t + 16)[1]

    def read(self, t: int, n_embd: int) -> np.ndarray:
        out = np.empty((self.rows(t), n_embd), np.float32)
        self.so.ggml_backend_tensor_get(t, out.ctypes.data, 0, out.nbytes)
        return out

    def write(self, t: int, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data, np.float32)
        self.so.ggml_backend_tensor_set(t, data.ctypes.data, 0, data.nbytes)


_silent_log: Any = None


def silence_logs(ll: Any) -> None:
    """Route llama.cpp's log to nowhere. The callback must outlive every later llama.cpp call
    in the process (llama.cpp keeps the pointer), so it is created once, at module level."""
    global _silent_log
    if _silent_log is None:
        _silent_log = ll.llama_log_callback(lambda level, text, data: None)
    ll.llama_log_set(_silent_log, None)
