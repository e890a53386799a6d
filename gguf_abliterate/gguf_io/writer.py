"""Writing GGUF files: one file, or every part of a split model.

Metadata is copied as the exact bytes it had (empty arrays and strings that are not valid
UTF-8 included; gguf-py's GGUFWriter refuses the former). Untouched tensors are copied inside
the kernel where the platform can (`portable.copy_range`), never through this process's memory. All the files are
written through `atomic.atomic_paths`: they appear together, only when complete (and
accepted by `check`).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io.atomic import atomic_paths
from gguf_abliterate.gguf_io.model import SPLIT_NAME, Model, split_path
from gguf_abliterate.gguf_io.reader import GGUF_MAGIC
from gguf_abliterate.names import SPLIT_KEYS
from gguf_abliterate.portable import copy_range, read_at

@dataclass(frozen=True)
class Reserved:
    """A string value known only once the tensors are written: `width` bytes are reserved in
    the header and filled with `fill()` (space-padded) before the file is renamed."""

    width: int
    fill: Callable[[], str]


KVValue = str | bool | int | float | Reserved


@dataclass
class OutTensor:
    """One tensor of the output: its info, and where its bytes come from.

    Either `chunks` produces the bytes, or `copy_of` names an input tensor copied verbatim.
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


@dataclass
class OutFile:
    """One output file: its destination, metadata (encoded) and tensors."""

    path: Path
    version: int
    alignment: int
    kv: list[bytes | memoryview] = field(default_factory=list)
    tensors: list[OutTensor] = field(default_factory=list)
    # (offset of the value within the metadata bytes, what fills it)
    reserved: list[tuple[int, Reserved]] = field(default_factory=list)


def _pack_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def pack_kv(key: str, value: KVValue) -> bytes:
    """Encode one new metadata key/value pair (string, bool, int64, float32, or a reserved string)."""
    if isinstance(value, Reserved):
        value = " " * value.width
    if isinstance(value, bool):
        body = struct.pack("<I?", GGUFValueType.BOOL, value)
    elif isinstance(value, int):
        body = struct.pack("<Iq", GGUFValueType.INT64, value)
    elif isinstance(value, float):
        body = struct.pack("<If", GGUFValueType.FLOAT32, value)
    else:
        body = struct.pack("<I", GGUFValueType.STRING) + _pack_str(str(value))
    return _pack_str(key) + body


def output_paths(src: Model, out: Path, merge: bool) -> list[Path]:
    """Where the output goes: `out`, or one part per input part, named like llama.cpp's splits.

    `out` may be `name.gguf` (parts become `name-0000K-of-0000N.gguf`) or already a part name.
    """
    n = len(src.parts)
    if merge or n == 1:
        return [out]
    m = SPLIT_NAME.match(out.name)
    if m and int(m["count"]) != n:
        raise UserError(f"{out.name}: the model has {n} parts, not {int(m['count'])}")
    prefix = out.with_name(m["prefix"]) if m else out.with_suffix("") if out.suffix == ".gguf" else out
    return [split_path(prefix, i, n) for i in range(n)]


def plan_files(src: Model, out: Path, tensors: list[OutTensor], new_kv: dict[str, KVValue],
               drop_kv_prefix: str, merge: bool) -> list[OutFile]:
    """Lay the output tensors out as the input was: same parts, same tensors in each.

    `new_kv` goes into the first part; keys under `drop_kv_prefix` are dropped; `merge` writes
    a single file without the `split.*` keys.
    """
    paths = output_paths(src, out, merge)
    files = []
    for i, path in enumerate(paths):
        part = src.parts[i]
        drop = (drop_kv_prefix, *SPLIT_KEYS) if merge and src.is_split else (drop_kv_prefix,)
        kv: list[bytes | memoryview] = [span for key, span in part.kv_spans() if not key.startswith(drop)]
        reserved = []
        if i == 0:
            for k, v in new_kv.items():
                packed = pack_kv(k, v)
                if isinstance(v, Reserved):
                    reserved.append((sum(len(b) for b in kv) + len(packed) - v.width, v))
                kv.append(packed)
        mine = tensors if len(paths) == 1 else [t for t in tensors if src.tensors[t.name].part == i]
        files.append(OutFile(path, part.version, part.alignment, kv, mine, reserved))
    return files


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


def write_files(src: Model, files: list[OutFile], on_bytes: Callable[[int], None] = lambda n: None,
                check: Callable[[list[Path]], None] | None = None) -> None:
    """Write every file under a temporary name; rename them all once all are complete."""
    with atomic_paths([f.path for f in files], check) as tmps:
        for spec, tmp in zip(files, tmps):
            with open(tmp, "wb", buffering=0) as f:
                _write_one(src, spec, f, on_bytes)


def _write_one(src: Model, spec: OutFile, f: IO[bytes], on_bytes: Callable[[int], None]) -> None:
    align = spec.alignment
    infos = bytearray()
    offset = 0
    for t in spec.tensors:
        infos += _pack_str(t.name)
        infos += struct.pack(f"<I{len(t.dims)}Q", len(t.dims), *t.dims)
        infos += struct.pack("<IQ", t.qtype, offset)
        offset += t.nbytes + _pad(t.nbytes, align)
    header = GGUF_MAGIC + struct.pack("<IQQ", spec.version, len(spec.tensors), len(spec.kv))
    _write_all(f, header + b"".join(spec.kv) + infos)
    kv_start = len(header)
    _write_all(f, b"\0" * _pad(f.tell(), align))
    for t in spec.tensors:
        written = 0
        if t.copy_of is not None:
            src_t = src.tensors[t.copy_of]
            written = _copy_range(src.file_of(t.copy_of).fd, f, src_t.data_offset, int(src_t.n_bytes), on_bytes)
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
    for offset, slot in spec.reserved:
        value = slot.fill().encode()
        if len(value) > slot.width:
            raise RuntimeError(f"internal error: {len(value)} bytes for a slot of {slot.width}")
        f.seek(kv_start + offset)
        _write_all(f, value.ljust(slot.width))


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
        n = copy_range(src_fd, f.fileno(), step, offset + done)
        if n == 0:
            chunk = read_at(src_fd, step, offset + done)
            if not chunk:
                raise UserError(f"unexpected end of input file at offset {offset + done}")
            _write_all(f, chunk)
            n = len(chunk)
        done += n
        on_bytes(n)
    return done


def restamp(path: Path, key: str, value: str) -> None:
    """Replace the string value of metadata `key` in place by one of the same encoded length:
    every other byte of the file stays where it is (a search's kept bake gets its result file's
    final digest without a second bake)."""
    from gguf_abliterate.gguf_io.reader import GGUFFile

    f = GGUFFile(path)
    try:
        field = f.fields.get(key)
        new = value.encode()
        if field is None or field.vtype != GGUFValueType.STRING:
            raise ValueError(f"{path}: no string {key} to replace")
        if struct.unpack_from("<Q", f.map, field.value_start)[0] != len(new):
            raise ValueError(f"{path}: {key} holds a value of another length")
        at = field.value_start + 8
    finally:
        f.close()
    with open(path, "r+b") as out:
        out.seek(at)
        out.write(new)
