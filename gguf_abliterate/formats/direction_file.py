"""The direction-file format, in one place: load, validate, normalise, save.

A direction file holds either one vector of length n_embd (used for every edited block) or
an array `(n_layer, n_embd)` (row N for block N). Formats:

- `.npy`: the bare array, loaded with `allow_pickle=False`.
- `.safetensors`: tensor `direction` with the same shapes, plus string metadata. Keys we
  read and write: `layer` (the block whose output, llama.cpp's `l_out-L`, the direction was
  measured at), `behaviour` (the pack's name) and `sign` (`positive-minus-negative`: the edit
  removes what the positive set has more of; files from before packs say
  `harmful-minus-harmless`, the refusal pack's), `model`, `architecture`, `n_embd`. What `direction` measures adds the tensors
  `directions` (every block's direction), `harmless_means` (every block's mean harmless
  activation), one value per block for each of `STATISTICS` and, for dense models,
  `mlp_input_means` (every block's mean MLP down-projection input, which `--steer` reads)
  (`save_measured`).
  What `optimise` finds adds `attn_strength` and `mlp_strength` (the strength per block of
  each component; then `direction` holds one direction per block) and the metadata
  `method`, `trials` (JSON: every trial's parameters and scores) and `chosen_trial`
  (`save_schedule`). What `direction --capability` measures adds `head_scores` (n_layer x
  n_head: how much each head writes along the failure side) and the metadata `heads` (the
  heads its edit changes); what `optimise --capability` picks adds `edit_strength` (the signed
  strength the edit takes when given no --scale or --reverse). `Direction` gives all of them back.

Vectors need not be unit length; they are normalised here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gguf_abliterate.errors import UserError
from gguf_abliterate.textfile import parse_json
from gguf_abliterate.gguf_io.atomic import atomic_path

TENSOR_NAME = "direction"
PER_BLOCK = "directions"
HARMLESS_MEANS = "harmless_means"
MLP_INPUT_MEANS = "mlp_input_means"  # per block, the mean input of the MLP down projection (for --steer)
HEAD_SCORES = "head_scores"  # a capability direction's (n_layer, n_head): each head's write along failure
STRENGTHS = {"attn": "attn_strength", "mlp": "mlp_strength", "experts": "experts_strength"}  # component -> tensor
# per-block statistics a measured file holds, one float32 per block (NaN where not measured);
# harmful/harmless name the positive/negative sets, and `layer_score` is the pack's layer measure
STATISTICS = ("harmful_mean_norm", "harmless_mean_norm", "diff_norm", "separation", "layer_score", "kl")
RENAMED = {"refusal_mass": "layer_score"}  # statistics files made before packs call otherwise
SIGN = "positive-minus-negative"  # a pack's direction: what its positive set has more of
LEGACY_SIGN = "harmful-minus-harmless"  # the refusal pack's sign, as files before packs wrote it
LAYER_CONVENTION = "l_out-L: residual stream after block L, last prompt token"


@dataclass
class Direction:
    """Unit direction(s) in the residual stream, and where they came from."""

    vectors: np.ndarray  # float32, (n_embd,) for all blocks or (n_layer, n_embd)
    sha256: str
    metadata: dict[str, str] = field(default_factory=dict)
    per_block: np.ndarray | None = None  # every block's measured direction (n_layer, n_embd), as stored
    statistics: dict[str, np.ndarray] = field(default_factory=dict)  # STATISTICS, (n_layer,) each
    harmless_means: np.ndarray | None = None  # (n_layer, n_embd)
    strengths: dict[str, np.ndarray] = field(default_factory=dict)  # component -> (n_layer,): a schedule
    mlp_input_means: np.ndarray | None = None  # (n_layer, n_ff), over every token of the direction prompts
    head_scores: np.ndarray | None = None  # HEAD_SCORES, of a capability direction

    @property
    def trials(self) -> list[dict[str, Any]]:
        """The trials of the search that made this file (empty for a measured direction)."""
        trials = parse_json(self.metadata.get("trials", "[]"), "direction file metadata 'trials'")
        if not isinstance(trials, list):
            raise UserError("direction file metadata 'trials' is not a list")
        return trials

    @property
    def behaviour(self) -> str | None:
        """The pack this direction came from: files from before packs are refusal directions;
        a bare `.npy` says nothing."""
        if "behaviour" in self.metadata:
            return self.metadata["behaviour"]
        return "refusal" if self.metadata.get("sign") == LEGACY_SIGN else None

    @property
    def n_embd(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def per_layer(self) -> bool:
        return self.vectors.ndim == 2

    def for_block(self, block: int) -> np.ndarray:
        """The unit vector to remove from block `block`'s writers (block 0 for token_embd)."""
        return self.vectors[block] if self.per_layer else self.vectors

    def check_fits(self, n_layer: int, n_embd: int, arch: str) -> None:
        """Refuse a direction that was made for a model of another shape or family."""
        if self.n_embd != n_embd:
            raise UserError(f"direction has length {self.n_embd}, but the model's n_embd is {n_embd}")
        if self.per_layer and self.vectors.shape[0] != n_layer:
            raise UserError(
                f"direction has {self.vectors.shape[0]} rows, but the model has {n_layer} blocks "
                f"(use one row per block, or a single vector)"
            )
        made_for = self.metadata.get("architecture")
        if made_for and made_for != arch:
            raise UserError(f"direction was made for a {made_for} model, not {arch}")


