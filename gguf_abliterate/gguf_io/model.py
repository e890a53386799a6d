"""A model as one GGUF file or as the parts of a split model (llama.cpp's gguf-split layout).

A split model is `prefix-00001-of-0000N.gguf` ... `prefix-0000N-of-0000N.gguf`: every part
carries `split.no` (u16), `split.count` (u16) and `split.tensors.count` (i32); the first part
holds all other metadata; tensors are spread over the parts. Any part can be given: the
others are found by name, and metadata is read from the first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from gguf import MODEL_TENSOR

from gguf_abliterate import names, pip_models
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io.reader import GGUFFile, TensorInfo
from gguf_abliterate.portable import read_into
from gguf_abliterate.quants import dequantize

SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_path(prefix: Path, index: int, count: int) -> Path:
    """Part `index` (0-based) of `count`, named as llama.cpp's llama_split_path does."""
    return prefix.with_name(f"{prefix.name}-{index + 1:05d}-of-{count:05d}.gguf")


def _split_count(f: GGUFFile) -> int:
    count = f.get(names.SPLIT_COUNT, 1)
    if not isinstance(count, int) or count < 1:
        raise UserError(f"{f.path}: bad split.count {count!r}")
    return count


class Model:
    """A model opened read-only: metadata, tensor infos and tensor data, over all its parts."""

    def __init__(self, path: str | os.PathLike[str], parts: list[Path] | None = None):
        given = GGUFFile(path)
        count = _split_count(given)
        if parts is None:
            parts = [given.path]
            if count > 1:
                m = SPLIT_NAME.match(given.path.name)
                if not m or int(m["count"]) != count:
                    raise UserError(f"{given.path}: a part of a {count}-part split model, but not named "
                                    f"NAME-0000K-of-{count:05d}.gguf, so the other parts cannot be found")
                parts = [split_path(given.path.with_name(m["prefix"]), i, count) for i in range(count)]
        if len(parts) != count:
            raise UserError(f"{given.path}: split.count is {count}, but {len(parts)} parts were given")
        self.parts = [given if Path(p) == given.path else GGUFFile(p) for p in parts]
        self.path = self.parts[0].path
        self.tensors: dict[str, TensorInfo] = {}
        for i, part in enumerate(self.parts):
            if count > 1 and (part.get(names.SPLIT_NO) != i or _split_count(part) != count):
                raise UserError(f"{part.path}: expected part {i + 1} of {count} ({names.SPLIT_NO} {i}), "
                                f"found {names.SPLIT_NO} {part.get(names.SPLIT_NO)!r} of "
                                f"{part.get(names.SPLIT_COUNT)!r}")
            for name, t in part.tensors.items():
                if name in self.tensors:
                    raise UserError(f"{part.path}: tensor {name} is also in another part")
                self.tensors[name] = dataclasses.replace(t, part=i)
        expected = self.parts[0].get(names.SPLIT_TENSORS)
        if count > 1 and expected != len(self.tensors):
            raise UserError(f"{self.path}: {names.SPLIT_TENSORS} is {expected}, the parts hold {len(self.tensors)}")
        arch = self.get_str(names.ARCHITECTURE)
        if arch is None:
            raise UserError(f"{self.path}: no {names.ARCHITECTURE} key")
        self.arch: str = arch

    def close(self) -> None:
        for part in self.parts:
            part.close()

    @property
    def is_split(self) -> bool:
        return len(self.parts) > 1

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (from the first part), or `default`."""
        return self.parts[0].get(key, default)

    def get_str(self, key: str) -> str | None:
        value = self.get(key)
        return value if isinstance(value, str) else None

    def arch_get(self, template: str, default: Any = None) -> Any:
        """The value of a per-architecture key (`names.BLOCK_COUNT` ...), or `default`."""
        return self.get(names.arch_key(template, self.arch), default)

    def arch_int(self, template: str) -> int:
        """A required positive integer per-architecture key."""
        value = self.arch_get(template)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise UserError(f"{self.path}: missing or bad integer key {names.arch_key(template, self.arch)}")
        return value

    @property
    def n_layer(self) -> int:
        """Blocks the model runs: block_count less the trailing multi-token-prediction (NextN)
        blocks, which llama.cpp loads but leaves out of the main pass (GLM-4.5, Qwen 3.5, ...)."""
        nextn = self.arch_get(names.NEXTN_LAYERS, 0)
        count = self.arch_int(names.BLOCK_COUNT)
        if count > len(self.tensors):  # every block has tensors; a huge count would make plans loop for ages
            raise UserError(f"{self.path}: {names.arch_key(names.BLOCK_COUNT, self.arch)} is {count}, more than the "
                            f"file's {len(self.tensors)} tensors (a damaged header)")
        return count - (nextn if isinstance(nextn, int) and nextn > 0 else 0)

    @property
    def n_embd(self) -> int:
        return self.arch_int(names.EMBEDDING_LENGTH)

    def attention_heads(self, block: int) -> tuple[int, int]:
        """(heads, input columns per head) of a block's attention output projection: head h
        reads columns h*width .. (h+1)*width (ggml's kqv_out lays the heads side by side)."""
        name = names.block_tensor(MODEL_TENSOR.ATTN_OUT, block, "weight")
        if name not in self.tensors:
            raise UserError(f"block {block} has no {name}: a head-restricted edit needs an attention output "
                            f"projection")
        if len(self.tensors[name].shape) != 2:
            raise UserError(f"{name} has shape {list(self.tensors[name].shape)}: heads need a 2-D projection")
        count = self.arch_get(names.HEAD_COUNT)
        count = count[block] if isinstance(count, list) and block < len(count) else count
        n_in = int(self.tensors[name].shape[0])
        if not isinstance(count, int) or isinstance(count, bool) or count <= 0 or n_in % count:
            raise UserError(f"{self.path}: the head count of block {block} does not divide its attention output "
                            f"({n_in} inputs)")
        return count, n_in // count

    def file_of(self, name: str) -> GGUFFile:
        return self.parts[self.tensors[name].part]

    def kv_spans(self, part: int = 0) -> Iterator[tuple[str, memoryview]]:
        """Each metadata key of a part with its exact encoded bytes."""
        return self.parts[part].kv_spans()

    def raw(self, name: str) -> np.ndarray:
        """A tensor's stored bytes as uint8 `(..., row_bytes)` in numpy axis order, memory-mapped."""
        t = self.tensors[name]
        data = self.file_of(name).map[t.data_offset : t.data_offset + t.n_bytes]
        return data.reshape(*reversed(t.shape[1:]), -1)

    def n_rows(self, name: str) -> int:
        """Rows of a tensor (all dims but ne0, flattened)."""
        t = self.tensors[name]
        return int(t.n_elements) // int(t.shape[0])

    def read_rows(self, name: str, first: int, count: int) -> np.ndarray:
        """Stored bytes of rows `first .. first+count` as a fresh uint8 `(count, row_bytes)` array.

        Read with positional reads rather than through the memory map, so that pages of a large model do
        not pile up in this process's resident set.
        """
        t = self.tensors[name]
        rb = int(t.n_bytes) // self.n_rows(name)
        buf = np.empty(count * rb, dtype=np.uint8)
        view, done, offset, fd = memoryview(buf), 0, t.data_offset + first * rb, self.file_of(name).fd
        while done < buf.nbytes:
            n = read_into(fd, view[done:], offset + done)
            if n <= 0:
                raise UserError(f"{self.file_of(name).path}: unexpected end of file in tensor {name}")
            done += n
        return buf.reshape(count, rb)

    def values(self, name: str) -> np.ndarray:
        """A whole tensor dequantized to float32, numpy axis order (last axis = ggml ne0)."""
        return dequantize(self.raw(name), self.tensors[name].tensor_type)


def model_digest(model: Model) -> str:
    """sha256 of the model's bytes (of each part's, for a split model): 2 s a GB, once a run."""
    return _digest(tuple((str(p.path.resolve()), p.path.stat().st_size, p.path.stat().st_mtime_ns)
                         for p in model.parts))


@cache
def _digest(parts: tuple[tuple[str, int, int], ...]) -> str:
    digests = [pip_models.sha256(Path(path)) for path, _, _ in parts]
    return digests[0] if len(digests) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
