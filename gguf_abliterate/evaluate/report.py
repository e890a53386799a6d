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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gguf_abliterate.evaluate.answer_rules import Measure, Measured, Probe, Reply
from gguf_abliterate.evaluate.costs import Costs, EvalSettings
from gguf_abliterate.evaluate.degenerate import is_degenerate
from gguf_abliterate.evaluate.generate import load_for_eval
from gguf_abliterate.evaluate.scorers import DELAYED_REASON, Label, Scorer
from gguf_abliterate.runtime.llama import Answer, LlamaModel


@dataclass
class ModelReport:
    path: str
    harmful_refusals: int
    harmful_total: int
    harmless_refusals: int
    harmless_total: int
    kl_vs_base: float | None = None  # the costs' fields (evaluate/costs.py) are the --json keys
    perplexity: float | None = None
    harmful_responses: list[str] = field(default_factory=list)
    harmless_responses: list[str] = field(default_factory=list)
    harmful_labels: dict[str, int] = field(default_factory=dict)  # label -> count
    harmless_degenerate: int = 0
    unfinished: int = 0  # answers (both sets) that did not end within the token budget
    kl_tokens: int = 1
    kl_multi_vs_base: float | None = None  # over the base's first kl_tokens greedy tokens
    kl_thought_vs_base: float | None = None  # a model that thinks: along the base's thought and answer
    task_accuracy: float | None = None
    task_answers: list[str] = field(default_factory=list)
    harmful_verdicts: list[str] = field(default_factory=list)  # label per harmful answer
    harmless_verdicts: list[str] = field(default_factory=list)  # label per harmless answer
    judge_labels: dict[str, int] | None = None  # label -> count, where a judge ran
    judge_verdicts: list[dict[str, object]] = field(default_factory=list)  # label and probabilities per answer
    thinking: Thoughts | None = None  # a model that thinks: its thoughts (the responses are its final answers)
    delayed_refusals: int | None = None  # the field protocol: harmful refusals after a compliant opening (counted in harmful_refusals)
    refusals_within: dict[str, int] | None = None  # the budget study: harmful refusals within the first N answer tokens


NO_ANSWER = "no answer"  # the verdict of an answer whose thought never ended: counted apart, not as a refusal


@dataclass
class Thoughts:
    """What a thinking model's thoughts did: the counts and verdicts above read its final answers."""

    format: str
    no_answer: int  # answers (both sets) whose final answer never arrived within the budget
    mean_tokens: float  # of a thought
    loops: int  # thoughts that loop or fill (the degenerate rules)
    harmful: list[str | None] = field(default_factory=list)  # per answer (None: no thought)
    harmless: list[str | None] = field(default_factory=list)
    no_answer_harmful: int = 0  # of no_answer, the harmful prompts'

    @property
    def no_answer_cell(self) -> str:
        """"harmful+harmless" answers that never arrived, as the tables show them."""
        return f"{self.no_answer_harmful}+{self.no_answer - self.no_answer_harmful}"

    @staticmethod
    def of(m: LlamaModel, bad: Sequence[Answer], good: Sequence[Answer]) -> Thoughts | None:
        if not m.thinks:
            return None
        both = [*bad, *good]
        lengths = [a.thought_tokens for a in both if a.thought is not None]
        return Thoughts(m.reasoning.format.name, sum(a.final is None for a in both),
                        float(np.mean(lengths)) if lengths else 0.0,
                        sum(a.thought is not None and is_degenerate(a.thought) for a in both),
                        [a.thought for a in bad], [a.thought for a in good], sum(a.final is None for a in bad))


def _arrived(labels: list[str], answers: Sequence[Answer]) -> list[str]:
    """Verdicts with the answers that never arrived marked so."""
    return [NO_ANSWER if a.final is None else v for v, a in zip(labels, answers)]


@dataclass
class BehaviourReport:
    """A behaviour pack's measure on one model, with what the edit cost."""

    path: str
    measured: Measured
    kl_vs_base: float | None = None
    answers: list[str] = field(default_factory=list)
    shows: list[bool] = field(default_factory=list)  # per probe
    unfinished: int = 0  # answers that did not end within the token budget
    kl_tokens: int = 1
    kl_multi_vs_base: float | None = None
    kl_thought_vs_base: float | None = None
    task_accuracy: float | None = None
    task_answers: list[str] = field(default_factory=list)
    perplexity: float | None = None


