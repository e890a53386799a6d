"""The input-statistics file: a model's writer-input moments, as `gptq` rounding reads them.

`direction` measures, per block, the second moments of the inputs of the attention output
projection (`kqv_out`) and of the dense MLP's down projection (`ffn_swiglu` / `ffn_geglu`) in
diagonal blocks (`rounding.column_block`), and writes them beside a .safetensors direction
file as `NAME.statistics.safetensors` (each block's upper triangle, float32), with metadata
`source`, `tokens`, `measured` (UTC date), `model` and `model_sha256`: a file is never applied
to another model. The direction file records its name and sha256 (`statistics`,
`statistics_sha256`); `optimise --from` carries that record on.

What an edit rounds by is one of its inputs, never hidden state: only the one fixed
measurement `--rounding gptq` makes when it is given none (`MEASURED`) is cached, per model,
so the cache saves time and cannot change a byte.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gguf_abliterate import pip_models
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.gguf_io.atomic import atomic_path
from gguf_abliterate.gguf_io.model import model_digest

if TYPE_CHECKING:
    from gguf_abliterate.formats.direction_file import Direction

PROMPTS = 32  # of each kind in the fixed measurement: a few thousand tokens, ten times the widest column block
MEASURED = f"edit --rounding gptq ({2 * PROMPTS} prompts)"  # the source of the one cached measurement
SUFFIX = ".statistics.safetensors"
READERS = {"attn_output": "attn", "ffn_down": "mlp"}  # writer -> the input the hook names


@dataclass(frozen=True)
class StoredMoments:
    """A model's writer-input moments as stored (each symmetric block's upper triangle), and
    where they came from."""

    tensors: dict[str, np.ndarray]  # "{kind}.{block}": (n_in / B, B (B + 1) / 2) float32
    tokens: int
    source: str  # what measured them, e.g. "direction (refusal, 144 prompts)"
    measured: str  # when (UTC date)
    path: Path | None  # the file (None: not written, or the cache could not be)
    sha256: str = ""  # of the file's bytes, as an edited file records it
    data: bytes = field(default=b"", repr=False)  # the file's bytes, when encoded here

    def get(self, kind: str, block: int) -> np.ndarray | None:
        """(n_in / B, B, B) float32, or None if none were stored for that input."""
        packed = self.tensors.get(f"{kind}.{block}")
        if packed is None:
            return None
        width = _width(packed.shape[1])
        upper = np.triu_indices(width)
        m = np.zeros((packed.shape[0], width, width), np.float32)
        m[:, upper[0], upper[1]] = packed
        m[:, upper[1], upper[0]] = packed
        return m

    def describe(self) -> str:
        return f"{self.source}, {self.tokens} tokens, {self.measured}"

    def recorded(self) -> str:
        """What an edited file records of them: the source, and a digest of the moments
        themselves (not of their file, which holds the date they were measured on: the same
        edit on another day must write the same bytes)."""
        digest = hashlib.sha256()
        for key in sorted(self.tensors):
            digest.update(key.encode() + b"\0" + np.ascontiguousarray(self.tensors[key]).tobytes())
        return f"{self.source}, {self.tokens} tokens; moments sha256 {digest.hexdigest()}"


def _width(packed: int) -> int:
    """B from B (B + 1) / 2 (0 if it is no such number)."""
    b = int((np.sqrt(8 * packed + 1) - 1) / 2)
    return b if b * (b + 1) // 2 == packed else 0


def moments_dir() -> Path:
    """`$GGUF_ABLITERATE_MOMENTS`, else `moments/` in the model cache."""
    return pip_models.cache_subdir("GGUF_ABLITERATE_MOMENTS", "moments")


def _encode(means: dict[tuple[str, int], np.ndarray]) -> dict[str, np.ndarray]:
    """Each block's upper triangle: exact, and half the size (0.15 GB for a 1.5B model).
    (float16 would halve it again, but its rounding can leave a block of nearly dependent
    inputs, as under a massive activation, without an inverse.)"""
    out = {}
    for (kind, block), m in means.items():
        upper = np.triu_indices(m.shape[1])
        out[f"{kind}.{block}"] = np.ascontiguousarray(m[:, upper[0], upper[1]], dtype=np.float32)
    return out


def _check(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors of a stored file, if they are what `_encode` writes (ValueError if not)."""
    for key, m in tensors.items():
        kind, _, block = key.partition(".")
        if not (kind in READERS.values() and block.isdigit() and m.dtype == np.float32 and m.ndim == 2
                and _width(m.shape[1]) and np.isfinite(m).all()):
            raise ValueError(f"unexpected tensor {key} {m.dtype} {m.shape}")
    return tensors


