"""Compensated (`gptq`) rounding's statistics: what each edited matrix reads, measured in llama.cpp.

The runtime's hook sums, per block, the second moments of the inputs of the attention output
projection (`kqv_out`) and of the dense MLP's down projection (`ffn_swiglu` / `ffn_geglu`) in
diagonal blocks (`rounding.column_block`) while the model runs chat prompts. Each such
matrix's edit then carries its blocks, and `rounding.keep_edit_compensated` weighs rounding
errors by them. Other edited tensors (embeddings, MoE experts, writers of other mixers) keep
aware rounding.

The moments belong to the model file, not to a direction, so they are cached per model (by
the sha256 of its bytes): `direction` stores those of its prompt passes (at no extra model
run), and `--rounding gptq` measures them only when none are stored. The default rounding
(`auto`) is gptq exactly when they are. They are always used as stored, so a fresh measurement
and a cached one round to the same bytes.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
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
READERS = {"attn_output": "attn", "ffn_down": "mlp"}  # writer -> the input the hook names

if TYPE_CHECKING:  # llama-cpp-python is optional: the runtime is imported only when it runs
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
    path: Path | None  # the cache file (None: the cache could not be written)

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


def store_moments(model: Model, moments: InputMoments, source: str) -> StoredMoments:
    """Cache a model's measured moments; returns them as stored (what rounding must use).
    A cache that cannot be written is skipped (path None): the moments still serve this run."""
    from safetensors.numpy import save

    means = moments.means()
    _refuse_non_finite(means)
    tensors = _encode(means)
    measured = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    path: Path | None = moments_dir() / f"{model_digest(model)}.safetensors"
    meta = {"source": source, "tokens": str(moments.tokens), "measured": measured, "model": model.path.name}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(save(tensors, metadata=meta))
    except OSError:
        path = None
    return StoredMoments(tensors, moments.tokens, source, measured, path)


def load_moments(model: Model) -> StoredMoments | None:
    """The model's cached moments, or None if none are stored."""
    from safetensors import SafetensorError, safe_open

    path = moments_dir() / f"{model_digest(model)}.safetensors"
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = dict(f.metadata() or {})
            tensors = _check({k: f.get_tensor(k) for k in f.keys()})
        return StoredMoments(tensors, int(meta["tokens"]), meta["source"], meta["measured"], path)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: damaged cached input statistics ({e}); delete the file") from None


def measure_and_store(model: Model, progress: Callable[[int], None] = lambda n: None) -> StoredMoments:
    """Run the model on `PROMPTS` prompts of each kind and cache the moments. Needs
    llama-cpp-python (a clear error otherwise)."""
    from gguf_abliterate.runtime.llama import LlamaModel

    with LlamaModel(model.path) as m:
        moments = measure_moments(m, PROMPTS, progress)
    return store_moments(model, moments, f"edit --rounding gptq ({2 * PROMPTS} prompts)")


def resolve_rounding(model: Model, rounding: Rounding) -> tuple[Rounding, StoredMoments | None]:
    """AUTO becomes GPTQ when the model's moments are cached, else AWARE; GPTQ (and AUTO)
    come with the cached moments (GPTQ with None: they must be measured)."""
    if rounding not in (Rounding.AUTO, Rounding.GPTQ):
        return rounding, None
    stored = load_moments(model)
    if rounding is Rounding.AUTO:
        return (Rounding.AWARE if stored is None else Rounding.GPTQ), stored
    return rounding, stored


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
    return count
