"""How much of the edit survives requantization ("snap-back"): leak and weight RMSE.

For each edited tensor, with u the projection axis, W the input (dequantized), W' the float
target and Q(W') what was written (dequantized again):

    leak = ||u^T Q(W') - u^T W'|| / max(||u^T W||, ||u^T W'||)
    rmse = sqrt(mean((Q(W') - W')^2))

For a full abliteration u^T W' = 0, so leak is the fraction of the removed component that
rounding put back; for a reverse edit it is the relative error of the amplified component.
Pieces of a tensor contribute sums, so the per-tensor numbers do not depend on how it was cut.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

# The summary's fields per output type, in the order they are stored.
SUMMARY_FIELDS = ("tensors", "leak_median", "leak_worst", "rmse_median", "rmse_worst")
# The longest a float can print as in the stored JSON (`json.dumps` of a rounded float).
_FLOAT_CHARS = len(json.dumps(-1.2345678901234567e-300))
# The header space always reserved, so files with few types keep the layout they always had.
MIN_REPORT_WIDTH = 4096


@dataclass(frozen=True)
class Sums:
    """One piece's contribution to its tensor's leak and RMSE."""

    leak_sq: float  # sum (u^T Q(W') - u^T W')^2
    before_sq: float  # sum (u^T W)^2
    target_sq: float  # sum (u^T W')^2
    error_sq: float  # sum (Q(W') - W')^2 over every value
    values: int

    @classmethod
    def of(cls, before: np.ndarray, target: np.ndarray, written: np.ndarray, error_sq: float,
           values: int) -> Sums:
        """From the piece's component along u: before the edit, the float target, as written."""
        diff = written.astype(np.float64) - target
        return cls(float(diff @ diff), float(before @ before), float(target @ target), error_sq, values)

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.leak_sq + other.leak_sq, self.before_sq + other.before_sq,
                    self.target_sq + other.target_sq, self.error_sq + other.error_sq, self.values + other.values)

    def leak_and_rmse(self) -> tuple[float, float]:
        denom = np.sqrt(max(self.before_sq, self.target_sq))
        leak = float(np.sqrt(self.leak_sq) / denom) if denom > 0 else float("nan")
        return leak, float(np.sqrt(self.error_sq / self.values)) if self.values else float("nan")


def report_width(type_names: set[str]) -> int:
    """Header bytes that hold the JSON report for these output types, whatever its numbers."""
    per_type = [len(json.dumps(t)) + 3 + sum(len(json.dumps(f)) + 2 + _FLOAT_CHARS for f in SUMMARY_FIELDS)
                for t in type_names]
    return max(MIN_REPORT_WIDTH, 2 + sum(per_type))


class Report:
    """Sums per edited tensor, and their summary per output type."""

    def __init__(self) -> None:
        self.sums: dict[str, Sums] = {}
        self.types: dict[str, str] = {}

    def add(self, name: str, qtype: str, sums: Sums) -> None:
        self.sums[name] = self.sums[name] + sums if name in self.sums else sums
        self.types[name] = qtype

    def per_tensor(self) -> dict[str, tuple[float, float]]:
        return {name: s.leak_and_rmse() for name, s in self.sums.items()}

    def summary(self) -> dict[str, dict[str, float]]:
        """Per output type: tensors, median and worst leak, median and worst RMSE."""
        by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for name, (leak, rmse) in self.per_tensor().items():
            by_type[self.types[name]].append((leak, rmse))
        out = {}
        for qtype, vals in sorted(by_type.items()):
            leaks = np.array([v[0] for v in vals if np.isfinite(v[0])])
            rmses = np.array([v[1] for v in vals])
            nan = float("nan")
            out[qtype] = dict(zip(SUMMARY_FIELDS, (
                len(vals), float(np.median(leaks)) if leaks.size else nan, float(leaks.max()) if leaks.size else nan,
                float(np.median(rmses)), float(rmses.max()))))
        return out

    def to_json(self) -> str:
        """The summary as compact JSON, stored whole (`report_width` reserves room for it)."""
        return json.dumps({t: {k: round(v, 6) for k, v in s.items()} for t, s in self.summary().items()},
                          separators=(",", ":"))
