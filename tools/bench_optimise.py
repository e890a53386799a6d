"""How fast the optimiser runs, against a plain llama.cpp forward of the same prompts.

    python tools/bench_optimise.py [--model qwen2.5-coder-1.5b] [--prompts 24] [--repeats 3]
    python tools/bench_optimise.py --moe DIR      # a synthetic mixture-of-experts model, built in DIR
    python tools/bench_optimise.py --search [--against CHECKOUT] [--from DIRECTION] [--minutes M]

`--search` runs the whole `optimise` job with its defaults (and `--bake`) and prints, per stage
(set-up, trials, confirmation, bake checks), seconds and tokens llama.cpp decoded beside the
seconds a plain decode of as many tokens takes (rate measured in the same run), then the pick:
its trial, refusal ratio, KL, greedy refusals through its adapter and baked. With `--against`
(a checkout, e.g. `git worktree add /tmp/base HEAD~3`), that checkout's `optimise` runs first
in a subprocess with the same arguments, and both picks and times are printed side by side.

Without `--search`:

A trial = set its edit (a rank-1 adapter on every 2-D writer; on a mixture-of-experts model
each MoE block's expert sum projected inside llama.cpp's graph as well), the first-token pass
over the harmful and the harmless validation prompts (with the shared chat-template prefix
computed once), remove the edit. `--moe` builds (once) a random Qwen3-MoE-architecture model
of a realistic shape: 24 blocks, n_embd 1024, 32 experts of 768 of which 4 are active per
token, Q8_0. The baselines forward the very same prompts without any adapter: once as `direction`
does (every prompt whole) and once with the shared prefix, so the table shows what sharing
saves and what the adapter costs. Runs alternate (best of --repeats each), since these
machines are noisy; the ratios are what to read.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf_abliterate import pip_models  # noqa: E402
from gguf_abliterate.direction import prompts as P  # noqa: E402
from gguf_abliterate.edit.schedule import EditParams, Kernel, resolve  # noqa: E402
from gguf_abliterate.formats.direction_file import load_direction  # noqa: E402
from gguf_abliterate.gguf_io import Model  # noqa: E402
from gguf_abliterate.jobs.optimise import OptimiseRequest, run_optimise  # noqa: E402
from gguf_abliterate.optimise.adapter import TrialAdapters, apply  # noqa: E402
from gguf_abliterate.optimise.study import SearchSettings  # noqa: E402
from gguf_abliterate.runtime.llama import LlamaModel, common_prefix  # noqa: E402
from tests.support.tiny_models import TinySpec, build_model  # noqa: E402
from tools.bench_direction import peak_rss_gib, plain_rate, stage_table  # noqa: E402

# a mixture-of-experts model of a laptop favourite's proportions (Qwen3-30B-A3B: 128 experts of
# 768, 8 active; gpt-oss-20b: 32 of 2880, 4 active), small enough to build in a minute
MOE = TinySpec(arch="qwen3moe", n_layer=24, n_embd=1024, n_head=16, n_head_kv=4, head_dim=64, n_ff=2048,
               n_expert=32, n_expert_used=4, n_ff_expert=768, tied=False, name="synthetic-qwen3moe-24x32x768")


def moe_model(directory: Path) -> Path:
    """The synthetic MoE model in `directory`, built the first time."""
    path = directory / "synthetic-qwen3moe.gguf"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        build_model(path.with_suffix(".part"), MOE).rename(path)
    return path


def pick_line(result: Path) -> str:
    """The pick a result file records, and how many trials it chose from."""
    d = load_direction(result)
    chosen = next(t for t in d.trials if t["number"] == int(d.metadata["chosen_trial"]))
    kl = "-" if chosen["kl"] is None else f"{chosen['kl']:.4f}"
    return (f"trial {chosen['number']} of {len(d.trials)}: refusal ratio {chosen['refusal']:.3f}, KL {kl}, "
            f"refusals {chosen['confirmed_refusals']} (adapter) / {chosen['baked_refusals']} (baked) of "
            f"{d.metadata['confirm_prompts']}, original {d.metadata['original_refusals']}")


def search(path: Path, against: Path | None, measured: Path | None, minutes: float | None = None) -> None:
    """The whole job, per stage, against a plain decode and (with `against`) another checkout
    (which runs its own defaults); `minutes`: this checkout's search budget instead of its default."""
    from_args = [] if measured is None else ["--from", str(measured)]
    with tempfile.TemporaryDirectory() as tmp:
        if against is not None:
            theirs = Path(tmp, "against.safetensors")
            env = {**os.environ, "PYTHONPATH": str(against.resolve())}
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "gguf_abliterate", "optimise", str(path), "-o", str(theirs),
                            "--bake", str(Path(tmp, "against.gguf")), "-q", *from_args], cwd=tmp, env=env, check=True)
            their_wall = time.perf_counter() - t0
        ours = Path(tmp, "ours.safetensors")
        t0 = time.perf_counter()
        settings = SearchSettings() if minutes is None else SearchSettings(minutes=minutes)
        result = run_optimise(OptimiseRequest(model=path, output=ours, bake=Path(tmp, "ours.gguf"), measured=measured,
                                              settings=settings))
        wall = time.perf_counter() - t0
        rate, _ = plain_rate(path, 32)
        print(f"{path.name}: plain decode {rate:.0f} tokens/s")
        print("\n".join(stage_table(result.stages, wall, rate)))
        print(f"this checkout ({settings.minutes:g}-minute search): {wall:.0f} s, {pick_line(ours)}")
        if against is not None:
            print(f"{against}: {their_wall:.0f} s, {pick_line(theirs)}")
            print(f"this checkout takes {wall / their_wall:.2f}x its time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help="pip_models name or GGUF path")
    ap.add_argument("--prompts", type=int, default=24, help="harmful and harmless prompts each")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--moe", type=Path, metavar="DIR", help="bench the synthetic MoE model (built in DIR)")
    ap.add_argument("--search", action="store_true", help="the whole optimise job, per stage")
    ap.add_argument("--against", type=Path, help="with --search: another checkout to run the same command from")
    ap.add_argument("--from", dest="measured", type=Path, help="with --search: optimise --from this direction file")
    ap.add_argument("--minutes", type=float, help="with --search: this checkout's --minutes (the other runs its default)")
    args = ap.parse_args()
    if args.search:
        search(pip_models.fetch(args.model) if args.model in pip_models.MODELS else Path(args.model), args.against,
               args.measured, args.minutes)
        return
    if args.moe:
        path = moe_model(args.moe)
    else:
        path = pip_models.fetch(args.model) if args.model in pip_models.MODELS else Path(args.model)
    bad, good = P.default_prompts("validation")
    prompts = bad[: args.prompts] + good[: args.prompts]
    meta = Model(path)
    rng = np.random.default_rng(0)
    per_block = rng.normal(size=(meta.n_layer, meta.n_embd)).astype(np.float32)
    means = rng.normal(size=(meta.n_layer, meta.n_embd)).astype(np.float32)
    t0 = time.perf_counter()
    adapters = TrialAdapters(meta, per_block, means)
    setup = time.perf_counter() - t0
    top = meta.n_layer - 1
    experts = Kernel(0.9, 0.65 * top, 0.5, 0.5 * top) if adapters.experts else None
    schedule = resolve(EditParams(0.6 * top, True, Kernel(1.0, 0.7 * top, 0.3, 0.4 * top),
                                  Kernel(0.8, 0.6 * top, 0.5, 0.5 * top), experts=experts), per_block, means)
    edit = adapters.edit(schedule)
    with LlamaModel(path, n_batch=4096, n_seq=64) as m:
        encoded = m.encode(prompts)
        whole = sum(len(e) for e in encoded)
        halves = (encoded[: args.prompts], encoded[args.prompts :])
        shared = sum(common_prefix(h) + sum(len(e) - common_prefix(h) for e in h) for h in halves)

        def plain() -> None:
            m.next_token_logprobs(bad[: args.prompts])
            m.next_token_logprobs(good[: args.prompts])

        def plain_shared() -> None:
            m.next_token_logprobs(bad[: args.prompts], share_prefix=True)
            m.next_token_logprobs(good[: args.prompts], share_prefix=True)

        def trial() -> None:
            apply(m, edit)
            plain_shared()
            apply(m, None)

        runs: dict[str, list[float]] = {"plain": [], "plain_shared": [], "trial": []}
        plain_shared()  # warm up
        for _ in range(args.repeats):
            for name, fn in (("plain", plain), ("plain_shared", plain_shared), ("trial", trial)):
                t = time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in runs.items()}
    print(f"{path.name}: {2 * args.prompts} prompts, adapters precomputed in {setup:.1f} s; a trial edits "
          f"{len(edit.pieces)} writers by adapter and projects {len(edit.projections)} graph nodes")
    print(f"{'pass':<34} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'ratio':>6}")
    rows = (("plain forward, prompts whole", "plain", whole), ("plain forward, shared prefix", "plain_shared", shared),
            ("trial (its edit + shared prefix)", "trial", shared))
    for label, key, tokens in rows:
        print(f"{label:<34} {tokens:7d} {best[key]:8.2f} {tokens / best[key]:9.0f} "
              f"{best[key] / best['plain_shared']:6.2f}")
    print(f"peak resident memory {peak_rss_gib():.1f} GiB; trials per minute: {60 / best['trial']:.1f} (the edit's cost: "
          f"{best['trial'] / best['plain_shared'] - 1:+.0%} of the same forward without it; "
          f"sharing the prefix: {best['plain'] / best['plain_shared']:.2f}x)")


if __name__ == "__main__":
    main()
