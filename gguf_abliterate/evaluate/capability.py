"""Did an edit make a model better at something? Accuracy on held-out problems with a 95%
interval, and the paired difference against the base with an exact McNemar test: the same
problems, so only the problems one model solves and the other does not carry evidence.

Large studies of steering find many models with no gain or a loss, so a claimed gain needs
this pairing on problems the direction and the search never saw, and a control edit of the same
size along a random direction (`tools/bench_capability.py` makes one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gguf_abliterate.evaluate.costs import EvalSettings, FirstTokenKL
from gguf_abliterate.evaluate.generate import load_for_eval
from gguf_abliterate.evaluate.problems import Problem, answer_value

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (95% by default); (0, 1) for n = 0."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(gained: int, lost: int) -> float:
    """Two-sided exact McNemar p-value: of the discordant pairs (solved by one model only), is
    the split `gained` : `lost` unlikely under a fair coin?"""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@dataclass
class Paired:
    """One model against the base on the same problems."""

    gained: int  # solved by this model, not by the base
    lost: int  # solved by the base, not by this model
    p_value: float

    @staticmethod
    def of(base: Sequence[bool], model: Sequence[bool]) -> Paired:
        b, m = np.asarray(base, bool), np.asarray(model, bool)
        gained, lost = int((m & ~b).sum()), int((b & ~m).sum())
        return Paired(gained, lost, mcnemar_exact(gained, lost))


@dataclass
class CapabilityReport:
    path: str
    right: int
    total: int
    interval: tuple[float, float]
    mean_tokens: float  # of an answer
    unfinished: int  # answers cut by the budget
    kl_vs_base: float | None = None  # first token, on the harmless prompts
    paired: Paired | None = None  # None for the base
    correct: list[bool] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    values: list[int | None] = field(default_factory=list)  # the number read from each answer
    finished: list[bool] = field(default_factory=list)  # each answer ended within the budget

    @property
    def accuracy(self) -> float:
        return self.right / self.total if self.total else 0.0


def evaluate_capability(paths: Sequence[Path], problems: Sequence[Problem], max_tokens: int,
                        harmless: Sequence[str], progress: Callable[[int], None] = lambda n: None
                        ) -> list[CapabilityReport]:
    """Each model's greedy answers to the problems (loaded one at a time), scored, paired with the
    first model's, and its first-token KL against the first model on the harmless prompts."""
    reports: list[CapabilityReport] = []
    kl = FirstTokenKL(harmless, EvalSettings())  # eval's own first-token KL, against the first model
    for path in paths:
        with load_for_eval(path) as m:
            answers = m.greedy_answers([p.prompt for p in problems], max_tokens, progress)
            divergence = kl.measure(m, None)[FirstTokenKL.field]
        values = [answer_value(a.reply) for a in answers]
        correct = [v == p.answer for v, p in zip(values, problems)]
        right = sum(correct)
        report = CapabilityReport(str(path), right, len(problems), wilson(right, len(problems)),
                                  float(np.mean([len(a.tokens) for a in answers])),
                                  sum(not a.finished for a in answers), kl_vs_base=divergence, correct=correct,
                                  answers=[a.reply for a in answers], values=values,
                                  finished=[a.finished for a in answers])
        if reports:
            report.paired = Paired.of(reports[0].correct, correct)
        reports.append(report)
    return reports
