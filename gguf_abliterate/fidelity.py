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

import numpy as np

# per piece: sum (a - t)^2, sum c0^2, sum t^2, sum (Q(W') - W')^2, number of values
N_SUMS = 5
REPORT_KEY = "abliterate.requant_report"
REPORT_WIDTH = 4096  # bytes reserved in the header for the report (filled in after the tensors)


def piece_sums(before: np.ndarray, target: np.ndarray, written: np.ndarray, quant_error_sq: float,
               n_values: int) -> np.ndarray:
    """Sums for one piece from its component along u: before the edit, the float target, as written."""
    diff = written.astype(np.float64) - target
    return np.array([diff @ diff, before @ before, target @ target, quant_error_sq, n_values], np.float64)


def leak_and_rmse(sums: np.ndarray) -> tuple[float, float]:
    denom = np.sqrt(max(sums[1], sums[2]))
    leak = float(np.sqrt(sums[0]) / denom) if denom > 0 else float("nan")
    return leak, float(np.sqrt(sums[3] / sums[4])) if sums[4] else float("nan")


class Report:
    """Sums per edited tensor, and their summary per output type."""

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(N_SUMS))
        self.types: dict[str, str] = {}

    def add(self, name: str, qtype: str, sums: np.ndarray) -> None:
        self.sums[name] += sums
        self.types[name] = qtype

    def per_tensor(self) -> dict[str, tuple[float, float]]:
        return {name: leak_and_rmse(s) for name, s in self.sums.items()}

    def summary(self) -> dict[str, dict[str, float]]:
        """Per output type: tensors, median and worst leak, median and worst RMSE."""
        by_type: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for name, (leak, rmse) in self.per_tensor().items():
            by_type[self.types[name]].append((leak, rmse))
        out = {}
        for qtype, vals in sorted(by_type.items()):
            leaks = np.array([v[0] for v in vals if np.isfinite(v[0])])
            rmses = np.array([v[1] for v in vals])
            out[qtype] = {"tensors": len(vals),
                          "leak_median": float(np.median(leaks)) if leaks.size else float("nan"),
                          "leak_worst": float(leaks.max()) if leaks.size else float("nan"),
                          "rmse_median": float(np.median(rmses)), "rmse_worst": float(rmses.max())}
        return out

    def to_json(self) -> str:
        text = json.dumps({t: {k: round(v, 6) for k, v in s.items()} for t, s in self.summary().items()},
                          separators=(",", ":"))
        return text if len(text) <= REPORT_WIDTH else text[: REPORT_WIDTH]
