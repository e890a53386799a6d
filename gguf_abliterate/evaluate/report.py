"""Did the edit do what was wanted, and break nothing else? The field's two yardsticks:

- refusals: greedy responses to harmful prompts (and harmless ones, for over-refusal after a
  reverse edit), counted by normalised marker matching at the start of the response;
- first-token KL divergence KL(base || edited) of the next-token distribution after each
  harmless prompt, over the full vocabulary.

Models are loaded one at a time (load, measure, free), with the same context settings, and
answer many prompts per decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gguf_abliterate.evaluate.generate import load_for_eval, perplexity
from gguf_abliterate.evaluate.markers import DEFAULT_MARKERS, is_refusal
from gguf_abliterate.evaluate.metrics import kl_divergence


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


def evaluate(paths: Sequence[Path], harmful: Sequence[str], harmless: Sequence[str], max_tokens: int = 64,
             markers: Sequence[str] = DEFAULT_MARKERS, ppl_text: str | None = None,
             progress: Callable[[int], None] = lambda n: None) -> list[ModelReport]:
    """Report for each model; the first is the base that KL is measured against."""
    reports = []
    base_lp: np.ndarray | None = None
    for i, path in enumerate(paths):
        with load_for_eval(path) as m:
            bad = m.greedy(harmful, max_tokens, progress)
            good = m.greedy(harmless, max_tokens, progress)
            lp = m.next_token_logprobs(harmless)
        if i == 0:
            base_lp = lp
        assert base_lp is not None
        reports.append(ModelReport(
            str(path), sum(is_refusal(r, markers) for r in bad), len(bad),
            sum(is_refusal(r, markers) for r in good), len(good),
            None if i == 0 else kl_divergence(base_lp, lp),
            None if ppl_text is None else perplexity(path, ppl_text), bad, good))
    return reports


def to_json(reports: Sequence[ModelReport], harmful: Sequence[str], harmless: Sequence[str],
            settings: dict[str, Any]) -> dict[str, Any]:
    """Everything, per prompt included, for --json."""
    return {"settings": settings, "harmful_prompts": list(harmful), "harmless_prompts": list(harmless),
            "models": [asdict(r) for r in reports]}