def normalise(vectors: np.ndarray, what: str = "direction") -> np.ndarray:
    """Unit-normalise each row in float64; refuse NaN/Inf, zero norm, bad rank or dtype."""
    if vectors.dtype.kind not in "fiu":
        raise UserError(f"{what} must be a numeric array, not {vectors.dtype}")
    v = np.asarray(vectors, dtype=np.float64)
    if v.ndim == 2 and v.shape[0] == 1:
        v = v[0]
    if v.ndim not in (1, 2) or v.shape[-1] == 0:
        raise UserError(f"{what} must be a vector (n_embd,) or an array (n_layer, n_embd), got shape {v.shape}")
    if not np.isfinite(v).all():
        raise UserError(f"{what} contains NaN or Inf")
    norms = np.linalg.norm(v, axis=-1, keepdims=True)
    if (norms == 0).any():
        rows = np.flatnonzero(norms.ravel() == 0)
        where = f" (rows {', '.join(map(str, rows[:8]))})" if v.ndim == 2 else ""
        raise UserError(f"{what} has zero norm{where}")
    return (v / norms).astype(np.float32)


def file_digest(path: Path) -> str:
    """The sha256 a bake records as its direction's (`abliterate.direction_sha256`)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_direction(path: str | Path) -> Direction:
    """Load and normalise a `.npy` or `.safetensors` direction file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such direction file")
    digest = file_digest(path)
    suffix = path.suffix.lower()
    metadata: dict[str, str] = {}
    extra: dict[str, np.ndarray] = {}
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise UserError(f"{path}: not a plain numeric .npy array ({e})") from None
        except EOFError:  # an empty or cut file (click would print only "Aborted!" for it)
            raise UserError(f"{path}: the .npy file is empty or cut short") from None
        except Exception as e:  # numpy parses the header as Python: a damaged one raises SyntaxError, TokenError...
            raise UserError(f"{path}: unreadable .npy file ({type(e).__name__}: {str(e)[:100]})") from None
    elif suffix == ".safetensors":
        array, metadata, extra = _load_safetensors(path)
    else:
        raise UserError(f"{path}: direction files must be .npy or .safetensors")
    strengths = {c: np.asarray(extra[t], np.float32) for c, t in STRENGTHS.items() if t in extra}
    if strengths and (array.ndim != 2 or any(s.shape != (array.shape[0],) for s in strengths.values())):
        raise UserError(f"{path}: per-block strengths need one direction per block, and one strength each")
    return Direction(normalise(array, f"{path.name}"), digest, metadata, extra.get(PER_BLOCK),
                     {k: extra[k] for k in STATISTICS if k in extra}, extra.get(HARMLESS_MEANS), strengths,
                     extra.get(MLP_INPUT_MEANS), extra.get(HEAD_SCORES))


