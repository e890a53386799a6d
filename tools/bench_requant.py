"""Snap-back benchmark: plain (nearest) vs quantization-aware requantization, per type.

    python tools/bench_requant.py MODEL.gguf DIRECTION [--types q4_k,q6_k,...] [--every N] [--reverse]
                                  [--prompts N]

For a sample of the residual writers an edit touches (every Nth block), the edited weights
are requantized to each type both ways. Printed per type: the leak (share of the removed
component that rounding puts back; for --reverse the relative error of the amplified one),
median and worst over tensors; the weight RMSE of aware rounding as a ratio to plain
rounding's, median and worst; the *output error* on held-back activations, both ways; and
throughput in MB/s of float32 for the plain quantizer and for aware rounding (the quantizer
handing over its codes unpacked, `quants.quantize_split`, then the search, then packing, as
an edit runs it), both measured in this run.

The output error is what the model sees: the inputs each writer reads (llama.cpp's `kqv_out`
before attn_output, `ffn_swiglu`/`ffn_geglu` before ffn_down) are captured through the
runtime's hook on N harmless and N harmful *validation* prompts (the direction is measured on
the other half), up to 512 tokens per block, and the error ||(Q(W') - W') X|| is printed as a
share of the edit's own effect on the same outputs, ||(W' - W) X|| (median over tensors). With
--prompts 0 (or without llama-cpp-python) it is left out.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from gguf import GGMLQuantizationType

from gguf_abliterate import quants
from gguf_abliterate.quants import rounding
from gguf_abliterate.formats.direction_file import load_direction
from gguf_abliterate.direction.statistics import measure_moments
from gguf_abliterate.edit.options import EditOptions
from gguf_abliterate.edit.plan import TensorKind, plan_edit
from gguf_abliterate.edit.project import axis_vector, project_residual_rows
from gguf_abliterate.direction.prompts import default_prompts
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.runtime.llama import InputMoments, LlamaModel, WriterInputs

DEFAULT_TYPES = "q4_0,q4_1,q5_0,q5_1,q8_0,q2_k,q3_k,q4_k,q5_k,q6_k,iq4_nl,iq4_xs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("direction")
    ap.add_argument("--types", default=DEFAULT_TYPES)
    ap.add_argument("--every", type=int, default=4, help="take the writers of every Nth block")
    ap.add_argument("--reverse", action="store_true")
    ap.add_argument("--prompts", type=int, default=16, help="held-back prompts of each kind for the output error")
    args = ap.parse_args()

    model = Model(args.model)
    direction = load_direction(args.direction)
    opts = EditOptions(reverse=args.reverse)
    plan = plan_edit(model, opts, strict=False)
    edits = [e for e in plan.edits.values() if e.kind is TensorKind.MATRIX and e.block % args.every == 0]
    types = [GGMLQuantizationType[t.strip().upper()] for t in args.types.split(",")]
    inputs, moments = measured_inputs(args.model, args.prompts) if args.prompts else (None, None)
    keys = ("lp", "la", "lg", "lp_rmse", "la_rmse", "lg_rmse", "ratio", "ratio_g", "lp_out", "la_out", "lg_out",
            "tp", "ta", "tg", "mb", "mb_g")
    rows: dict[str, dict[str, list[float]]] = {t.name: {k: [] for k in keys} for t in types}
    print(f"{model.path.name}: {len(edits)} tensors ({', '.join(sorted({e.name.split('.')[-2] for e in edits}))})")
    warm_up(types)
    for e in edits:
        u = axis_vector(model, e, direction)
        w = quants.dequantize(model.raw(e.name), e.src_type).reshape(model.n_rows(e.name), -1)
        x = writer_input(inputs, e.name, e.block, w.shape[1])
        edit_out = opts.coef * np.outer(u, (u @ w) @ x.T) if x is not None else None  # (W' - W) X
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
            data, codes = quants.quantize_split(w, qt)
            aware = rounding.keep_edit(data, w, u, qt, over_rows=True, before=before, codes=codes)
            t2 = time.perf_counter()
            r = rows[qt.name]
            done = [("lp", plain), ("la", aware)]
            m = writer_input(moments, e.name, e.block, None)
            if m is not None and rounding.compensates(qt, w.shape[1]):
                t3 = time.perf_counter()
                done.append(("lg", rounding.keep_edit_compensated(quants.quantize_split(w, qt)[0], w, u, qt,
                                                                  before=before, moments=m)))
                r["tg"].append(time.perf_counter() - t3)
                r["mb_g"].append(w.nbytes / 1e6)
            for key, data in done:
                back = quants.dequantize(data, qt)
                r[key].append(float(np.linalg.norm(u @ back - target)) / denom)
                r[key + "_rmse"].append(float(np.sqrt(np.mean(np.square(back - w)))))
                if x is not None:
                    r[key + "_out"].append(float(np.linalg.norm((back - w) @ x.T) / np.linalg.norm(edit_out)))
            r["ratio"].append(r["la_rmse"][-1] / r["lp_rmse"][-1])
            if len(done) == 3:
                r["ratio_g"].append(r["lg_rmse"][-1] / r["lp_rmse"][-1])
            r["tp"].append(t1 - t0)
            r["ta"].append(t2 - t1)
            r["mb"].append(w.nbytes / 1e6)
    print(f"{'type':7} {'plain leak med':>14} {'worst':>7} {'aware leak med':>14} {'worst':>7} "
          f"{'gptq leak med':>13} {'worst':>7} {'RMSE ratio aware':>16} {'gptq':>6} {'plain out':>9} "
          f"{'aware out':>9} {'gptq out':>8} {'plain MB/s':>10} {'aware MB/s':>10} {'gptq MB/s':>9}")
    for name, r in rows.items():
        if not r["mb"]:
            continue
        mb = sum(r["mb"])
        g = bool(r["lg"])
        g_speed = f"{sum(r['mb_g']) / sum(r['tg']):.1f}" if g else "-"
        print(f"{name:7} {np.median(r['lp']):14.2%} {max(r['lp']):7.2%} {np.median(r['la']):14.3%} "
              f"{max(r['la']):7.3%} {_share(r['lg'], '.3%'):>13} {format(max(r['lg']), '.3%') if g else '-':>7} "
              f"{np.median(r['ratio']):16.3f} {_share(r['ratio_g'], '.3f'):>6} "
              f"{_share(r['lp_out']):>9} {_share(r['la_out']):>9} {_share(r['lg_out']):>8} "
              f"{mb / sum(r['tp']):10.1f} {mb / sum(r['ta']):10.1f} "
              f"{g_speed:>9}")


def warm_up(types: list[GGMLQuantizationType]) -> None:
    """Run every timed path once on a small matrix: the first call of a compiled function
    loads it from numba's cache (or compiles it), and on gemma-3-270m's few megabytes that
    made the first type's aware figure several times too slow (Q4_0 77 MB/s, Q4_1 302)."""
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.02, (64, 256)).astype(np.float32)
    u = rng.normal(0, 1, 64).astype(np.float32)
    u /= np.linalg.norm(u)
    moments = np.eye(rounding.column_block(256), dtype=np.float32)[None]
    for qt in types:
        quants.quantize(w, qt)
        data, codes = quants.quantize_split(w, qt)
        rounding.keep_edit(data, w, u, qt, over_rows=True, before=u @ w, codes=codes)
        if rounding.compensates(qt, 256):
            rounding.keep_edit_compensated(data, w, u, qt, before=u @ w, moments=moments)


