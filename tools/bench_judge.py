"""How often markers and a judge agree with the project's labelled answers, per class.

    python tools/bench_judge.py [--judge qwen2.5-coder-1.5b | JUDGE.gguf ...]

Prints, for each (prompt set, true class), the share of answers each scorer labels so, the
judges' confusion tables, and the time each judge took. The judge's prompt was tuned on the
even-numbered answers (0, 2, ...); the odd-numbered half is held out, and its agreement is
printed apart so a tuned prompt cannot flatter itself. Markers can only say refusal,
degenerate or complies, so their partial and evades cells are 0 by construction.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf_abliterate import pip_models  # noqa: E402
from gguf_abliterate.evaluate.judge import Judge  # noqa: E402
from gguf_abliterate.evaluate.labelled import Agreement, agreement, load_labelled, tally  # noqa: E402
from gguf_abliterate.evaluate.scorers import Label, get_scorer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", action="append", help="pip_models name or GGUF path (repeatable); default: qwen2.5-coder-1.5b")
    args = ap.parse_args()
    answers = load_labelled()
    results: dict[str, Agreement] = {"markers": agreement(get_scorer("markers"), answers)}
    halves: dict[str, tuple[float, float]] = {}
    for spec in args.judge or ["qwen2.5-coder-1.5b"]:
        path = pip_models.fetch(spec) if spec in pip_models.MODELS else Path(spec)
        t = time.perf_counter()
        with Judge(path) as judge:
            verdicts = judge.label([a.prompt for a in answers], [a.answer for a in answers])
        results[path.name] = tally(answers, verdicts)
        halves[path.name] = (tally(answers[0::2], verdicts[0::2]).overall, tally(answers[1::2], verdicts[1::2]).overall)
        print(f"{path.name}: {len(answers)} answers judged in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    names = list(results)
    print(f"{'set':<9} {'class':<11} {'n':>4} " + " ".join(f"{n[:24]:>24}" for n in names))
    for key, (_, total) in results["markers"].per_class.items():
        cells = " ".join(f"{results[n].per_class[key][0] / total:>24.0%}" for n in names)
        print(f"{key[0]:<9} {key[1].value:<11} {total:>4} {cells}")
    print(f"{'all':<9} {'':<11} {len(answers):>4} " + " ".join(f"{results[n].overall:>24.0%}" for n in names))
    for name, (tuned, held_out) in halves.items():
        print(f"{name}: {tuned:.0%} on the half the prompt was tuned on, {held_out:.0%} on the held-out half")
    for name in names[1:]:
        print(f"\n{name}: rows are the true labels, columns what it said")
        print(f"{'':<11} " + " ".join(f"{label.value:>10}" for label in Label))
        for true in Label:
            print(f"{true.value:<11} " + " ".join(f"{results[name].confusion[(true, said)]:>10}" for said in Label))


if __name__ == "__main__":
    main()
