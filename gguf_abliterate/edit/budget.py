"""`--size-budget +N%`: spend up to N% of the file's size where requantizing the edit costs the
most, by storing those edited matrices as Q8_0 instead of their own type.

What is measured, per edited matrix, is the squared error the written bytes have against the
float edit, sum (Q(W') - W')^2, in its own type (with the rounding the edit uses) and as Q8_0:
the edit itself is run twice on every candidate, so the budget roughly doubles the edit's
time. Tensors are upgraded by error removed per extra byte, largest first, while the extra
bytes fit. Input statistics (which weights the model's activations actually read) are not
used yet: all weights count alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from gguf import GGMLQuantizationType

from gguf_abliterate import quants
from gguf_abliterate.direction.file import Direction
from gguf_abliterate.edit.execute import Piece, edit_piece, pieces
from gguf_abliterate.edit.parallel import UnitRunner
from gguf_abliterate.edit.plan import EditPlan, TensorEdit, TensorKind
from gguf_abliterate.edit.project import axis_vector
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import rounding

UPGRADE = GGMLQuantizationType.Q8_0


def parse_budget(text: str) -> float:
    """'+5%' or '5%' (or '5') -> 0.05; refuses anything else, and shares outside [0.1%, 100%]."""
    m = re.fullmatch(r"\+?\s*(\d+(?:\.\d+)?)\s*%?", text.strip())
    if m is None or not 0.1 <= float(m.group(1)) <= 100:
        raise UserError(f"--size-budget {text!r}: give a share of the file's size, from +0.1% to +100%, e.g. +5%")
    return float(m.group(1)) / 100


@dataclass(frozen=True)
class Upgrade:
    """One edited matrix the budget stores as Q8_0."""

    name: str
    was: GGMLQuantizationType
    extra_bytes: int
    error_sq: float  # sum (Q(W') - W')^2 in its own type
    error_sq_upgraded: float  # ... as Q8_0


@dataclass
class Spent:
    """What the budget bought."""

    budget_bytes: int
    upgrades: list[Upgrade]
    error_sq_total: float  # over every candidate, in its own type

    @property
    def extra_bytes(self) -> int:
        return sum(u.extra_bytes for u in self.upgrades)

    @property
    def error_removed(self) -> float:
        """Share of the candidates' squared error the upgrades remove."""
        gain = sum(u.error_sq - u.error_sq_upgraded for u in self.upgrades)
        return gain / self.error_sq_total if self.error_sq_total > 0 else 0.0


def _piece_error(model: Model, piece: Piece) -> tuple[str, float]:
    """A piece's squared error against the float edit (only the number crosses processes)."""
    return piece.edit.name, edit_piece(model, piece).sums.error_sq


def _candidates(model: Model, plan: EditPlan) -> list[tuple[TensorEdit, TensorEdit, int]]:
    """(edit, the same stored as Q8_0, extra bytes) for every matrix Q8_0 would enlarge."""
    out = []
    for e in plan.edits.values():
        t = model.tensors[e.name]
        if e.kind is not TensorKind.MATRIX or int(t.shape[0]) % quants.block_size(UPGRADE):
            continue
        extra = quants.row_bytes(UPGRADE, int(t.n_elements)) - quants.row_bytes(e.out_type, int(t.n_elements))
        if extra > 0:
            out.append((e, _upgraded(e), extra))
    return out


def _upgraded(e: TensorEdit) -> TensorEdit:
    return replace(e, out_type=UPGRADE, aware=e.aware and rounding.supports(UPGRADE))


def measurement_pieces(model: Model, plan: EditPlan, direction: Direction) -> list[Piece]:
    """The pieces the measurement runs: every candidate in its own type, then as Q8_0."""
    return [p for e, up, _ in _candidates(model, plan) for edit in (e, up)
            for p in pieces(model, edit, axis_vector(model, edit, direction))]


def spend_budget(model: Model, plan: EditPlan, todo: list[Piece], share: float, jobs: int,
                 progress: Callable[[int], None] = lambda n: None) -> Spent:
    """Run the measurement pieces (`measurement_pieces`) and choose the upgrades
    (`apply_upgrades` puts them in the plan)."""
    budget = int(share * sum(int(t.n_bytes) for t in model.tensors.values()))
    errors: dict[tuple[str, GGMLQuantizationType], float] = {}
    with UnitRunner(model, jobs, _piece_error) as runner:
        for piece, (name, err) in zip(todo, runner.results((p,) for p in todo)):
            key = (name, piece.edit.out_type)
            errors[key] = errors.get(key, 0.0) + err
            progress(1)
    options = [Upgrade(e.name, e.out_type, extra, errors[e.name, e.out_type], errors[e.name, UPGRADE])
               for e, _, extra in _candidates(model, plan)]
    options.sort(key=lambda u: (u.error_sq - u.error_sq_upgraded) / u.extra_bytes, reverse=True)
    chosen, used = [], 0
    for u in options:
        if u.error_sq > u.error_sq_upgraded and used + u.extra_bytes <= budget:
            chosen.append(u)
            used += u.extra_bytes
    return Spent(budget, chosen, sum(u.error_sq for u in options))


def apply_upgrades(plan: EditPlan, spent: Spent) -> None:
    """Store the chosen matrices as Q8_0 in the plan."""
    for u in spent.upgrades:
        plan.edits[u.name] = _upgraded(plan.edits[u.name])
