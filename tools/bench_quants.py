"""Quantize / dequantize throughput of our engine next to ggml's C (single thread, ctypes), per type.

    python tools/bench_quants.py [--mb 16] [--types q4_k,q6_k]

Throughput is MB/s of float32 values (input of quantize, output of dequantize), best of
`--repeat` runs taken in turn with ggml's, on the same data. Read the ratios: this machine's
speed drifts by 20% or more between runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_abliterate import quants  # noqa: E402
from tests.support import ggml_ref  # noqa: E402  (ggml's C quantizers, the tests' oracle)

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS,
         Q.TQ1_0, Q.TQ2_0, Q.BF16, Q.F16]


def best_times(fns: list, repeat: int) -> list[float]:  # type: ignore[type-arg]
    """Best time of each function, calling them in turn `repeat` times: on a noisy machine a
    slow spell then hits both sides of a ratio, not just one."""
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=16, help="float32 megabytes per measurement")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--types", default=None, help="comma-separated, e.g. q4_k,q6_k")
    args = ap.parse_args()
    types = [Q[t.strip().upper()] for t in args.types.split(",")] if args.types else TYPES
    n = 4096
    rows = max(1, int(args.mb * 2**20 / 4 / n))
    x = np.random.default_rng(0).normal(0, 0.02, (rows, n)).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"{rows} x {n} float32 ({mb:.1f} MB), best of {args.repeat}")
    print(f"{'type':<8} {'quant ours':>11} {'quant ggml':>11} {'ratio':>6}   {'deq ours':>9} {'deq ggml':>9} {'ratio':>6}")
    for qt in types:
        data = ggml_ref.quantize(x, qt)
        assert np.array_equal(quants.quantize(x, qt), data), qt.name
        tq, tq_ref = best_times([lambda: quants.quantize(x, qt), lambda: ggml_ref.quantize(x, qt)], args.repeat)
        td, td_ref = best_times([lambda: quants.dequantize(data, qt), lambda: ggml_ref.dequantize(data, qt, n)],
                                args.repeat)
        print(f"{qt.name:<8} {mb / tq:9.1f}MB/s {mb / tq_ref:9.1f}MB/s {tq_ref / tq:6.2f}   "
              f"{mb / td:7.0f}MB/s {mb / td_ref:7.0f}MB/s {td_ref / td:6.2f}", flush=True)


if __name__ == "__main__":
    main()
