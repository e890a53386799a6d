"""Reading GGUF files through gguf-py's memory-mapped reader, and writing them back atomically.

The writer copies every metadata field of the input as raw bytes instead of re-encoding it
through gguf-py's `GGUFWriter`: that keeps every value exactly (empty arrays, which
`GGUFWriter` refuses, and strings that are not valid UTF-8 included) and avoids turning a
262k-entry vocabulary into Python objects. Tensor data is streamed tensor by tensor.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderTensor

from gguf_abliterate.errors import UserError
from gguf_abliterate.quants import dequantize

GGUF_MAGIC = b"GGUF"
# Fields GGUFReader synthesises from the fixed header; they are not key/value pairs.
_HEADER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")


class Model:
    """A GGUF file opened read-only: metadata, tensor infos and memory-mapped tensor data."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise UserError(f"{self.path}: not a GGUF file (magic {magic!r})")
        try:
            self.reader = GGUFReader(self.path, "r")
        except (ValueError, KeyError, IndexError, OverflowError, UnicodeDecodeError, MemoryError) as e:
            raise UserError(f"{self.path}: unreadable GGUF file: {e}") from None
        if self.reader.byte_order != "I":
            raise UserError(f"{self.path}: big-endian GGUF files are not supported")
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self.reader.tensors}
        size = self.path.stat().st_size
        for t in self.reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise UserError(f"{self.path}: tensor {t.name} runs past the end of the file (truncated?)")
        self.arch = self.get_str("general.architecture")
        if self.arch is None:
            raise UserError(f"{self.path}: no general.architecture key")

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (scalar, string or list), or `default`."""
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except UnicodeDecodeError:
            return default

    def get_str(self, key: str) -> str | None:
        value = self.get(key)
        return value if isinstance(value, str) else None

    def arch_int(self, suffix: str) -> int:
        """An integer hyper-parameter `<arch>.<suffix>`, required."""
        value = self.get(f"{self.arch}.{suffix}")
        if not isinstance(value, int):
            raise UserError(f"{self.path}: missing integer key {self.arch}.{suffix}")
        return value

    @property
    def n_layer(self) -> int:
        return self.arch_int("block_count")

    @property
    def n_embd(self) -> int:
        return self.arch_int("embedding_length")

    def raw(self, name: str) -> np.ndarray:
        """A tensor's stored bytes as uint8 `(..., row_bytes)`, memory-mapped."""
        t = self.tensors[name]
        data = t.data
        return data.view(np.uint8).reshape(*data.shape[:-1], -1)

    def values(self, name: str, rows: slice | None = None) -> np.ndarray:
        """A tensor dequantized to float32, numpy axis order (last axis = ggml ne0)."""
        t = self.tensors[name]
        raw = self.raw(name)
        if rows is not None:
            raw = raw[rows]
        return dequantize(raw, t.tensor_type)

    def kv_spans(self) -> Iterator[tuple[str, memoryview]]:
        """Each metadata key with its exact encoded bytes (key, type and value)."""
        for name, field in self.reader.fields.items():
            if name in _HEADER_FIELDS:
                continue
            size = sum(int(p.nbytes) for p in field.parts)
            yield name, memoryview(self.reader.data[field.offset : field.offset + size])

    @property
    def version(self) -> int:
        return int(self.reader.fields["GGUF.version"].parts[0][0])

    @property
    def alignment(self) -> int:
        return int(self.reader.alignment)


@dataclass
class OutTensor:
    """One tensor of the output file: its info, and the chunks of bytes that make its data."""

    name: str
    dims: tuple[int, ...]  # ggml order: ne0 first
    qtype: GGMLQuantizationType
    chunks: Callable[[], Iterable[np.ndarray]]

    @property
    def nbytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.dims, dtype=np.int64))
        return n // bs * ts


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def pack_kv(key: str, value: str | bool | int | float) -> bytes:
    """Encode one new metadata key/value pair (string, bool, int64 or float32)."""
    if isinstance(value, bool):
        body = struct.pack("<I?", GGUFValueType.BOOL, value)
    elif isinstance(value, int):
        body = struct.pack("<Iq", GGUFValueType.INT64, value)
    elif isinstance(value, float):
        body = struct.pack("<If", GGUFValueType.FLOAT32, value)
    else:
        body = struct.pack("<I", GGUFValueType.STRING) + _pack_str(str(value))
    return _pack_str(key) + body


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


def write_model(
    src: Model,
    dst: Path,
    tensors: list[OutTensor],
    new_kv: dict[str, str | bool | int | float],
    drop_kv_prefix: str,
    on_bytes: Callable[[int], None] = lambda n: None,
) -> None:
    """Write `tensors` with `src`'s metadata (less keys under `drop_kv_prefix`, plus `new_kv`).

    The file is written beside `dst` under a temporary name and renamed over `dst` only when
    complete, so an error, Ctrl-C or SIGTERM never leaves a partial output behind.
    """
    kv = [span for key, span in src.kv_spans() if not key.startswith(drop_kv_prefix)]
    kv += [memoryview(pack_kv(k, v)) for k, v in new_kv.items()]
    align = src.alignment
    infos = bytearray()
    offset = 0
    for t in tensors:
        infos += _pack_str(t.name)
        infos += struct.pack("<I", len(t.dims))
        infos += struct.pack(f"<{len(t.dims)}Q", *t.dims)
        infos += struct.pack("<IQ", t.qtype, offset)
        offset += t.nbytes + _pad(t.nbytes, align)
    header = GGUF_MAGIC + struct.pack("<IQQ", src.version, len(tensors), len(kv))

    with atomic_output(dst) as f:
        f.write(header)
        for span in kv:
            f.write(span)
        f.write(infos)
        f.write(b"\0" * _pad(f.tell(), align))
        for t in tensors:
            written = 0
            for chunk in t.chunks():
                chunk = np.ascontiguousarray(chunk).view(np.uint8)
                f.write(memoryview(chunk).cast("B"))
                written += chunk.nbytes
                on_bytes(chunk.nbytes)
            if written != t.nbytes:
                raise RuntimeError(f"internal error: {t.name} produced {written} bytes, expected {t.nbytes}")
            f.write(b"\0" * _pad(written, align))


@contextlib.contextmanager
def atomic_output(dst: Path) -> Iterator[IO[bytes]]:
    """A binary file that becomes `dst` only if the block finishes; removed on any failure.

    SIGTERM is turned into KeyboardInterrupt for the duration so that it cleans up too.
    """
    dst = Path(dst)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".partial", dir=dst.parent or ".")
    tmp = Path(tmp_name)

    def _on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_term) if in_main else None
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