def _refuse_non_finite(means: dict[tuple[str, int], np.ndarray]) -> None:
    """Moments llama.cpp measured as NaN or Inf come from a broken model: say so, before they
    are cached (a cached NaN would make the next run blame the cache instead)."""
    writer = {kind: name for name, kind in READERS.items()}
    bad = sorted((block, writer[kind]) for (kind, block), m in means.items() if not np.isfinite(m).all())
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"llama.cpp computed NaN or Inf in the inputs of blk.{bad[0][0]}.{bad[0][1]}.weight{more} "
                        f"while measuring them: the model file is broken, or overflows")


def encode_statistics(model: Model, means: dict[tuple[str, int], np.ndarray], tokens: int,
                      source: str) -> StoredMoments:
    """A model's measured moments as a statistics file's bytes (`data`, written by
    `write_statistics`) and as rounding must use them. The file records the model's sha256, so
    it is never applied to another model."""
    from safetensors.numpy import save

    _refuse_non_finite(means)
    tensors = _encode(means)
    measured = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    meta = {"source": source, "tokens": str(tokens), "measured": measured, "model": model.path.name,
            "model_sha256": model_digest(model)}
    data = save(tensors, metadata=meta)
    return StoredMoments(tensors, tokens, source, measured, None, hashlib.sha256(data).hexdigest(), data)


def write_statistics(path: Path, stored: StoredMoments) -> StoredMoments:
    with atomic_path(path) as tmp:
        tmp.write_bytes(stored.data)
    return replace(stored, path=path)


def load_statistics(path: Path, model: Model) -> StoredMoments:
    """A statistics file, checked: readable, made for this model."""
    if not path.is_file():
        raise UserError(f"{path}: no such statistics file")
    stored, meta = _read_statistics(path, "input statistics")
    if meta.get("model_sha256") != model_digest(model):
        raise UserError(f"{path}: input statistics of another model ({meta.get('model', '?')}), not of "
                        f"{model.path.name}")
    return stored


def cached_measurement(model: Model) -> StoredMoments | None:
    """The one measurement `--rounding gptq` makes (`MEASURED`), if the cache holds it for this
    model; anything else in the cache (an older version's, without a model digest, or another
    source's) is not used."""
    path = moments_dir() / f"{model_digest(model)}.safetensors"
    if not path.is_file():
        return None
    stored, meta = _read_statistics(path, "cached input statistics")
    return stored if meta.get("model_sha256") == model_digest(model) and stored.source == MEASURED else None


def _read_statistics(path: Path, what: str) -> tuple[StoredMoments, dict[str, str]]:
    """A statistics file as stored, and its metadata (the model it records, by name and sha256)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = _check({k: f.get_tensor(k) for k in f.keys()})
        stored = StoredMoments(tensors, int(meta["tokens"]), meta["source"], meta["measured"], path, pip_models.sha256(path))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: damaged {what} ({e}); delete the file") from None
    return stored, meta


def statistics_path(direction_output: Path) -> Path:
    """Where `direction` writes the statistics of a .safetensors output: beside it."""
    return direction_output.with_name(direction_output.name.removesuffix(direction_output.suffix) + SUFFIX)


def given_statistics(model: Model, direction: Direction, direction_path: Path,
                     explicit: Path | None) -> tuple[StoredMoments | None, str | None]:
    """The statistics an edit is given: `explicit` (--statistics), else those the direction
    file names (`statistics`, relative to its folder, with their sha256); and a note when the
    direction names statistics that cannot be used (missing, changed, another model's)."""
    if explicit is not None:
        return load_statistics(explicit, model), None
    name = direction.metadata.get("statistics")
    if not name:
        return None, None
    path = direction_path.parent / name
    try:
        stored = load_statistics(path, model)
    except UserError as e:
        return None, f"{direction_path.name} names input statistics that cannot be used ({e})"
    if stored.sha256 != direction.metadata.get("statistics_sha256"):
        return None, f"{path} is not the statistics file {direction_path.name} was measured with (its sha256 differs)"
    return stored, None