def evaluate(paths: Sequence[Path], harmful: Sequence[str], harmless: Sequence[str], scorer: Scorer,
             settings: EvalSettings = EvalSettings(), progress: Callable[[int], None] = lambda n: None,
             judge: Scorer | None = None, budgets: Sequence[int] = ()) -> list[ModelReport]:
    """Report for each model; the first is the base that KL is measured against. With
    `kl_tokens` K > 1, every model also reads the base's first K greedy tokens of each harmless
    answer (teacher-forced) and KL is averaged over those steps. With `budgets`, the harmful
    refusals are also counted on the same answers cut at each budget (`cut_answers`)."""
    reports: list[ModelReport] = []
    costs = Costs(harmless, settings)
    for path in paths:
        with load_for_eval(path, settings.thinking) as m:
            budget = settings.budget(settings.max_tokens, m.thinks)
            bad = m.greedy_answers(harmful, budget, progress)
            good = m.greedy_answers(harmless, budget, progress)
            measured = costs.measure(m, good)
            thoughts = Thoughts.of(m, bad, good)
            cut = {n: cut_answers(m, bad, n) for n in budgets if n <= settings.max_tokens}
        measured |= costs.measure_file(path)
        scored = scorer.label(harmful, [a.reply for a in bad])
        bad_verdicts = _arrived([v.label.value for v in scored], bad)
        good_verdicts = _arrived([v.label.value for v in scorer.label(harmless, [a.reply for a in good])], good)
        labels = Counter(bad_verdicts)
        reports.append(ModelReport(
            str(path), labels[Label.REFUSAL.value], len(bad), good_verdicts.count(Label.REFUSAL.value), len(good),
            harmful_responses=[a.reply for a in bad], harmless_responses=[a.reply for a in good],
            harmful_labels={label.value: labels[label.value] for label in Label},
            harmless_degenerate=good_verdicts.count(Label.DEGENERATE.value),
            unfinished=sum(not a.finished for a in (*bad, *good)), kl_tokens=settings.kl_tokens,
            harmful_verdicts=bad_verdicts, harmless_verdicts=good_verdicts, thinking=thoughts,
            delayed_refusals=sum(v.reason == DELAYED_REASON and a.final is not None for v, a in zip(scored, bad))
            if scorer.name == "markers-anywhere" else None,
            refusals_within={str(n): _arrived([v.label.value for v in scorer.label(harmful, texts)], bad).count(
                Label.REFUSAL.value) for n, texts in cut.items()} or None, **measured))
        if judge is not None:
            judged = judge.label(harmful, [a.reply for a in bad])
            counts = Counter(v.label.value for v in judged)
            reports[-1].judge_labels = {label.value: counts[label.value] for label in Label}
            reports[-1].judge_verdicts = [{"label": v.label.value, "probabilities": v.probabilities} for v in judged]
    return reports


def cut_answers(m: LlamaModel, answers: Sequence[Answer], tokens: int) -> list[str]:
    """Each final answer as it read after its first `tokens` tokens: the budget study counts
    refusals on one set of answers cut at each budget, not on new generations. (A thinking
    model's final answer is tokenized again: its tokens follow the thought's.)"""
    out = []
    for a in answers:
        own = a.tokens if not m.thinks else (m.tokenize(a.final, bos=False) if a.final else [])
        out.append(m.text(own[:tokens]))
    return out


def evaluate_behaviour(paths: Iterable[Path], probes: Sequence[Probe], measure: Measure, max_tokens: int,
                       harmless: Sequence[str], settings: EvalSettings = EvalSettings(),
                       progress: Callable[[int], None] = lambda n: None) -> list[BehaviourReport]:
    """A behaviour pack's measure on each model (greedy answers to its probes, `max_tokens`
    each), with the same KL, task and perplexity costs `evaluate` measures against the first."""
    reports = []
    costs = Costs(harmless, settings)
    for path in paths:
        with load_for_eval(path, settings.thinking) as m:
            answers = m.greedy_answers([p.prompt for p in probes], settings.budget(max_tokens, m.thinks), progress)
            measured = costs.measure(m)
        measured |= costs.measure_file(path)
        replies = [Reply(a.reply, a.finished and a.final is not None) for a in answers]
        reports.append(BehaviourReport(
            str(path), measure.measure(probes, replies), answers=[r.text for r in replies],
            shows=[measure.shows(p, r) for p, r in zip(probes, replies)],
            unfinished=sum(not r.finished for r in replies), kl_tokens=settings.kl_tokens, **measured))
    return reports


def to_json(reports: Sequence[ModelReport], harmful: Sequence[str], harmless: Sequence[str],
            settings: dict[str, Any]) -> dict[str, Any]:
    """Everything, per prompt included, for --json."""
    return {"settings": settings, "harmful_prompts": list(harmful), "harmless_prompts": list(harmless),
            "models": [asdict(r) for r in reports]}
