"""Small GGUF files built in memory through gguf-py (adapters, control vectors), written atomically."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from gguf_abliterate import names
from gguf_abliterate.gguf_io.atomic import atomic_path

KVValue = str | bool | int | float | np.int32
_VTYPES = {bool: GGUFValueType.BOOL, int: GGUFValueType.INT64, float: GGUFValueType.FLOAT32,
           np.int32: GGUFValueType.INT32}


def write_small_gguf(out: Path, arch: str, kv: dict[str, KVValue], tensors: dict[str, np.ndarray]) -> None:
    """A fresh GGUF of `arch` with these keys (typed by their Python type) and tensors."""
    with atomic_path(out) as tmp:
        w = GGUFWriter(str(tmp), arch)
        for key, value in kv.items():
            w.add_key_value(key, value, _VTYPES.get(type(value), GGUFValueType.STRING))
        for name, data in tensors.items():
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()


def write_lora_adapter(out: Path, arch: str, pieces: dict[str, tuple[np.ndarray, np.ndarray]],
                       kv: dict[str, KVValue] | None = None) -> None:
    """A LoRA adapter GGUF as llama.cpp reads it: `<weight>.lora_a` (rank, n_in) and
    `<weight>.lora_b` (n_out, rank) per weight, applied as `W x + alpha/rank * B (A x)`; with
    alpha = rank that is B A exactly."""
    rank = {a.shape[0] for a, _ in pieces.values()}
    if len(rank) != 1:
        raise ValueError(f"adapter pieces of mixed ranks {sorted(rank)}")
    meta: dict[str, KVValue] = {names.FILE_KIND: "adapter", names.ADAPTER_TYPE: "lora",
                                names.LORA_ALPHA: float(rank.pop()), **(kv or {})}
    tensors = {}
    for name, (a, b) in pieces.items():
        name_a, name_b = names.lora_names(name)
        tensors[name_a], tensors[name_b] = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    write_small_gguf(out, arch, meta, tensors)
