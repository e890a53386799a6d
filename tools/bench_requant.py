"""Snap-back benchmark: plain (nearest) vs quantization-aware requantization, per type.

    python tools/bench_requant.py MODEL.gguf DIRECTION [--types q4_k,q6_k,...] [--every N] [--reverse]

For a sample of the residual writers an edit touches (every Nth block), the edited weights
are requantized to each type both ways. Printed per type: the leak (share of the removed
component that rounding puts back; for --reverse the relative error of the amplified one),
median and worst over tensors; the weight RMSE of aware rounding as a ratio to plain
rounding's, median and worst; and throughput in MB/s of float32 for the plain quantizer and
for quantizer plus aware rounding, both measured in this run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType

from gguf_abliterate import quants
from gguf_abliterate.quants import rounding
from gguf_abliterate.direction.file import load_direction
from gguf_abliterate.edit.options import EditOptions
from gguf_abliterate.edit.plan import TensorKind, plan_edit
from gguf_abliterate.edit.project import axis_vector, project_residual_rows
from gguf_abliterate.gguf_io import Model

DEFAULT_TYPES = "q4_0,q4_1,q5_0,q5_1,q8_0,q2_k,q3_k,q4_k,q5_k,q6_k,iq4_nl,iq4_xs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("direction")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--every", type=int, default=4, help="take the writers of every Nth block")
    ap.add_argument("--reverse", action="store_true")
    args = ap.parse_args()

    model = Model(args.model)
    direction = load_direction(args.direction)
    opts = EditOptions(reverse=args.reverse)
    plan = plan_edit(model, opts, strict=False)
    edits = [e for e in plan.edits.values() if e.kind is TensorKind.MATRIX and e.block % args.every == 0]
    types = [GGMLQuantizationType[t.strip().upper()] for t in args.types.split(",")]
    keys = ("lp", "la", "lp_rmse", "la_rmse", "ratio", "tp", "ta", "mb")
    rows: dict[str, dict[str, list[float]]] = {t.name: {k: [] for k in keys} for t in types}
    print(f"{model.path.name}: {len(edits)} tensors ({', '.join(sorted({e.name.split('.')[-2] for e in edits}))})")
    for e in edits:
        u = axis_vector(model, e, direction)
        w = quants.dequantize(model.raw(e.name), e.src_type).reshape(model.n_rows(e.name), -1)
        before = u @ w
        project_residual_rows(w, u, opts.coef)
        target = u @ w
        denom = float(np.sqrt(max(before @ before, target @ target)))
        for qt in types:
            if w.shape[1] % quants.block_size(qt):
                continue  # as llama.cpp does, such rows get another type
            t0 = time.perf_counter()
            plain = quants.quantize(w, qt)
            t1 = time.perf_counter()
            aware = rounding.keep_edit(plain, w, u, qt, over_rows=True, before=before)
            t2 = time.perf_counter()
            r = rows[qt.name]
            for key, data in (("lp", plain), ("la", aware)):
                back = quants.dequantize(data, qt)
                r[key].append(float(np.linalg.norm(u @ back - target)) / denom)
                r[key + "_rmse"].append(float(np.sqrt(np.mean(np.square(back - w)))))
            r["ratio"].append(r["la_rmse"][-1] / r["lp_rmse"][-1])
            r["tp"].append(t1 - t0)
            r["ta"].append(t2 - t0)
            r["mb"].append(w.nbytes / 1e6)
    print(f"{'type':7} {'plain leak med':>14} {'worst':>7} {'aware leak med':>14} {'worst':>7} "
          f"{'RMSE ratio med':>14} {'worst':>6} {'plain MB/s':>10} {'aware MB/s':>10}")
    for name, r in rows.items():
        if not r["mb"]:
            continue
        mb = sum(r["mb"])
        print(f"{name:7} {np.median(r['lp']):14.2%} {max(r['lp']):7.2%} {np.median(r['la']):14.3%} "
              f"{max(r['la']):7.3%} {np.median(r['ratio']):14.3f} {max(r['ratio']):6.3f} "
              f"{mb / sum(r['tp']):10.1f} {mb / sum(r['ta']):10.1f}")


if __name__ == "__main__":
    main()
