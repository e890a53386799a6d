"""Compensated (`gptq`) rounding's statistics: what each edited matrix reads, measured in llama.cpp.

The runtime's hook sums, per block, the second moments of the inputs of the attention output
projection (`kqv_out`) and of the dense MLP's down projection (`ffn_swiglu` / `ffn_geglu`) in
diagonal blocks (`rounding.column_block`) while the model runs chat prompts. Each such
matrix's edit then carries its blocks, and `rounding.keep_edit_compensated` weighs rounding
errors by them. Other edited tensors (embeddings, MoE experts, writers of other mixers) keep
aware rounding.

What an edit rounds by is one of its inputs, never hidden state: the same command on the same
files writes the same bytes on any machine, whatever earlier runs left in a cache.
- `direction` writes the moments of its own prompt passes (at no extra model run) into a
  statistics file beside a .safetensors output, `NAME.statistics.safetensors`, and records
  its name and sha256 in the direction file; `optimise --from` carries that record into its
  result. `--statistics FILE` names a statistics file outright.
- The default rounding (`auto`) is gptq exactly when the edit is given statistics of this
  model (their file records the model's sha256), else aware.
- `--rounding gptq` without given statistics measures them the one fixed way
  (`measure_and_store`: `PROMPTS` prompts of each kind). Only that measurement is cached, per
  model: the cache saves the minute, it cannot change a byte.
The edited file records the statistics it used (`abliterate.statistics`).
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gguf_abliterate import zoo
from gguf_abliterate.direction import prompts as P
from gguf_abliterate.edit.options import Rounding
from gguf_abliterate.edit.plan import EditPlan, TensorKind
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.gguf_io.model import model_digest
from gguf_abliterate.gguf_io.atomic import atomic_path
from gguf_abliterate.quants import rounding

PROMPTS = 32  # of each kind: a few thousand tokens, ten times the widest column block
MEASURED = f"edit --rounding gptq ({2 * PROMPTS} prompts)"  # the source of the one cached measurement
SUFFIX = ".statistics.safetensors"
READERS = {"attn_output": "attn", "ffn_down": "mlp"}  # writer -> the input the hook names

if TYPE_CHECKING:  # llama-cpp-python is optional: the runtime is imported only when it runs
    from gguf_abliterate.direction.file import Direction
    from gguf_abliterate.runtime.llama import InputMoments, LlamaModel


def measure_moments(m: LlamaModel, per_kind: int = PROMPTS,
                    progress: Callable[[int], None] = lambda n: None) -> InputMoments:
    """The writers' input moments of a loaded model on `per_kind` harmless and harmful
    direction prompts, eight prompts a pass."""
    bad, good = P.default_prompts("direction")
    prompts = good[:per_kind] + bad[:per_kind]
    with m.input_moments(rounding.column_block) as moments:
        for i in range(0, len(prompts), 8):
            m.next_token_logprobs(prompts[i : i + 8])
            progress(len(prompts[i : i + 8]))
    return moments


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
    env = os.environ.get("GGUF_ABLITERATE_MOMENTS")
    return Path(env) if env else zoo.cache_dir() / "moments"


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


def encode_statistics(model: Model, moments: InputMoments, source: str) -> StoredMoments:
    """A model's measured moments as a statistics file's bytes (`data`, written by
    `write_statistics`) and as rounding must use them. The file records the model's sha256, so
    it is never applied to another model."""
    from safetensors.numpy import save

    means = moments.means()
    _refuse_non_finite(means)
    tensors = _encode(means)
    measured = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    meta = {"source": source, "tokens": str(moments.tokens), "measured": measured, "model": model.path.name,
            "model_sha256": model_digest(model)}
    data = save(tensors, metadata=meta)
    return StoredMoments(tensors, moments.tokens, source, measured, None, hashlib.sha256(data).hexdigest(), data)


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
        stored = StoredMoments(tensors, int(meta["tokens"]), meta["source"], meta["measured"], path, zoo.sha256(path))
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: damaged {what} ({e}); delete the file") from None
    return stored, meta


def measure_and_store(model: Model, progress: Callable[[int], None] = lambda n: None) -> StoredMoments:
    """Run the model on `PROMPTS` prompts of each kind and cache the moments. Needs
    llama-cpp-python (a clear error otherwise)."""
    from gguf_abliterate.runtime.llama import LlamaModel

    with LlamaModel(model.path) as m:
        moments = measure_moments(m, PROMPTS, progress)
    stored = encode_statistics(model, moments, MEASURED)
    path = moments_dir() / f"{model_digest(model)}.safetensors"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_statistics(path, stored)
    except OSError:  # no cache: the moments still serve this run
        return stored


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


def resolve_rounding(rounding: Rounding, given: StoredMoments | None,
                     model: Model) -> tuple[Rounding, StoredMoments | None]:
    """AUTO becomes GPTQ when the edit is given statistics, else AWARE; GPTQ comes with the
    given statistics, else the cached measurement (None: it must be measured)."""
    if rounding is Rounding.AUTO:
        return (Rounding.AWARE, None) if given is None else (Rounding.GPTQ, given)
    if rounding is Rounding.GPTQ:
        return rounding, given or cached_measurement(model)
    return rounding, None


def attach_moments(model: Model, plan: EditPlan, stored: StoredMoments) -> int:
    """Put the stored moments of the plan's dense writers in the plan; returns how many
    edits got them."""
    count = 0
    for name, e in list(plan.edits.items()):
        hit = re.fullmatch(r"blk\.(\d+)\.(attn_output|ffn_down)\.weight", name)
        if not (e.aware and e.kind is TensorKind.MATRIX and hit):
            continue
        got = stored.get(READERS[hit[2]], int(hit[1]))
        n_in = int(model.tensors[name].shape[0])
        if got is not None and got.shape[0] * got.shape[1] == n_in and rounding.compensates(e.out_type, n_in):
            plan.edits[name] = replace(e, moments=got)
            count += 1
    if count:
        plan.statistics = stored.recorded()
    return count
