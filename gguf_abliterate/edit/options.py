"""What the user asked the edit to do: frozen options, choices as enums, layer ranges."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from gguf import GGMLQuantizationType

from gguf_abliterate.errors import UserError


class Rounding(str, Enum):
    """How edited weights are rounded back to codes."""

    AWARE = "aware"  # keep the edit through requantization (quants.rounding)
    NEAREST = "nearest"  # plain ggml rounding
    GPTQ = "gptq"  # aware, and each error offset in correlated columns by the inputs' statistics
    AUTO = "auto"  # gptq if the edit is given the model's input statistics (edit/moments.py), else aware


class OutFormat(str, Enum):
    """What the edit is written as."""

    GGUF = "gguf"  # the whole edited model
    LORA = "lora"  # an exact rank-1 adapter for llama.cpp


@dataclass(frozen=True, kw_only=True)
class EditOptions:
    """The edit as asked for, built by keyword."""

    reverse: bool = False
    scale: float = 1.0
    layers: frozenset[int] | None = None  # None: every block
    embeddings: bool | None = None  # None: on unless the embeddings are tied to the LM head
    requant_type: GGMLQuantizationType | None = None
    rounding: Rounding = Rounding.AWARE  # AUTO is resolved by the command, never planned
    steer: float | None = None  # add this many mean differences at the direction's block instead (edit/steer.py)
    size_budget: float | None = None  # share of the file's size the edit may add (edit/budget.py)

    def __post_init__(self) -> None:
        if not (self.scale >= 0 and self.scale != float("inf")):
            raise UserError("--scale must be a finite number >= 0 (use --reverse to amplify)")

    @property
    def coef(self) -> float:
        """The signed factor in `W + coef * u (u^T W)`."""
        return self.scale if self.reverse else -self.scale


def parse_layers(spec: str | None, n_layer: int) -> frozenset[int] | None:
    """Parse `A-B`, `A`, or comma-separated mixes of both (inclusive, 0-based) into block indices."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    blocks: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--layers {spec!r}: expected ranges like 4-20 or 3,5,7-9")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if lo > hi:
            raise UserError(f"--layers {spec!r}: range {lo}-{hi} runs backwards")
        if hi >= n_layer:
            raise UserError(f"--layers {spec!r}: the model has blocks 0-{n_layer - 1}")
        blocks.update(range(lo, hi + 1))
    return frozenset(blocks)


def parse_heads(spec: str | None) -> dict[int, tuple[int, ...]] | None:
    """Parse `12.3,12.7,14.0` (block.head, 0-based) into block -> heads; None or "all": no restriction."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    heads: dict[int, set[int]] = {}
    for part in spec.replace(" ", ",").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)", part)
        if not m:
            raise UserError(f"heads {spec!r}: expected block.head pairs like 12.3,12.7")
        heads.setdefault(int(m[1]), set()).add(int(m[2]))
    if not heads:
        raise UserError(f"heads {spec!r}: no head given")
    return {b: tuple(sorted(h)) for b, h in sorted(heads.items())}


def format_heads(heads: dict[int, tuple[int, ...]]) -> str:
    """The inverse of parse_heads."""
    return ",".join(f"{b}.{h}" for b, hs in sorted(heads.items()) for h in hs)


def format_layers(blocks: frozenset[int]) -> str:
    """The inverse of parse_layers, compact: {0,1,2,5} -> '0-2,5'."""
    out, run = [], []
    for b in sorted(blocks):
        if run and b != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(b)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)
