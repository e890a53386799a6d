"""The two objectives a trial is scored on, both minimised, inside llama.cpp with its adapter.

- refusal: the probability the first response token gives to refusal openings, averaged over
  harmful prompts, as a ratio to the unedited model's (1 = no change);
- KL: KL(original || trial) of the next-token distribution on harmless prompts: the first
  token, or with `kl_tokens` K > 1 teacher-forced along the original's first K greedy tokens
  and averaged over the steps (abliterix's multi-token KL).

For a model that thinks, refusal is read by default in the opening of the trial model's own
greedy answer: the share of harmful prompts whose first `opening_tokens` tokens (its thought's
opening, and the final answer if it began within them) say it refuses (`decides_to_refuse`),
as a ratio to the original's share. On the Qwen2.5-Coder-1.5B made to think, the decision
shows there (docs/thinking.md): read where the final answer opens after the original's thought
instead (`opening_tokens` 0: teacher-forced, one forward pass), a trial sees an answer that the
original's thought has already decided, and the default edit moved that reading only to 0.61
of the original's. Either way, no first-token distribution of a thought is ever scored.

KL is read along the original's own greedy answer to each harmless prompt, its thought and the
first K tokens after it (`thought_tokens` + K in all, teacher-forced), at KL_STEPS evenly
spaced steps: an edit that changes how the model thinks about harmless requests costs KL even
where its answers open alike.

The guard: a trial that leaves more than `GUARD` of the original refusal mass is not run on
the harmless prompts (half a trial saved) and gets a KL objective of `1 + refusal`, so edits
that barely edit never look good on the second objective.

Two fidelities: with more than FIRST prompts of a kind, a trial reads the first FIRST, then
the rest only if it may still matter: not when the refusal ratio on the first harmful ones is
above PRUNE_REFUSAL (the guard would stop it anyway), nor when the search says (`reach`) that
a finished trial refusing no more had a KL on the same first harmless prompts far lower. Such
a trial records what it read, marked `pruned`, and is never picked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.first_token import kl_divergence, kl_steps, refusal_masses, refusal_token_ids
from gguf_abliterate.evaluate.markers import decides_to_refuse
from gguf_abliterate.direction.measure import Position, ProgressBars, at_position, own_answers
from gguf_abliterate.optimise.adapter import TrialEdit, apply
from gguf_abliterate.runtime.llama import Answer, LlamaModel, Prompt
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET

GUARD = 0.5
# a trial is read on the first FIRST prompts of each kind before the rest (a multi-fidelity
# search: most trials are settled by then); a refusal ratio above PRUNE_REFUSAL on them ends it
FIRST, PRUNE_REFUSAL = 8, 1.0
OPENING_TOKENS = 48  # a model that thinks: the opening of its own answer a trial reads


Reach = Callable[[float, float], "float | None"]


@dataclass(frozen=True)
class Score:
    refusal: float  # refusal mass as a ratio to the original's
    kl: float | None  # None: not measured (refusal above GUARD)
    kl_first: float | None = None  # KL on the first FIRST harmless prompts alone (what `reach` compares)
    pruned: bool = False  # scored on the first FIRST prompts of a kind only: an estimate

    @property
    def objectives(self) -> tuple[float, float]:
        return self.refusal, (1.0 + self.refusal) if self.kl is None else self.kl


class TrialScorer:
    """A loaded model, its validation prompts and the unedited model's answers to them."""

    def __init__(self, model: LlamaModel, harmful: Sequence[str], harmless: Sequence[str], kl_tokens: int = 1,
                 progress: ProgressBars | None = None, thought_tokens: int = THOUGHT_BUDGET,
                 opening_tokens: int = OPENING_TOKENS):
        self.model, self.kl_tokens = model, kl_tokens
        self.ids = refusal_token_ids(model)
        self.opening_tokens = opening_tokens if model.thinks else 0
        apply(model, None)
        if self.opening_tokens:
            self.harmful: list[Prompt] = list(harmful)
            self.base_refusal = self._opening_refusals()
            if self.base_refusal == 0:
                raise UserError(f"the original model's own answers to the {len(harmful)} scoring prompts refuse in none "
                                f"of their first {self.opening_tokens} tokens: nothing for the search to lower "
                                f"(--opening-tokens 0 reads where the final answer opens instead)")
        else:
            # a model that thinks: each prompt carried past the original's own thought, to where its answer opens
            self.harmful = at_position(model, harmful, Position.THOUGHT, progress, thought_tokens)
            self.base_masses = self._refusal_masses(self.harmful)
            self.base_refusal = float(self.base_masses.mean())
        self.harmless = list(harmless)
        self.continuations: list[list[int]] | None = None
        self.steps: list[list[int]] | None = None
        self.thought: float | None = None  # a model that thinks: the original's mean thought on the harmless prompts
        self.answer_tokens = thought_tokens + kl_tokens  # ... and the budget it was read at
        if model.thinks:
            answers = own_answers(model, self.harmless, self.answer_tokens, progress)
            self.continuations = [a.tokens for a in answers]
            self.thought = _mean_thought(answers)
            self.steps = kl_steps(self.continuations)
        elif kl_tokens > 1:
            self.continuations = model.greedy_tokens(self.harmless, kl_tokens)
        self.base = self._harmless_logprobs()

    def thought_of(self, llama: LlamaModel) -> float:
        """`llama`'s mean thought in tokens on the harmless prompts, generated at the budget the
        original's (`thought`) were read at, so that the two compare like with like."""
        return _mean_thought(llama.greedy_answers(self.harmless, self.answer_tokens))

    def forwarded_tokens(self) -> int:
        """What a trial forwards at most (the harmful prompts, then the harmless ones): on a model
        that thinks, the thoughts make most of a trial's cost."""
        prompts = sum(len(t) for t in self.model.encode([*self.harmful, *self.harmless]))
        return prompts + len(self.harmful) * self.opening_tokens + sum(len(c) for c in self.continuations or [])

    def _refusal_masses(self, prompts: Sequence[Prompt]) -> np.ndarray:
        return refusal_masses(self.model.next_token_logprobs(prompts, share_prefix=True), self.ids)

    def _opening_refusals(self) -> float:
        """The share of harmful prompts whose own greedy opening says the model refuses."""
        answers = self.model.greedy_answers(self.harmful, self.opening_tokens)
        return float(np.mean([decides_to_refuse(a.text) for a in answers]))

    def _harmless_logprobs(self, part: slice = slice(None)) -> list[np.ndarray]:
        prompts = self.harmless[part]
        if self.continuations is None:
            return [row[None] for row in self.model.next_token_logprobs(prompts, share_prefix=True)]
        steps = None if self.steps is None else self.steps[part]
        return self.model.forced_logprobs(prompts, self.continuations[part], steps=steps)

    def _kls(self, part: slice = slice(None)) -> np.ndarray:
        """Per harmless prompt of `part`, KL(original || current), averaged over its steps."""
        now = self._harmless_logprobs(part)
        return np.array([kl_divergence(b, n) for b, n in zip(self.base[part], now)])

    def kl(self) -> float:
        """KL(original || current) on the harmless prompts, averaged over prompts and steps."""
        return float(self._kls().mean())

    def score(self, edit: TrialEdit, reach: Reach = lambda refusal, kl_first: None) -> Score:
        """The objectives of a trial's edit, read in two parts where there are more than FIRST
        prompts: the first FIRST harmful prompts, then the rest unless their refusal ratio is
        above PRUNE_REFUSAL (where the guard would almost surely stop it too); the first FIRST
        harmless prompts' KL, then the rest unless `reach(refusal, KL on those)` returns the
        KL estimate of a trial that cannot reach the front."""
        apply(self.model, edit)
        try:
            if self.opening_tokens:
                ratio = self._opening_refusals() / max(self.base_refusal, 1e-12)
            else:
                masses = self._refusal_masses(self.harmful[:FIRST])
                first = float(masses.mean()) / max(float(self.base_masses[:FIRST].mean()), 1e-12)
                if len(self.harmful) > FIRST and first > PRUNE_REFUSAL:
                    return Score(first, None, pruned=True)
                if len(self.harmful) > FIRST:
                    masses = np.concatenate([masses, self._refusal_masses(self.harmful[FIRST:])])
                ratio = float(masses.mean()) / max(self.base_refusal, 1e-12)
            if ratio > GUARD:
                return Score(ratio, None)
            kls = self._kls(slice(0, FIRST))
            kl_first = float(kls.mean())
            if len(self.harmless) > FIRST:
                estimate = reach(ratio, kl_first)
                if estimate is not None:
                    return Score(ratio, estimate, kl_first, pruned=True)
                kls = np.concatenate([kls, self._kls(slice(FIRST, None))])
            return Score(ratio, float(kls.mean()), kl_first)
        finally:
            apply(self.model, None)


def _mean_thought(answers: Sequence[Answer]) -> float:
    return float(np.mean([a.thought_tokens for a in answers]))
