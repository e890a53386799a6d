"""The search space: what a trial chooses, within which ranges, and what the user fixed.

Ranges follow the best published searches (heretic and its descendants), scaled to the
model's depth L: the direction index in [0.4, 0.9] x (L-1) (or each block its own
direction), directions orthogonal to the harmless mean or not, and per component a kernel
with peak strength in [0, 1.5] (0 switches the component off; strengths above 1 over-remove),
peak position in [0.4, 1.0] x (L-1), edge strength as a fraction [0, 1] of the peak, and
half-width in [1, 0.6 (L-1)] blocks. The components are attention and MLP, and on a
mixture-of-experts model the experts too (routed stacks and the shared expert, searched like
the others: a third kernel).

The projection is the plain one: a trial runs as an exact rank-1 adapter inside llama.cpp, so
only an edit method whose record says `low_rank` (`edit/project.py`) could be searched; the
norm-preserving one (every column rescaled) has no exact low-rank form, and stays an option
of the edit itself (`--method`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from gguf_abliterate.edit.schedule import EditParams, Kernel
from gguf_abliterate.errors import UserError

KERNEL_FIELDS = ("peak", "position", "edge", "width")
# the names --fix accepts, with how to read a value
FIXABLE: dict[str, type] = {
    "direction_index": str,  # a number, or "per-block"
    "orthogonal": bool,
    **{f"{c}.{f}": float for c in ("attn", "mlp", "experts") for f in KERNEL_FIELDS},
}
PER_BLOCK = "per-block"


def parse_fixed(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """`--fix NAME=VALUE` items -> {name: value}, checked."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or name not in FIXABLE:
            raise UserError(f"--fix {item!r}: expected NAME=VALUE with NAME one of {', '.join(FIXABLE)}")
        try:
            if name == "direction_index":
                out[name] = None if raw == PER_BLOCK else float(raw)
            elif name == "orthogonal":
                if raw.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError(raw)
                out[name] = raw.lower() in ("true", "yes", "1")
            else:
                out[name] = float(raw)
        except ValueError:
            raise UserError(f"--fix {item!r}: bad value for {name}") from None
    return out


def suggest(trial: Any, n_layer: int, fixed: Mapping[str, Any], experts: bool = False) -> EditParams:
    """The parameters of one Optuna trial: sampled, except where `fixed`; with `experts`, the
    experts' kernel too."""
    top = n_layer - 1

    def pick(name: str, sample: Any) -> Any:
        return fixed[name] if name in fixed else sample()

    index: float | None
    if "direction_index" in fixed:
        index = fixed["direction_index"]
    elif trial.suggest_categorical("direction_scope", ["global", PER_BLOCK]) == "global":
        index = trial.suggest_float("direction_index", 0.4 * top, 0.9 * top)
    else:
        index = None
    orthogonal = pick("orthogonal", lambda: trial.suggest_categorical("orthogonal", [True, False]))

    def kernel(c: str) -> Kernel:
        return Kernel(
            peak=pick(f"{c}.peak", lambda: trial.suggest_float(f"{c}.peak", 0.0, 1.5)),
            position=pick(f"{c}.position", lambda: trial.suggest_float(f"{c}.position", 0.4 * top, 1.0 * top)),
            edge=pick(f"{c}.edge", lambda: trial.suggest_float(f"{c}.edge", 0.0, 1.0)),
            width=pick(f"{c}.width", lambda: trial.suggest_float(f"{c}.width", 1.0, max(1.0, 0.6 * top))),
        )

    return EditParams(index, bool(orthogonal), kernel("attn"), kernel("mlp"),
                      experts=kernel("experts") if experts else None)


SEED_INDEX = 0.6  # where the seeds take their direction without a measured block: mid-range


def seeds(n_layer: int, fixed: Mapping[str, Any], layer: int | None = None, experts: bool = False) -> list[dict[str, Any]]:
    """Trials a new search runs first, before sampling: the single-direction edit of `direction`
    and the edit command (the direction of `layer`, the block `direction` chose, else of the
    middle of the range; every writer from 0.1 (L-1) up at strength 1, as far as the space
    reaches), plain and orthogonalised. Random trials mostly fail to remove refusal at all (the
    guard's half-trials); these give the sampler's first model an edit that works, and the
    search spends its trials improving on it. Fixed parameters are left out (never sampled)."""
    top = n_layer - 1
    index = float(np.clip(SEED_INDEX * top if layer is None else layer, 0.4 * top, 0.9 * top))
    flat = {"peak": 1.0, "position": 0.7 * top, "edge": 1.0, "width": max(1.0, 0.6 * top)}
    out = []
    for orthogonal in (False, True):
        params: dict[str, Any] = {"direction_scope": "global", "direction_index": index, "orthogonal": orthogonal}
        for c in ("attn", "mlp", *(("experts",) if experts else ())):
            params |= {f"{c}.{f}": v for f, v in flat.items()}
        if "direction_index" in fixed:
            del params["direction_scope"], params["direction_index"]
        out.append({k: v for k, v in params.items() if k not in fixed})
    return out if "orthogonal" not in fixed else out[:1]


def describe(params: Mapping[str, Any]) -> tuple[str, str, str]:
    """A trial's direction and its kernels in a few characters each, for tables:
    ("index 12.50 orth", "1.00@15.0 w4.0 e0.20", ...) with peak@position, half-width, edge; a
    trial with an experts kernel shows it after the MLP's ("... / experts ...")."""
    def kernel(k: Mapping[str, float]) -> str:
        return f"{k['peak']:.2f}@{k['position']:.1f} w{k['width']:.1f} e{k['edge']:.2f}"

    d = PER_BLOCK if params["direction_index"] is None else f"index {params['direction_index']:.2f}"
    d += " orth" if params["orthogonal"] else ""
    mlp = kernel(params["mlp"])
    if params.get("experts"):
        mlp += f" / experts {kernel(params['experts'])}"
    return d, kernel(params["attn"]), mlp
