"""Reading GGUF files (header, metadata, tensor infos) and writing them back atomically.

We parse GGUF ourselves rather than with gguf-py's `GGUFReader`: that reader makes a numpy
view per array element, which costs about 3 KB per vocabulary entry (164 MB of RSS for
SmolLM2's 49k vocab, about 0.8 GB for a 262k one) and it trusts every count and length in the
file. Here a metadata field is a byte span decoded only on demand, and every count, length,
type and offset is checked against the file before anything is allocated. gguf-py still
supplies the type tables and the (de)quantizers.

The writer copies every metadata field as the exact bytes it had (empty arrays and strings
that are not valid UTF-8 included), and streams tensor data tensor by tensor: untouched
tensors with copy_file_range, never through this process's memory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gguf_abliterate.errors import UserError
from gguf_abliterate.quants import dequantize

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
    data_offset: int  # absolute, in the file
    n_elements: int
    n_bytes: int


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


class Model:
    """A GGUF file opened read-only: metadata, tensor infos and memory-mapped tensor data."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise UserError(f"{self.path}: not a GGUF file (magic {magic!r})")
        self._map = np.memmap(self.path, mode="r", dtype=np.uint8)
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)
        try:
            self._parse(memoryview(self._map), size)
        except _Corrupt as e:
            raise UserError(f"{self.path}: truncated or corrupt GGUF file: {e}") from None
        self.arch = self.get_str("general.architecture")
        if self.arch is None:
            raise UserError(f"{self.path}: no general.architecture key")

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
        if "general.alignment" in self.fields:
            align = self.get("general.alignment")
            if self.fields["general.alignment"].vtype != V.UINT32 or align <= 0 or align & (align - 1):
                raise _Corrupt("general.alignment must be a power-of-two uint32")
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

    def get(self, key: str, default: Any = None) -> Any:
        """The value of a metadata key (scalar, string or list), or `default`."""
        field = self.fields.get(key)
        if field is None:
            return default
        try:
            return _decode(_Cursor(memoryview(self._map), field.value_start), field.vtype)
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
        """A tensor's stored bytes as uint8 `(..., row_bytes)` in numpy axis order, memory-mapped."""
        t = self.tensors[name]
        data = self._map[t.data_offset : t.data_offset + t.n_bytes]
        return data.reshape(*reversed(t.shape[1:]), -1)

    def n_rows(self, name: str) -> int:
        """Rows of a tensor (all dims but ne0, flattened)."""
        t = self.tensors[name]
        return int(t.n_elements) // int(t.shape[0])

    def read_rows(self, name: str, first: int, count: int) -> np.ndarray:
        """Stored bytes of rows `first .. first+count` as a fresh uint8 `(count, row_bytes)` array.

        Read with pread rather than through the memory map, so that pages of a large model do
        not pile up in this process's resident set.
        """
        t = self.tensors[name]
        rb = int(t.n_bytes) // self.n_rows(name)
        buf = np.empty(count * rb, dtype=np.uint8)
        view, done, offset = memoryview(buf), 0, t.data_offset + first * rb
        while done < buf.nbytes:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise UserError(f"{self.path}: unexpected end of file in tensor {name}")
            done += n
        return buf.reshape(count, rb)

    def values(self, name: str) -> np.ndarray:
        """A whole tensor dequantized to float32, numpy axis order (last axis = ggml ne0)."""
        return dequantize(self.raw(name), self.tensors[name].tensor_type)

    def kv_spans(self) -> Iterator[tuple[str, memoryview]]:
        """Each metadata key with its exact encoded bytes (key, type and value)."""
        for key, field in self.fields.items():
            yield key, memoryview(self._map)[field.start : field.end]


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


@dataclass
class OutTensor:
    """One tensor of the output file: its info, and where its bytes come from.

    Either `chunks` produces the bytes, or `copy_of` names an input tensor copied verbatim
    (in the kernel, with copy_file_range, never through this process's memory).
    """

    name: str
    dims: tuple[int, ...]  # ggml order: ne0 first
    qtype: GGMLQuantizationType
    chunks: Callable[[], Iterable[np.ndarray]] | None = None
    copy_of: str | None = None

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
    check: Callable[[Path], None] | None = None,
) -> None:
    """Write `tensors` with `src`'s metadata (less keys under `drop_kv_prefix`, plus `new_kv`).

    The file is written beside `dst` under a temporary name and renamed over `dst` only when
    complete (and accepted by `check`), so an error, Ctrl-C or SIGTERM never leaves a partial
    output behind.
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

    with atomic_output(dst, check) as f:
        _write_all(f, header + b"".join(kv) + infos)
        _write_all(f, b"\0" * _pad(f.tell(), align))
        for t in tensors:
            written = 0
            if t.copy_of is not None:
                src_t = src.tensors[t.copy_of]
                written = _copy_range(src._fd, f, src_t.data_offset, int(src_t.n_bytes), on_bytes)
            else:
                assert t.chunks is not None
                for chunk in t.chunks():
                    chunk = np.ascontiguousarray(chunk).view(np.uint8)
                    _write_all(f, memoryview(chunk).cast("B"))
                    written += chunk.nbytes
                    on_bytes(chunk.nbytes)
            if written != t.nbytes:
                raise RuntimeError(f"internal error: {t.name} produced {written} bytes, expected {t.nbytes}")
            _write_all(f, b"\0" * _pad(written, align))


def _write_all(f: IO[bytes], data: bytes | memoryview) -> None:
    """Write everything (an unbuffered file may write less than asked)."""
    view = memoryview(data).cast("B")
    while view:
        n = f.write(view)
        view = view[n:]


_COPY_STEP = 64 << 20


def _copy_range(src_fd: int, f: IO[bytes], offset: int, nbytes: int, on_bytes: Callable[[int], None]) -> int:
    """Copy `nbytes` of the input at `offset` to the output's current position."""
    done = 0
    while done < nbytes:
        step = min(_COPY_STEP, nbytes - done)
        try:
            n = os.copy_file_range(src_fd, f.fileno(), step, offset + done)
        except OSError:  # e.g. EXDEV or a filesystem without it: fall back to read/write
            n = 0
        if n == 0:
            chunk = os.pread(src_fd, step, offset + done)
            if not chunk:
                raise UserError(f"unexpected end of input file at offset {offset + done}")
            _write_all(f, chunk)
            n = len(chunk)
        done += n
        on_bytes(n)
    return done

@contextlib.contextmanager
def atomic_output(dst: Path, check: Callable[[Path], None] | None = None) -> Iterator[IO[bytes]]:
    """A binary file that becomes `dst` only if the block finishes; removed on any failure.

    `check`, if given, inspects the complete temporary file before it replaces `dst` and
    raises to refuse it. SIGTERM is turned into KeyboardInterrupt for the duration so that it
    cleans up too.
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
        with os.fdopen(fd, "wb", buffering=0) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
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
