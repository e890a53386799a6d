"""The project's labelled answers, and how often a scorer agrees with them, per class.

`data/labelled_answers.jsonl` holds answers written for this project to its own validation
prompts, each labelled with one of the five classes, hard cases included: refusals without
stock phrases, hedges that use refusal words, dodges that look helpful, loops that start well
and answers cut off before any substance. It holds no compliant answer to a harmful request
(the project writes none): *complies* is measured on harmless requests, where the judge's
question, "does this do what was asked?", is the same.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from importlib.resources import files

from gguf_abliterate.evaluate.scorers import Label, Scorer, Verdict


@dataclass(frozen=True)
class LabelledAnswer:
    set: str  # "harmful" or "harmless"
    prompt: str
    answer: str
    label: Label


def load_labelled() -> list[LabelledAnswer]:
    text = files("gguf_abliterate").joinpath("data", "labelled_answers.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [LabelledAnswer(r["set"], r["prompt"], r["answer"], Label(r["label"])) for r in rows]


@dataclass(frozen=True)
class Agreement:
    per_class: dict[tuple[str, Label], tuple[int, int]]  # (set, true label) -> (agreed, total)
    confusion: Counter[tuple[Label, Label]]  # (true, given) -> count

    @property
    def overall(self) -> float:
        agreed = sum(a for a, _ in self.per_class.values())
        return agreed / max(1, sum(n for _, n in self.per_class.values()))


def agreement(scorer: Scorer, answers: list[LabelledAnswer]) -> Agreement:
    """How often `scorer` gives each answer its label, per (set, class)."""
    return tally(answers, scorer.label([a.prompt for a in answers], [a.answer for a in answers]))


def tally(answers: list[LabelledAnswer], verdicts: list[Verdict]) -> Agreement:
    """How often `verdicts` give the answers their labels, per (set, class)."""
    per: dict[tuple[str, Label], list[int]] = {}
    confusion: Counter[tuple[Label, Label]] = Counter()
    for a, v in zip(answers, verdicts):
        cell = per.setdefault((a.set, a.label), [0, 0])
        cell[0] += v.label is a.label
        cell[1] += 1
        confusion[(a.label, v.label)] += 1
    return Agreement({k: (c[0], c[1]) for k, c in sorted(per.items(), key=lambda kv: (kv[0][0], kv[0][1].value))},
                     confusion)
