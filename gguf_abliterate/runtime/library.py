"""llama-cpp-python, imported only when a command runs a model, and the ggml library inside it.

The pure edit path never imports this: llama-cpp-python is an optional extra. The hook needs
a few functions of ggml-base, which llama-cpp-python ships beside its own library under the
platform's name (`libggml-base.so`, `libggml-base.dylib`, `ggml-base.dll`): it is looked for
where llama-cpp-python loaded libllama from (which honours `LLAMA_CPP_LIB_PATH`), then in its
package's `lib/` and `bin/`.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gguf_abliterate.errors import UserError
from gguf_abliterate.portable import find_library, library_names

GGML_BASE = "ggml-base"

# Idle OpenMP threads otherwise spin and slow decoding tenfold when another process holds a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_llama_cpp() -> Any:
    """The llama_cpp module, or a clear error saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UserError("running models needs llama-cpp-python: pip install 'gguf-abliterate[llama]' "
                        "(see docs/platforms/ for each platform's build)") from None
    silence_logs(llama_cpp)
    return llama_cpp


def library_folders(package_dir: Path, loaded: str | None) -> list[Path]:
    """Where to look for llama.cpp's libraries: the folder of the library llama-cpp-python
    loaded (`loaded`, a path), then its package's lib/ and bin/."""
    folders = [Path(loaded).parent] if loaded else []
    folders += [package_dir / "lib", package_dir / "bin"]
    return list(dict.fromkeys(folders))


def find_ggml_base(folders: list[Path], platform: str = sys.platform) -> Path:
    """ggml-base's path, or a one-line error naming what was looked for where."""
    found = find_library(GGML_BASE, folders, platform)
    if found is None:
        raise UserError(f"llama.cpp's {GGML_BASE} library was not found: looked for "
                        f"{' or '.join(library_names(GGML_BASE, platform))} in {', '.join(map(str, folders))}; "
                        f"reinstall llama-cpp-python")
    return found


def ggml_base_path(llama_cpp: Any) -> Path:
    """ggml-base beside the libllama this llama-cpp-python loaded."""
    loaded = getattr(getattr(llama_cpp.llama_cpp, "_lib", None), "_name", None)
    return find_ggml_base(library_folders(Path(llama_cpp.__file__).parent, loaded))


class Ggml:
    """The few ggml functions the hook needs, from llama-cpp-python's ggml-base.

    The hook reads and writes activations only through `ggml_backend_tensor_get/set`, which go
    through the tensor's buffer interface, so they work on any backend: llama.cpp's scheduler
    (`ggml_backend_sched_compute_splits`) computes the graph up to each node the callback asked
    for, synchronizes that backend, then calls back; Metal's buffers are shared host memory and
    its get/set are copies, CPU's too. `rows` reads `ne[1]` from `struct ggml_tensor`
    (`enum ggml_type type; struct ggml_backend_buffer * buffer; int64_t ne[4]`): at byte 16 on
    every 64-bit platform (Windows included: pointers are 8 bytes there too).
    """

    def __init__(self, llama_cpp: Any):
        so = ctypes.CDLL(str(ggml_base_path(llama_cpp)))
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

    @staticmethod
    def width(t: int) -> int:
        """ne[0] of a tensor: the length of each row."""
        return (ctypes.c_int64 * 4).from_address(t + 16)[0]

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
