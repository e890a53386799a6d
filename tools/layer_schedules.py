"""How the layer test's elimination schedule changes its pick: score every candidate block on
every layer-test prompt once, then replay the elimination on those scores.

    python tools/layer_schedules.py [--model qwen2.5-coder-1.5b] [--orders 2000] [--scores FILE.npz]

Runs `direction` (refusal, automatic layer) with a single rung, every candidate on every
prompt (the exhaustive test), recording each candidate's per-prompt refusal-opening
probability and KL (kept in `--scores`; given an existing file, the run is skipped). Then, for
first rungs of 1 to 8 prompts and for the exhaustive test: the pick with the shipped prompt
order, and over `--orders` random orders of the prompts how often the elimination picks the
exhaustive test's block, or a block whose score is within twice the paired standard error of
it, and the prompts it forwards (probes and harmless, over all candidates).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf_abliterate import pip_models  # noqa: E402
from gguf_abliterate.direction import measure, packs  # noqa: E402
from gguf_abliterate.gguf_io import Model  # noqa: E402
from gguf_abliterate.jobs.direction import DirectionRequest, run_direction  # noqa: E402
from gguf_abliterate.runtime.llama import LlamaModel, Prompt  # noqa: E402


def exhaustive(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, KLs: candidates x prompts, the first candidate block), every candidate scored on
    every prompt: the job's own elimination, given one rung, with its scorer and KL recorded."""
    scores: list[np.ndarray] = []
    kls: list[np.ndarray] = []
    rungs, kl_per_prompt, layer_scorer = measure.rungs, measure.kl_per_prompt, packs.Pack.layer_scorer

    def recorded_kl(base: np.ndarray, edited: np.ndarray) -> np.ndarray:
        kls.append(kl_per_prompt(base, edited))
        return kls[-1]

    def recorded_scorer(pack: packs.Pack, model: LlamaModel, count: int) -> measure.LayerScorer:
        inner = layer_scorer(pack, model, count)

        def score(r: np.ndarray | None, lo: int, hi: int, also: Sequence[Prompt] = ()) -> tuple[np.ndarray, np.ndarray]:
            values, logprobs = inner(r, lo, hi, also)
            if r is not None:  # a candidate's direction (None: the unedited baseline)
                scores.append(values)
            return values, logprobs
        return score

    measure.rungs = lambda count, harmless, first=0: [(count, harmless)]  # type: ignore[assignment]
    measure.kl_per_prompt = recorded_kl  # type: ignore[assignment]
    packs.Pack.layer_scorer = recorded_scorer  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run_direction(DirectionRequest(model=path, output=Path(tmp, "d.safetensors")))
    finally:
        measure.rungs, measure.kl_per_prompt, packs.Pack.layer_scorer = rungs, kl_per_prompt, layer_scorer
    return np.array(scores), np.array(kls), measure.candidate_layers(Model(path).n_layer)[0]


def eliminate(scores: np.ndarray, kls: np.ndarray, first: int, order_p: np.ndarray, order_h: np.ndarray,
              max_kl: float) -> tuple[int, int]:
    """(the picked candidate's index, prompts forwarded): `choose_layer`'s elimination on
    recorded per-prompt scores, prompts taken in the given orders."""
    n_cand, n_probes = scores.shape
    got = {c: (np.zeros(0), np.zeros(0)) for c in range(n_cand)}

    def key(c: int) -> tuple[float, ...]:
        return measure.rank(got[c][0], got[c][1], 1.0, max_kl)

    alive, have, had, cost = list(range(n_cand)), 0, 0, 0
    for n, g in measure.rungs(n_probes, kls.shape[1], first):
        for c in alive:
            got[c] = (np.concatenate([got[c][0], scores[c, order_p[have:n]]]),
                      np.concatenate([got[c][1], kls[c, order_h[had:g]]]))
            cost += n - have + g - had
        have, had = n, g
        alive.sort(key=key)
        if n == n_probes or measure._clear_leader(alive, {c: got[c][0] for c in got}, {c: got[c][1] for c in got},
                                                  1.0, max_kl):
            break
        alive = alive[: measure.survivors(len(alive))]
    return alive[0], cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b", help=f"one of {', '.join(pip_models.MODELS)}, or a path")
    ap.add_argument("--orders", type=int, default=2000, help="random prompt orders to replay")
    ap.add_argument("--scores", type=Path, help="keep the exhaustive scores here (.npz); reused if it exists")
    args = ap.parse_args()
    if args.scores and args.scores.exists():
        saved = np.load(args.scores)
        scores, kls, first_block = saved["scores"], saved["kls"], int(saved["first_block"])
    else:
        path = Path(args.model) if Path(args.model).is_file() else pip_models.fetch(args.model, quiet=True)
        scores, kls, first_block = exhaustive(path)
        if args.scores:
            np.savez(args.scores, scores=scores, kls=kls, first_block=first_block)
    max_kl = measure.DEFAULT_MAX_KL
    n_cand, n_probes = scores.shape
    ranked = sorted(range(n_cand), key=lambda c: measure.rank(scores[c], kls[c], 1.0, max_kl))
    best = ranked[0]
    gaps = scores - scores[best]
    near = [c for c in range(n_cand) if gaps[c].mean() <= 2 * gaps[c].std(ddof=1) / np.sqrt(n_probes)]
    print("exhaustive test, best first (block: score, KL): "
          + ", ".join(f"{c + first_block}: {scores[c].mean():.4f}, {kls[c].mean():.4f}" for c in ranked[:5]))
    print(f"within twice the paired standard error of block {best + first_block}'s score: "
          f"{[c + first_block for c in near]}")
    rng = np.random.default_rng(0)
    orders = [(np.arange(n_probes), np.arange(kls.shape[1]))]
    orders += [(rng.permutation(n_probes), rng.permutation(kls.shape[1])) for _ in range(args.orders)]
    print(f"{'first rung':>10} {'shipped order':>14} {'prompts':>8} {'same pick':>10} {'within noise':>13} "
          f"{'prompts (mean)':>15}")
    for first in (1, 2, 4, 8, n_probes):
        runs = [eliminate(scores, kls, first, op, oh, max_kl) for op, oh in orders]
        picks = np.array([p for p, _ in runs])
        print(f"{first:>10} {f'block {picks[0] + first_block}':>14} {runs[0][1]:8d} {np.mean(picks[1:] == best):10.2f} "
              f"{np.mean(np.isin(picks[1:], near)):13.2f} {np.mean([c for _, c in runs[1:]]):15.0f}")


if __name__ == "__main__":
    main()
