"""Parsing one GGUF file: header, metadata and tensor infos, every bound checked.

We parse GGUF ourselves rather than with gguf-py's `GGUFReader`: that reader makes a numpy
view per array element, which costs about 3 KB per vocabulary entry (164 MB of RSS for
SmolLM2's 49k vocab, about 0.8 GB for a 262k one) and it trusts every count and length in the
file. Here a metadata field is a byte span decoded only on demand, and every count, length,
type and offset is checked against the file before anything is allocated. gguf-py still
supplies the type tables and the (de)quantizers.
"""

from __future__ import annotations

import os
import struct
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gguf_abliterate import names
from gguf_abliterate.errors import UserError
from gguf_abliterate.portable import open_read

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS

V = GGUFValueType
_SCALARS: dict[int, str] = {
    V.UINT8: "<u1", V.INT8: "<i1", V.UINT16: "<u2", V.INT16: "<i2", V.UINT32: "<u4", V.INT32: "<i4",
    V.FLOAT32: "<f4", V.BOOL: "?", V.UINT64: "<u8", V.INT64: "<i8", V.FLOAT64: "<f8",
}


class _Corrupt(Exception):
    """The file's structure is not valid GGUF; turned into a UserError naming the file."""


@dataclass(frozen=True)
class Field:
    """One metadata key/value pair: where its encoded bytes lie, and its value type."""

    key: str
    vtype: int
    start: int  # first byte of the key's length prefix
    value_start: int  # first byte of the value (after the type)
    end: int


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's info record, checked against the file."""

    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the row length) first
    tensor_type: GGMLQuantizationType
    data_offset: int  # absolute, in its file
    n_elements: int
    n_bytes: int
    part: int = 0  # which file of a split model holds it


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer."""

    def __init__(self, buf: memoryview, pos: int = 0):
        self.buf, self.pos = buf, pos

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Corrupt(f"needs {n} bytes at offset {self.pos}, past the end of the file")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def string(self) -> bytes:
        return bytes(self.take(self.u64()))

    def skip_value(self, vtype: int, depth: int = 0) -> None:
        """Move past one value of `vtype`, checking lengths before anything is read."""
        if vtype in _SCALARS:
            self.take(np.dtype(_SCALARS[vtype]).itemsize)
        elif vtype == V.STRING:
            self.take(self.u64())
        elif vtype == V.ARRAY:
            if depth > 4:
                raise _Corrupt("arrays nested too deeply")
            itype, count = self.u32(), self.u64()
            if itype in _SCALARS:
                self.take(count * np.dtype(_SCALARS[itype]).itemsize)
            elif itype == V.STRING:  # the vocabulary: hot, so inlined
                self._skip_strings(count)
            elif count > len(self.buf) - self.pos:  # every element takes at least a byte
                raise _Corrupt(f"array of {count} elements cannot fit in the file")
            else:
                for _ in range(count):
                    self.skip_value(itype, depth + 1)
        else:
            raise _Corrupt(f"unknown metadata value type {vtype}")


    def _skip_strings(self, count: int) -> None:
        pos, end, buf = self.pos, len(self.buf), self.buf
        for _ in range(count):
            if pos + 8 > end:
                raise _Corrupt(f"string array runs past the end of the file at offset {pos}")
            pos += 8 + _U64.unpack_from(buf, pos)[0]
        if pos > end:
            raise _Corrupt("string array runs past the end of the file")
        self.pos = pos


_U64 = struct.Struct("<Q")


class GGUFFile:
    """One GGUF file opened read-only: metadata, tensor infos and memory-mapped tensor data."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise UserError(f"{self.path}: not a GGUF file (magic {magic!r})")
        self.map = np.memmap(self.path, mode="r", dtype=np.uint8)
        self.fd = open_read(self.path)
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        try:
            self._parse(memoryview(self.map), size)
        except _Corrupt as e:
            raise UserError(f"{self.path}: truncated or corrupt GGUF file: {e}") from None

    def _parse(self, buf: memoryview, size: int) -> None:
        c = _Cursor(buf, 4)
        self.version = c.u32()
        if self.version not in SUPPORTED_VERSIONS:
            hint = " (big-endian files are not supported)" if self.version > 0xFFFF else ""
            raise _Corrupt(f"GGUF version {self.version} is not supported{hint}")
        n_tensors, n_kv = c.u64(), c.u64()
        if n_kv > size or n_tensors > size:
            raise _Corrupt(f"{n_kv} metadata keys / {n_tensors} tensors cannot fit in {size} bytes")
        self.fields: dict[str, Field] = {}
        for _ in range(n_kv):
            start = c.pos
            key = _utf8(c.string(), "metadata key")
            vtype = c.u32()
            value_start = c.pos
            c.skip_value(vtype)
            if key in self.fields:
                raise _Corrupt(f"duplicate metadata key {key}")
            self.fields[key] = Field(key, vtype, start, value_start, c.pos)
        self.alignment = DEFAULT_ALIGNMENT
        if names.ALIGNMENT in self.fields:
            align = self.get(names.ALIGNMENT)
            if self.fields[names.ALIGNMENT].vtype != V.UINT32 or align <= 0 or align & (align - 1):
                raise _Corrupt(f"{names.ALIGNMENT} must be a power-of-two uint32")
            self.alignment = int(align)
        infos = []
        for _ in range(n_tensors):
            name = _utf8(c.string(), "tensor name")
            n_dims = c.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise _Corrupt(f"tensor {name} has {n_dims} dimensions")
            dims = tuple(c.u64() for _ in range(n_dims))
            if 0 in dims:
                raise _Corrupt(f"tensor {name} has an empty dimension {list(dims)}")
            raw_type = c.u32()
            offset = c.u64()
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise _Corrupt(f"tensor {name} has unknown type {raw_type}") from None
            infos.append((name, dims, qtype, offset))
        self.data_start = c.pos + (-c.pos) % self.alignment
        self.tensors: dict[str, TensorInfo] = {}
        end_of_previous = 0
        for name, dims, qtype, offset in infos:
            bs, ts = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims, dtype=object))
            if dims[0] % bs:
                raise _Corrupt(f"tensor {name}: row of {dims[0]} values does not fit {qtype.name} blocks of {bs}")
            n_bytes = n // bs * ts
            if offset % self.alignment or offset < end_of_previous:
                raise _Corrupt(f"tensor {name}: offset {offset} is misaligned or overlaps the previous tensor")
            if self.data_start + offset + n_bytes > size:
                raise _Corrupt(f"tensor {name} runs past the end of the file (truncated download?)")
            if name in self.tensors:
                raise _Corrupt(f"duplicate tensor {name}")
            end_of_previous = offset + n_bytes
            self.tensors[name] = TensorInfo(name, dims, qtype, self.data_start + offset, n, n_bytes)

    def close(self) -> None:
        """Let go of the file now, not when collected: Windows cannot rename or delete an open
        file (the memory map closes with its last view)."""
        self._close_fd()
        del self.map

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (scalar, string or list), or `default`."""
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return _decode(_Cursor(memoryview(self.map), field.value_start), field.vtype)
        except UnicodeDecodeError:
            return default

    def kv_spans(self) -> Iterator[tuple[str, memoryview]]:
        """Each metadata key with its exact encoded bytes (key, type and value)."""
        for key, field in self.fields.items():
            yield key, memoryview(self.map)[field.start : field.end]



def _utf8(b: bytes, what: str) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        raise _Corrupt(f"{what} is not valid UTF-8") from None


def _decode(c: _Cursor, vtype: int) -> Any:
    """Decode one already-validated value at the cursor."""
    if vtype in _SCALARS:
        dt = np.dtype(_SCALARS[vtype])
        return np.frombuffer(c.take(dt.itemsize), dt)[0].item()
    if vtype == V.STRING:
        return c.string().decode("utf-8")
    itype, count = c.u32(), c.u64()
    if itype in _SCALARS:
        dt = np.dtype(_SCALARS[itype])
        return np.frombuffer(c.take(count * dt.itemsize), dt).tolist()
    return [_decode(c, itype) for _ in range(count)]
