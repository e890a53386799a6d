"""An edit that varies over the blocks: which direction each block removes, and how strongly
each component (attention output, MLP down, and on mixture-of-experts models the experts) does.

The parameters are those the optimiser searches (`EditParams`); `resolve` turns them into a
`Schedule`, per block: a unit direction and a strength per component.

- Directions: per block, the difference of means measured there, optionally made
  orthogonal to that block's harmless mean (`r - (r.g) g`, g the unit harmless mean, so the
  edit leaves the mean harmless activation alone). With a *direction index* x, every block
  uses one direction: the blend `(1 - f) r[i] + f r[i+1]` of the two blocks around x
  (i = floor(x), f = x - i), normalised; without one, each block uses its own.
- Strengths: per component, a kernel over the blocks: `peak` at block `position`, falling
  linearly to `edge * peak` at `width` blocks away, and 0 beyond. A peak of 0 switches the
  component off; peaks above 1 over-remove.

Every direction is a linear combination of a fixed basis (the per-block directions, plain
then orthogonalised): `coefficients @ basis`, normalised. The optimiser relies on that to
build a trial's adapter from precomputed products `basis @ W` without touching the weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

import numpy as np
from gguf import MODEL_TENSOR

from gguf_abliterate.arch import Writer
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.errors import UserError


class Method(str, Enum):
    """How a writer matrix is projected."""

    PLAIN = "plain"  # W' = W - s u u^T W
    NORM_PRESERVING = "norm-preserving"  # the same, then every column rescaled to its old length
    STEER = "steer"  # W' = W + s u w^T: a fixed vector along u added to the output (edit/steer.py)


class Component(str, Enum):
    """The kinds of residual writers a strength applies to: the token mixer (attention, or the
    linear attention, SSM or short convolution standing in for it), the dense MLP, and the
    experts (routed stacks and the shared expert). A schedule without its own experts strength
    gives them the MLP's."""

    ATTN = "attn"
    MLP = "mlp"
    EXPERTS = "experts"


_EXPERT_TENSORS = (MODEL_TENSOR.FFN_DOWN_EXP, MODEL_TENSOR.FFN_DOWN_SHEXP)


def component_of(writer: Writer) -> Component:
    """Which strength applies to a writer."""
    if writer.mixer:
        return Component.ATTN
    return Component.EXPERTS if writer.tensor in _EXPERT_TENSORS else Component.MLP


def strength_of(strengths: Mapping[Component, np.ndarray], writer: Writer) -> np.ndarray:
    """A writer's per-block strengths: its component's, the MLP's for experts without their own."""
    component = component_of(writer)
    if component is Component.EXPERTS and component not in strengths:
        component = Component.MLP
    return strengths[component]


@dataclass(frozen=True)
class Kernel:
    """A strength profile over the blocks."""

    peak: float  # strength at `position`
    position: float  # block where the strength peaks (may be fractional)
    edge: float  # strength at `width` blocks from the peak, as a fraction of the peak
    width: float  # blocks from the peak to the edge; 0 beyond

    def weights(self, n_layer: int) -> np.ndarray:
        distance = np.abs(np.arange(n_layer, dtype=np.float64) - self.position)
        inside = distance <= self.width
        frac = distance / self.width if self.width > 0 else np.zeros(n_layer)
        w = self.peak + (self.edge * self.peak - self.peak) * frac
        return np.where(inside, w, 0.0).astype(np.float32)


@dataclass(frozen=True)
class EditParams:
    """Everything that decides a scheduled edit."""

    direction_index: float | None  # None: each block its own direction
    orthogonal: bool  # directions made orthogonal to each block's harmless mean
    attn: Kernel
    mlp: Kernel
    method: Method = Method.PLAIN
    experts: Kernel | None = None  # None: the experts follow the MLP kernel (and dense models have none)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["method"] = self.method.value
        if self.experts is None:
            del d["experts"]  # a dense model's parameters read as they always did
        return d

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> EditParams:
        try:
            return cls(None if d["direction_index"] is None else float(d["direction_index"]),  # type: ignore[arg-type]
                       bool(d["orthogonal"]), Kernel(**d["attn"]), Kernel(**d["mlp"]),  # type: ignore[arg-type]
                       Method(d.get("method", Method.PLAIN.value)),
                       Kernel(**d["experts"]) if d.get("experts") else None)  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"unreadable edit parameters {json.dumps(d)[:200]} ({e})") from None


