"""The two objectives a trial is scored on, both minimised, inside llama.cpp with its adapter.

- refusal: the probability the first response token gives to refusal openings, averaged over
  harmful prompts, as a ratio to the unedited model's (1 = no change);
- KL: KL(original || trial) of the next-token distribution on harmless prompts: the first
  token, or with `kl_tokens` K > 1 teacher-forced along the original's first K greedy tokens
  and averaged over the steps (abliterix's multi-token KL).

For a model that thinks, refusal is read where the final answer opens, after the original
model's own thought on that prompt (generated once, then teacher-forced: a trial stays one
forward pass), never at the first token of a thought. KL is read along the original's own
greedy answer to each harmless prompt, its thought and the first K tokens after it
(`thought_tokens` + K in all, teacher-forced), at KL_STEPS evenly spaced steps: an edit that
changes how the model thinks about harmless requests costs KL even where its answers open alike.

The guard: a trial that leaves more than `GUARD` of the original refusal mass is not run on
the harmless prompts (half a trial saved) and gets a KL objective of `1 + refusal`, so edits
that barely edit never look good on the second objective.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from gguf_abliterate.evaluate.first_token import kl_divergence, kl_steps, refusal_mass, refusal_token_ids
from gguf_abliterate.direction.measure import Position, ProgressBars, at_position, own_answers
from gguf_abliterate.optimise.adapter import TrialEdit, apply
from gguf_abliterate.runtime.llama import LlamaModel
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET

GUARD = 0.5


@dataclass(frozen=True)
class Score:
    refusal: float  # refusal mass as a ratio to the original's
    kl: float | None  # None: not measured (refusal above GUARD)

    @property
    def objectives(self) -> tuple[float, float]:
        return self.refusal, (1.0 + self.refusal) if self.kl is None else self.kl


class TrialScorer:
    """A loaded model, its validation prompts and the unedited model's answers to them."""

    def __init__(self, model: LlamaModel, harmful: Sequence[str], harmless: Sequence[str], kl_tokens: int = 1,
                 progress: ProgressBars | None = None, thought_tokens: int = THOUGHT_BUDGET):
        self.model, self.kl_tokens = model, kl_tokens
        self.ids = refusal_token_ids(model)
        apply(model, None)
        # a model that thinks: each prompt carried past the original's own thought, to where its answer opens
        self.harmful = at_position(model, harmful, Position.THOUGHT, progress, thought_tokens)
        self.base_refusal = refusal_mass(model.next_token_logprobs(self.harmful, share_prefix=True), self.ids)
        self.harmless = list(harmless)
        self.continuations: list[list[int]] | None = None
        self.steps: list[list[int]] | None = None
        if model.thinks:
            answers = own_answers(model, self.harmless, thought_tokens + kl_tokens, progress)
            self.continuations = [a.tokens for a in answers]
            self.steps = kl_steps(self.continuations)
        elif kl_tokens > 1:
            self.continuations = model.greedy_tokens(self.harmless, kl_tokens)
        self.base = self._harmless_logprobs()

    def forwarded_tokens(self) -> int:
        """What a trial forwards at most (the harmful prompts, then the harmless ones): on a model
        that thinks, the thoughts make most of a trial's cost."""
        prompts = sum(len(t) for t in self.model.encode([*self.harmful, *self.harmless]))
        return prompts + sum(len(c) for c in self.continuations or [])

    def _harmless_logprobs(self) -> list[np.ndarray]:
        if self.continuations is None:
            return [row[None] for row in self.model.next_token_logprobs(self.harmless, share_prefix=True)]
        return self.model.forced_logprobs(self.harmless, self.continuations, steps=self.steps)

    def kl(self) -> float:
        """KL(original || current) on the harmless prompts, averaged over prompts and steps."""
        now = self._harmless_logprobs()
        return float(np.mean([kl_divergence(b, n) for b, n in zip(self.base, now)]))

    def score(self, edit: TrialEdit) -> Score:
        """The objectives of a trial's edit."""
        apply(self.model, edit)
        try:
            ratio = refusal_mass(self.model.next_token_logprobs(self.harmful, share_prefix=True), self.ids)
            ratio /= max(self.base_refusal, 1e-12)
            return Score(ratio, None if ratio > GUARD else self.kl())
        finally:
            apply(self.model, None)

