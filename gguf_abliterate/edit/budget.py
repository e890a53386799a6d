"""`--size-budget +N%`: spend up to N% of the file's size where requantizing the edit costs the
most, by storing those edited matrices in a larger type than their own.

Each edited matrix may climb a ladder of larger types (LADDER: Q5_K, Q6_K, Q8_0, those a row
fits and that are larger than its own type). What is measured, per matrix and rung, is the
squared error the written bytes have against the float edit, sum (Q(W') - W')^2, with the
rounding the edit uses: the edit is run once per rung on every candidate. The choice is the
classic greedy for a knapsack with several options per item: each matrix's rungs are reduced
to the steps on the upper convex hull of (extra bytes, error removed), all steps are taken by
error removed per extra byte, largest first, a matrix's steps in order, while the bytes fit.

Why a ladder and not Q8_0 alone: a Q4_K matrix requantized to Q4_K keeps about ten times the
squared error of the same edit in Q6_K, which costs half the extra bytes of Q8_0; so a budget
that upgrades half the worst matrices to Q8_0 can lift all of them to Q6_K. Input statistics
(which weights the model's activations actually read) are not used: all weights count alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace

from gguf import GGMLQuantizationType

from gguf_abliterate import quants
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.edit.execute import Piece, edit_piece, pieces
from gguf_abliterate.edit.parallel import UnitRunner
from gguf_abliterate.edit.plan import EditPlan, TensorEdit, TensorKind
from gguf_abliterate.edit.project import axis_vector
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import rounding

Q = GGMLQuantizationType
LADDER = (Q.Q5_K, Q.Q6_K, Q.Q8_0)


def parse_budget(text: str) -> float:
    """'+5%' or '5%' (or '5') -> 0.05; refuses anything else, and shares outside [0.1%, 100%]."""
    m = re.fullmatch(r"\+?\s*(\d+(?:\.\d+)?)\s*%?", text.strip())
    if m is None or not 0.1 <= float(m.group(1)) <= 100:
        raise UserError(f"--size-budget {text!r}: give a share of the file's size, from +0.1% to +100%, e.g. +5%")
    return float(m.group(1)) / 100


@dataclass(frozen=True)
class Upgrade:
    """One edited matrix the budget stores in a larger type."""

    name: str
    was: GGMLQuantizationType
    now: GGMLQuantizationType
    extra_bytes: int
    error_sq: float  # sum (Q(W') - W')^2 in its own type
    error_sq_upgraded: float  # ... in the type it is now stored as


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

    def describe(self) -> str:
        """'3 tensors (Q4_K -> Q6_K: 2, Q4_K -> Q8_0: 1)'."""
        moves: dict[str, int] = {}
        for u in self.upgrades:
            key = f"{u.was.name} -> {u.now.name}"
            moves[key] = moves.get(key, 0) + 1
        detail = ", ".join(f"{k}: {n}" for k, n in sorted(moves.items()))
        return f"{len(self.upgrades)} tensors" + (f" ({detail})" if detail else "")


def _piece_error(model: Model, piece: Piece) -> tuple[str, float]:
    """A piece's squared error against the float edit (only the number crosses processes)."""
    return piece.edit.name, edit_piece(model, piece).sums.error_sq


def rungs(model: Model, edit: TensorEdit) -> list[tuple[TensorEdit, int]]:
    """(the edit stored as a larger ladder type, extra bytes) for each rung its rows fit."""
    if edit.kind is not TensorKind.MATRIX:
        return []
    t = model.tensors[edit.name]
    n, own = int(t.n_elements), quants.row_bytes(edit.out_type, int(t.n_elements))
    return [(_stored_as(edit, q), quants.row_bytes(q, n) - own)
            for q in LADDER
            if int(t.shape[0]) % quants.block_size(q) == 0 and quants.row_bytes(q, n) > own]


def _stored_as(edit: TensorEdit, qtype: GGMLQuantizationType) -> TensorEdit:
    """The edit written as `qtype`, rounded aware if it was and the type allows."""
    return replace(edit, out_type=qtype, aware=edit.aware and rounding.supports(qtype))


def measurement_pieces(model: Model, plan: EditPlan, direction: Direction) -> list[Piece]:
    """The pieces the measurement runs: every candidate in its own type, then in each rung."""
    out = []
    for e in plan.edits.values():
        steps = rungs(model, e)
        for edit in ([e, *(r for r, _ in steps)] if steps else []):
            out.extend(pieces(model, edit, axis_vector(model, edit, direction)))
    return out


def hull_steps(extra: list[int], gain: list[float]) -> list[int]:
    """Indices of the options (extra bytes, error removed; option -1 is 'stay', at (0, 0)) on
    the upper convex hull, in order of size: the steps worth taking, each at a lower error
    removed per byte than the one before."""
    order = sorted(range(len(extra)), key=lambda i: extra[i])
    chosen: list[int] = []
    at_x, at_y = 0, 0.0
    while True:
        best, best_slope = None, 0.0
        for i in order:
            if extra[i] > at_x and gain[i] > at_y:
                slope = (gain[i] - at_y) / (extra[i] - at_x)
                if best is None or slope > best_slope or (slope == best_slope and extra[i] > extra[best]):
                    best, best_slope = i, slope
        if best is None:
            return chosen
        chosen.append(best)
        at_x, at_y = extra[best], gain[best]


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
    # every hull step of every matrix: (error removed per byte, matrix, step index, upgrade)
    steps: list[tuple[float, str, int, Upgrade]] = []
    total = 0.0
    for e in plan.edits.values():
        options = rungs(model, e)
        if not options:
            continue
        own = errors[e.name, e.out_type]
        total += own
        ups = [Upgrade(e.name, e.out_type, r.out_type, extra, own, errors[e.name, r.out_type]) for r, extra in options]
        prev_x, prev_y = 0, 0.0
        for k, i in enumerate(hull_steps([u.extra_bytes for u in ups], [own - u.error_sq_upgraded for u in ups])):
            u = ups[i]
            steps.append(((own - u.error_sq_upgraded - prev_y) / (u.extra_bytes - prev_x), e.name, k, u))
            prev_x, prev_y = u.extra_bytes, own - u.error_sq_upgraded
    steps.sort(key=lambda s: s[0], reverse=True)
    chosen: dict[str, Upgrade] = {}
    taken: dict[str, int] = {}  # matrix -> steps taken; a matrix whose step did not fit stops there
    blocked: set[str] = set()
    used = 0
    for _, name, k, u in steps:
        if name in blocked or taken.get(name, 0) != k:
            continue
        more = u.extra_bytes - (chosen[name].extra_bytes if name in chosen else 0)
        if used + more > budget:
            blocked.add(name)
            continue
        chosen[name], taken[name], used = u, k + 1, used + more
    return Spent(budget, list(chosen.values()), total)


def apply_upgrades(plan: EditPlan, spent: Spent) -> None:
    """Store the chosen matrices in their new types in the plan."""
    for u in spent.upgrades:
        plan.edits[u.name] = _stored_as(plan.edits[u.name], u.now)