def _share(values: list[float], fmt: str = ".1%") -> str:
    return format(float(np.median(values)), fmt) if values else "-"


def measured_inputs(path: str, n: int) -> tuple[WriterInputs | None, InputMoments | None]:
    """The writers' inputs on n harmless and n harmful validation prompts (held back), and their
    moments on n of each kind of the direction prompts (as --rounding gptq measures them); None (with a note) if
    llama-cpp-python is missing."""
    try:
        bad, good = default_prompts("validation")
        with LlamaModel(path) as m:
            with m.writer_inputs(512) as inputs:
                m.next_token_logprobs(good[:n] + bad[:n])
            moments = measure_moments(m, n)
        return inputs, moments
    except UserError as e:
        print(f"note: no output error ({e})")
        return None, None


def writer_input(inputs: WriterInputs | InputMoments | None, name: str, block: int,
                 n_in: int | None) -> np.ndarray | None:
    """What was captured of the input a writer reads: rows (tokens, n_in) that must match
    n_in, or (with n_in None) moments, if any."""
    kind = "attn" if ".attn_output." in name else "mlp" if ".ffn_down." in name else None
    x = inputs.get(kind, block) if inputs is not None and kind else None
    if x is None or n_in is None:
        return x
    return x if x.shape[1] == n_in and len(x) > 1 else None


if __name__ == "__main__":
    main()
