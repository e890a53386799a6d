"""Did the edit do what was wanted, and break nothing else? The field's two yardsticks:

- refusals: greedy responses to harmful prompts (and harmless ones, for over-refusal after a
  reverse edit), counted by normalised marker matching at the start of the response;
- first-token KL divergence KL(base || edited) of the next-token distribution after each
  harmless prompt, over the full vocabulary;

and what markers miss: degenerate answers (loops, filler; `degenerate`), answers that never
end within the budget, KL along the base's first K answer tokens, and exact-answer tasks
(`tasks`) as a measure of capability.

Models are loaded one at a time (load, measure, free), with the same context settings, and
answer many prompts per decode. With a judge, the harmful answers also get its five-way labels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gguf_abliterate.evaluate.generate import load_for_eval, perplexity
from gguf_abliterate.evaluate.metrics import kl_divergence
from gguf_abliterate.evaluate.scorers import Label, Scorer
from gguf_abliterate.evaluate.tasks import Task, is_correct


@dataclass
class ModelReport:
    path: str
    harmful_refusals: int
    harmful_total: int
    harmless_refusals: int
    harmless_total: int
    kl_vs_base: float | None
    perplexity: float | None = None
    harmful_responses: list[str] = field(default_factory=list)
    harmless_responses: list[str] = field(default_factory=list)
    harmful_labels: dict[str, int] = field(default_factory=dict)  # label -> count
    harmless_degenerate: int = 0
    unfinished: int = 0  # answers (both sets) that did not end within the token budget
    kl_tokens: int = 1
    kl_multi_vs_base: float | None = None  # over the base's first kl_tokens greedy tokens
    task_accuracy: float | None = None
    task_answers: list[str] = field(default_factory=list)
    harmful_verdicts: list[str] = field(default_factory=list)  # label per harmful answer
    harmless_verdicts: list[str] = field(default_factory=list)  # label per harmless answer
    judge_labels: dict[str, int] | None = None  # label -> count, where a judge ran
    judge_verdicts: list[dict[str, object]] = field(default_factory=list)  # label and probabilities per answer


@dataclass(frozen=True)
class EvalSettings:
    max_tokens: int = 64
    kl_tokens: int = 1
    tasks: tuple[Task, ...] = ()
    task_tokens: int = 48
    ppl_text: str | None = None


def evaluate(paths: Sequence[Path], harmful: Sequence[str], harmless: Sequence[str], scorer: Scorer,
             settings: EvalSettings = EvalSettings(), progress: Callable[[int], None] = lambda n: None,
             judge: Scorer | None = None) -> list[ModelReport]:
    """Report for each model; the first is the base that KL is measured against. With
    `kl_tokens` K > 1, every model also reads the base's first K greedy tokens of each harmless
    answer (teacher-forced) and KL is averaged over those steps."""
    reports: list[ModelReport] = []
    base_lp: np.ndarray | None = None
    base_multi: list[np.ndarray] = []
    continuations: list[list[int]] = []
    for i, path in enumerate(paths):
        with load_for_eval(path) as m:
            bad = m.greedy_answers(harmful, settings.max_tokens, progress)
            good = m.greedy_answers(harmless, settings.max_tokens, progress)
            lp = m.next_token_logprobs(harmless)
            if i == 0:
                continuations = [a.tokens[: settings.kl_tokens] for a in good]
            multi = m.forced_logprobs(harmless, continuations) if settings.kl_tokens > 1 else []
            task_answers = m.greedy([t.prompt for t in settings.tasks], settings.task_tokens) if settings.tasks else []
        if i == 0:
            base_lp, base_multi = lp, multi
        assert base_lp is not None
        bad_verdicts = scorer.label(harmful, [a.text for a in bad])
        good_verdicts = scorer.label(harmless, [a.text for a in good])
        labels = Counter(v.label.value for v in bad_verdicts)
        reports.append(ModelReport(
            str(path), labels[Label.REFUSAL.value], len(bad),
            sum(v.label is Label.REFUSAL for v in good_verdicts), len(good),
            None if i == 0 else kl_divergence(base_lp, lp),
            None if settings.ppl_text is None else perplexity(path, settings.ppl_text),
            [a.text for a in bad], [a.text for a in good],
            {label.value: labels[label.value] for label in Label},
            sum(v.label is Label.DEGENERATE for v in good_verdicts),
            sum(not a.finished for a in (*bad, *good)), settings.kl_tokens,
            None if i == 0 or not multi else float(np.mean([kl_divergence(b, n) for b, n in zip(base_multi, multi)])),
            sum(is_correct(t, a) for t, a in zip(settings.tasks, task_answers)) / len(settings.tasks)
            if settings.tasks else None,
            task_answers, [v.label.value for v in bad_verdicts], [v.label.value for v in good_verdicts]))
        if judge is not None:
            judged = judge.label(harmful, [a.text for a in bad])
            counts = Counter(v.label.value for v in judged)
            reports[-1].judge_labels = {label.value: counts[label.value] for label in Label}
            reports[-1].judge_verdicts = [{"label": v.label.value, "probabilities": v.probabilities} for v in judged]
    return reports


def to_json(reports: Sequence[ModelReport], harmful: Sequence[str], harmless: Sequence[str],
            settings: dict[str, Any]) -> dict[str, Any]:
    """Everything, per prompt included, for --json."""
    return {"settings": settings, "harmful_prompts": list(harmful), "harmless_prompts": list(harmless),
            "models": [asdict(r) for r in reports]}
