"""What an edit cost besides the behaviour it moved: one small class per metric, registered.

Every model of an evaluation is measured against the first (the base). A metric names the
report field it fills (these are the `eval --json` keys, kept as they were), measures it, and
says how it is shown: the column header, the cell, and the note under the HTML table. The
`eval` table, the HTML report's summary and the JSON all read `METRICS`, so adding a metric
is one class here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from gguf_abliterate.evaluate.first_token import KL_STEPS, kl_divergence, kl_steps
from gguf_abliterate.evaluate.generate import perplexity
from gguf_abliterate.evaluate.tasks import Task, is_correct
from gguf_abliterate.runtime.llama import Answer, LlamaModel
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET, Thinking


@dataclass(frozen=True)
class EvalSettings:
    max_tokens: int = 64  # an answer's budget; a model that thinks gets `thought_tokens` more
    kl_tokens: int = 1
    tasks: tuple[Task, ...] = ()
    task_tokens: int = 48
    ppl_text: str | None = None
    thinking: Thinking = field(default_factory=Thinking)
    thought_tokens: int = THOUGHT_BUDGET

    def budget(self, answer_tokens: int, thinks: bool) -> int:
        """Tokens a greedy answer may take: the answer's own, and a thought's where the model thinks."""
        return answer_tokens + (self.thought_tokens if thinks else 0)


class Metric:
    """One cost. An instance lives for one evaluation: it keeps what it measured on the base."""

    field: ClassVar[str]  # the report field it fills
    width: ClassVar[int]  # of its terminal column
    title: ClassVar[str]  # its column's header ({k}: the KL tokens)
    explains: ClassVar[str]  # the note under the HTML table
    always: ClassVar[bool] = False  # a column even when no model has a value

    def __init__(self, harmless: Sequence[str], settings: EvalSettings):
        self.harmless, self.settings = list(harmless), settings
        self.base: Any = None  # what it measured on the base, once it has

    @staticmethod
    def wanted(settings: EvalSettings) -> bool:
        """Whether an evaluation with these settings measures it."""
        return True

    def measure(self, m: LlamaModel, good: Sequence[Answer] | None) -> dict[str, Any]:
        """Report fields, of a loaded model (`good`: its greedy harmless answers, if made)."""
        return {}

    def measure_file(self, path: Path) -> dict[str, Any]:
        """Report fields that need the file itself, measured once the model is freed."""
        return {}

    @classmethod
    def header(cls, kl_tokens: int) -> str:
        return cls.title.format(k=kl_tokens)

    @classmethod
    def note(cls, kl_tokens: int) -> str:
        return cls.explains.format(k=kl_tokens)

    @staticmethod
    def cell(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.4f}"


class FirstTokenKL(Metric):
    field, width, always = "kl_vs_base", 11, True
    title, explains = "KL vs base", "KL = first-token KL(base ‖ model) on the harmless prompts"

    def measure(self, m: LlamaModel, good: Sequence[Answer] | None) -> dict[str, Any]:
        lp = m.next_token_logprobs(m.at_answer(self.harmless))  # a thinking model: where its answer opens
        if self.base is None:
            self.base = lp
            return {self.field: None}
        return {self.field: kl_divergence(self.base, lp)}


class AnswerKL(Metric):
    """KL along the base's first K greedy answer tokens, each model teacher-forced on them."""

    field, width = "kl_multi_vs_base", 8
    title, explains = "KL@{k}", "KL@{k} the same averaged over the base's first {k} answer tokens"

    @staticmethod
    def wanted(settings: EvalSettings) -> bool:
        return settings.kl_tokens > 1

    def measure(self, m: LlamaModel, good: Sequence[Answer] | None) -> dict[str, Any]:
        k = self.settings.kl_tokens
        if self.base is None:
            good = good if good is not None else m.greedy_answers(self.harmless, k)
            self.continuations = [a.tokens[:k] for a in good]
            self.base = m.forced_logprobs(self.harmless, self.continuations)
            return {self.field: None}
        multi = m.forced_logprobs(self.harmless, self.continuations)
        return {self.field: float(np.mean([kl_divergence(b, n) for b, n in zip(self.base, multi)]))}


class ThoughtKL(Metric):
    """For a model that thinks: KL along the base's own greedy answer to each harmless prompt,
    its thought and its final answer, every model teacher-forced on it. First-token KL reads
    only where the answer opens past an empty thought; an edit that changes how the model
    thinks shows here."""

    field, width = "kl_thought_vs_base", 10
    title = "KL thought"
    explains = (f"KL thought the same along the base's whole greedy answer to each harmless prompt, its thought "
                f"and final answer, at {KL_STEPS} evenly spaced steps (models that think)")

    def measure(self, m: LlamaModel, good: Sequence[Answer] | None) -> dict[str, Any]:
        if not m.thinks:
            return {}
        if self.base is None:
            if good is None:
                good = m.greedy_answers(self.harmless, self.settings.budget(self.settings.max_tokens, True))
            self.continuations = [a.tokens for a in good]
            self.steps = kl_steps(self.continuations)
            self.base = m.forced_logprobs(self.harmless, self.continuations, steps=self.steps)
            return {self.field: None}
        along = m.forced_logprobs(self.harmless, self.continuations, steps=self.steps)
        return {self.field: float(np.mean([kl_divergence(b, n) for b, n in zip(self.base, along)]))}


class TaskAccuracy(Metric):
    """The share of exact-answer questions answered right: a measure of capability."""

    field, width = "task_accuracy", 6
    title, explains = "tasks", "tasks = exact-answer questions answered right"

    @staticmethod
    def wanted(settings: EvalSettings) -> bool:
        return bool(settings.tasks)

    def measure(self, m: LlamaModel, good: Sequence[Answer] | None) -> dict[str, Any]:
        tasks = self.settings.tasks
        answers = m.greedy([t.prompt for t in tasks], self.settings.budget(self.settings.task_tokens, m.thinks))
        return {self.field: sum(is_correct(t, a) for t, a in zip(tasks, answers)) / len(tasks),
                "task_answers": answers}

    @staticmethod
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.0%}"


class Perplexity(Metric):
    field, width = "perplexity", 11
    title, explains = "perplexity", "perplexity on the given text"

    @staticmethod
    def wanted(settings: EvalSettings) -> bool:
        return settings.ppl_text is not None

    def measure_file(self, path: Path) -> dict[str, Any]:
        assert self.settings.ppl_text is not None
        return {self.field: perplexity(path, self.settings.ppl_text)}

    @staticmethod
    def cell(value: float | None) -> str:
        return "-" if value is None or math.isnan(value) else f"{value:.3f}"


METRICS: tuple[type[Metric], ...] = (FirstTokenKL, AnswerKL, ThoughtKL, TaskAccuracy, Perplexity)


class Costs:
    """The registered metrics an evaluation's settings ask for, measured model by model."""

    def __init__(self, harmless: Sequence[str], settings: EvalSettings):
        self.metrics = [cls(harmless, settings) for cls in METRICS if cls.wanted(settings)]

    def measure(self, m: LlamaModel, good: Sequence[Answer] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for metric in self.metrics:
            out |= metric.measure(m, good)
        return out

    def measure_file(self, path: Path) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for metric in self.metrics:
            out |= metric.measure_file(path)
        return out


def shown(reports: Sequence[object]) -> list[type[Metric]]:
    """The metrics a table of these reports shows: those any of them measured."""
    return [cls for cls in METRICS if cls.always or any(getattr(r, cls.field) is not None for r in reports)]