@dataclass
class Schedule:
    """Per block: the unit direction removed and each component's strength."""

    coefficients: np.ndarray  # (n_layer, n_basis): each block's direction in the basis, unnormalised
    directions: np.ndarray  # (n_layer, n_embd) unit rows: coefficients @ basis, normalised
    strengths: dict[Component, np.ndarray] = field(default_factory=dict)  # (n_layer,) each
    method: Method = Method.PLAIN


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1)


def basis(per_block: np.ndarray, harmless_means: np.ndarray) -> np.ndarray:
    """(2 n_layer, n_embd) float64: each block's unit difference of means, then the same made
    orthogonal to that block's unit harmless mean."""
    r = _unit(per_block.astype(np.float64))
    g = _unit(harmless_means.astype(np.float64))
    orth = _unit(r - np.sum(r * g, axis=1, keepdims=True) * g)
    return np.concatenate([r, orth])


def resolve(params: EditParams, per_block: np.ndarray, harmless_means: np.ndarray) -> Schedule:
    """The schedule `params` describe, for a model with these measured directions."""
    n_layer = per_block.shape[0]
    offset = n_layer if params.orthogonal else 0
    coefficients = np.zeros((n_layer, 2 * n_layer))
    # Blocks where the two sets did not differ at all (a short convolution that sees only the
    # chat template's last tokens, as in LFM2's first blocks) have no direction of their own:
    # per block, they borrow the nearest measured one and are left unedited.
    measured = np.flatnonzero(np.linalg.norm(per_block, axis=1) > 0)
    if measured.size == 0:
        raise UserError("the direction file's measured directions are all zero")
    unmeasured = np.ones(n_layer, bool)
    unmeasured[measured] = False
    if params.direction_index is None:
        own = measured[np.abs(np.arange(n_layer)[:, None] - measured[None, :]).argmin(axis=1)]
        coefficients[np.arange(n_layer), offset + own] = 1
    else:
        x = float(np.clip(params.direction_index, 0, n_layer - 1))
        i = min(int(x), n_layer - 2) if n_layer > 1 else 0
        f = x - i
        coefficients[:, offset + i] = 1 - f
        if n_layer > 1:
            coefficients[:, offset + i + 1] = f
    directions = _unit(coefficients @ basis(per_block, harmless_means)).astype(np.float32)
    if not np.all(np.isfinite(directions)) or np.any(np.linalg.norm(directions, axis=1) < 0.5):
        raise UserError("the edit parameters give a zero direction (opposite blocks blended?)")
    strengths = {Component.ATTN: params.attn.weights(n_layer), Component.MLP: params.mlp.weights(n_layer)}
    if params.experts is not None:
        strengths[Component.EXPERTS] = params.experts.weights(n_layer)
    if params.direction_index is None:
        for weights in strengths.values():
            weights[unmeasured] = 0
    return Schedule(coefficients, directions, strengths, params.method)


@dataclass
class ScheduledEdit:
    """A direction file's schedule, ready to plan: per-block directions and strengths."""

    direction: Direction  # its vectors: one direction per block
    strengths: dict[Component, np.ndarray]
    method: Method
    trial: int | None


def scheduled_edit(direction: Direction, trial: int | None = None) -> ScheduledEdit | None:
    """The schedule a direction file holds (its chosen trial, or trial number `trial`), or
    None for a plain direction."""
    if trial is None:
        if not direction.strengths:
            return None
        chosen = direction.metadata.get("chosen_trial") or None
        return ScheduledEdit(direction, {Component(c): s for c, s in direction.strengths.items()},
                             Method(direction.metadata.get("method", Method.PLAIN.value)),
                             None if chosen is None else int(chosen))
    trials = {t.get("number"): t for t in direction.trials}
    if not trials:
        raise UserError("--trial: this direction file holds no search trials (optimise makes such files)")
    if trial not in trials:
        numbers = sorted(n for n in trials if isinstance(n, int))
        raise UserError(f"--trial {trial}: the file holds trials {numbers[0]}-{numbers[-1]}" if numbers
                        else f"--trial {trial}: the file's trials have no numbers")
    if direction.per_block is None or direction.harmless_means is None:
        raise UserError("--trial: the file lacks the measured directions or harmless means needed to rebuild a trial")
    s = resolve(EditParams.from_dict(trials[trial]["params"]), direction.per_block, direction.harmless_means)
    return ScheduledEdit(replace(direction, vectors=s.directions), s.strengths, s.method, trial)
