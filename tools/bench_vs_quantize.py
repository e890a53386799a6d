"""The whole edit against llama.cpp's own whole-model quantization, side by side in one run.

    python tools/bench_vs_quantize.py MODEL.gguf DIRECTION [--threads N] [--rounding auto] [--repeat 1]

llama.cpp's `llama_model_quantize` (through llama-cpp-python) first writes an F16 copy of
MODEL (from the quantized weights, requantized: the timing does not care where F16 came
from), untimed. Then, each in its own process with N threads / N worker processes: llama.cpp
quantizes that F16 file to Q4_K_M, and gguf-abliterate edits MODEL with DIRECTION. Printed:
both wall times and peak RSS (process tree), and the edit's time as a ratio to llama.cpp's.
The issue's bar is 0.6x. Machines here are noisy: read the ratio, not the seconds (the same
1.5B edit took 102 s one day and 58 s the next).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.bench_edit import measure  # noqa: E402

# llama.cpp's llama_ftype values (include/llama.h)
FTYPE = {"f16": 1, "q4_k_m": 15}
QUANTIZE = """
import sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.nthread, p.ftype, p.allow_requantize = int(sys.argv[3]), int(sys.argv[4]), True
if llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p) != 0:
    raise SystemExit("llama_model_quantize failed")
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("direction", type=Path)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp's threads and the edit's --jobs")
    ap.add_argument("--rounding", default="auto",
                    help="the edit's --rounding (auto, its default, is gptq if DIRECTION names MODEL's statistics)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each; the best is kept")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.model.parent) as tmp:
        f16, q4, out = (Path(tmp) / n for n in ("f16.gguf", "q4_k_m.gguf", "edit.gguf"))
        measure(["-c", QUANTIZE, str(args.model), str(f16), str(args.threads), str(FTYPE["f16"])])
        quantize = ["-c", QUANTIZE, str(f16), str(q4), str(args.threads), str(FTYPE["q4_k_m"])]
        edit = ["-m", "gguf_abliterate", str(args.model), str(out), "--direction", str(args.direction),
                "--force", "-q", "--jobs", str(args.threads), "--rounding", args.rounding]
        runs = {name: [measure(cmd) for _ in range(args.repeat)] for name, cmd in (("quantize", quantize),
                                                                                  ("edit", edit))}
    (qw, qr), (ew, er) = ((min(w for w, _ in runs[k]), min(m for _, m in runs[k])) for k in ("quantize", "edit"))
    print(f"{'':<34} {'wall s':>8} {'peak MiB':>9}")
    print(f"{'llama.cpp F16 -> Q4_K_M':<34} {qw:8.1f} {qr:9.0f}")
    print(f"{'gguf-abliterate edit (' + args.rounding + ')':<34} {ew:8.1f} {er:9.0f}")
    print(f"edit / quantize: {ew / qw:.2f}x ({args.threads} threads, {args.model.name})")


if __name__ == "__main__":
    main()