def _load_safetensors(path: Path) -> tuple[np.ndarray, dict[str, str], dict[str, np.ndarray]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            if TENSOR_NAME not in names:
                raise UserError(f"{path}: no tensor named {TENSOR_NAME!r} (has: {', '.join(names) or 'none'})")
            wanted = (PER_BLOCK, HARMLESS_MEANS, MLP_INPUT_MEANS, HEAD_SCORES, *STATISTICS, *RENAMED, *STRENGTHS.values())
            extra = {RENAMED.get(k, k): f.get_tensor(k) for k in wanted if k in names}
            return f.get_tensor(TENSOR_NAME), dict(f.metadata() or {}), extra
    except (SafetensorError, OSError, TypeError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable .safetensors file ({e})") from None


def check_direction_path(path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in (".npy", ".safetensors"):
        raise UserError(f"{path}: direction files must be .npy or .safetensors")
    return path


def save_direction(path: str | Path, vectors: np.ndarray, metadata: dict[str, str] | None = None,
                   extra: dict[str, np.ndarray] | None = None) -> None:
    """Write a direction file atomically; `.npy` keeps only the array, `.safetensors` keeps
    metadata and any `extra` tensors (per-layer directions and statistics) too."""
    path = check_direction_path(path)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    with atomic_path(path) as tmp:
        if path.suffix.lower() == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, vectors, allow_pickle=False)
        else:
            from safetensors.numpy import save

            meta = {"behaviour": "refusal", "sign": SIGN, **(metadata or {})}
            tensors = {TENSOR_NAME: vectors, **{k: np.ascontiguousarray(v) for k, v in (extra or {}).items()}}
            tmp.write_bytes(save(tensors, metadata={k: str(v) for k, v in meta.items()}))


def save_measured(path: str | Path, directions: np.ndarray, harmless_means: np.ndarray, chosen: int,
                  statistics: dict[str, np.ndarray], metadata: dict[str, str],
                  mlp_input_means: np.ndarray | None = None) -> None:
    """What `direction` measured: block `chosen`'s direction (what the edit uses), every
    block's, the harmless means, the per-block statistics and (dense models) the MLP input
    means; `layer` and the conventions go into the metadata."""
    missing = set(STATISTICS) - set(statistics)
    if missing:
        raise ValueError(f"statistics missing: {sorted(missing)}")
    meta = {"layer": str(chosen), "layer_convention": LAYER_CONVENTION, **metadata}
    extra = {PER_BLOCK: directions, HARMLESS_MEANS: np.asarray(harmless_means, np.float32),
             **{k: np.asarray(statistics[k], np.float32) for k in STATISTICS}}
    if mlp_input_means is not None:
        extra[MLP_INPUT_MEANS] = np.asarray(mlp_input_means, np.float32)
    save_direction(path, directions[chosen], meta, extra)


def save_schedule(path: str | Path, directions: np.ndarray, strengths: dict[str, np.ndarray],
                  per_block: np.ndarray, harmless_means: np.ndarray, metadata: dict[str, str],
                  trials: list[dict[str, Any]], chosen_trial: int | None) -> None:
    """What `optimise` found: the chosen trial's direction per block and strength per block of
    each component, plus everything needed to bake any other trial (`trials`, the measured
    per-block directions and harmless means)."""
    meta = {"layer_convention": LAYER_CONVENTION, **metadata, "trials": json.dumps(trials),
            "chosen_trial": "" if chosen_trial is None else str(chosen_trial)}
    extra = {PER_BLOCK: per_block, HARMLESS_MEANS: np.asarray(harmless_means, np.float32),
             **{STRENGTHS[c]: np.asarray(v, np.float32) for c, v in strengths.items()}}
    save_direction(path, directions, meta, extra)
