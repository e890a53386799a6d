"""The search for a capability edit: how many of a capability direction's heads to edit, and
how strongly (either sign), against the likelihood of the right answer on the search split.

A trial edits the top `k` heads of the direction file's ranking (`head_scores`: how much each
head writes along the failure side) with signed strength `s`: each chosen head's columns of its
block's attention output projection become `W_h - s u (u^T W_h)`, `u` the block's direction.
`s = 1` removes the heads' component along the direction, `s = 2` flips it, `s < 0` amplifies
it. That is the head-restricted edit the edit command writes (`edit/plan.py`), carried as the
exact rank-1 adapter its LoRA export writes (`export/lora.py`), so a trial runs what the bake
will be, without touching the weights.

Two objectives, both read in one teacher-forced pass or less, never by generating:
- the right answer's log-likelihood: each search problem's original answer (generated once,
  greedy) is kept up to its last "Answer:" (an answer cut by the budget: all of it) and the
  right number is appended; the objective is minus the mean log-probability of the number's
  tokens there. It rewards an edit that makes the right number likelier after the model's own
  working, which is not yet a right answer by generation: the pick is confirmed by greedy
  accuracy on the same split, and judged only on the held-out one (`eval --capability`).
- KL on harmless prompts: first-token KL(original || edited) on the harmless validation
  prompts, as the refusal search reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gguf_abliterate.direction.capability import DEFAULT_HEADS
from gguf_abliterate.edit.options import EditOptions
from gguf_abliterate.edit.plan import plan_edit
from gguf_abliterate.evaluate.first_token import kl_divergence
from gguf_abliterate.evaluate.problems import Problem
from gguf_abliterate.export.lora import lora_pieces
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.runtime.llama import Answer, LlamaModel

ANSWER_MARK = "Answer:"


def ranked_heads(head_scores: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """(block, head) of the `limit` highest scores, highest first (ties by block, then head)."""
    flat = np.argsort(-head_scores, axis=None, kind="stable")[:limit]
    return [(int(b), int(h)) for b, h in zip(*np.unravel_index(flat, head_scores.shape))]


def heads_map(heads: Sequence[tuple[int, int]]) -> dict[int, tuple[int, ...]]:
    """block -> sorted heads, as the edit's `heads` takes them."""
    out: dict[int, set[int]] = {}
    for block, head in heads:
        out.setdefault(block, set()).add(head)
    return {b: tuple(sorted(h)) for b, h in sorted(out.items())}


class HeadAdapters:
    """The head-restricted edit of any top-k heads at any strength, as adapter pieces: the
    LoRA export's pieces for every head of the candidate blocks are computed once (A = u^T W,
    B = -u), and a trial masks A to its heads' columns and scales B."""

    def __init__(self, model: Model, direction: Direction, candidates: Sequence[tuple[int, int]]):
        self.candidates = list(candidates)
        blocks = sorted({b for b, _ in self.candidates})
        every = {b: tuple(range(model.attention_heads(b)[0])) for b in blocks}
        plan = plan_edit(model, EditOptions(), heads=every)
        pieces, _ = lora_pieces(model, plan, direction)
        self.pieces = {edit.block: (name, *pieces[name]) for name, edit in plan.edits.items() if name in pieces}
        self.width = {b: model.attention_heads(b)[1] for b in blocks}

    def edit(self, k: int, strength: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Adapter pieces of the top `k` candidates at signed `strength` (W_h - s u u^T W_h)."""
        out = {}
        for block, heads in heads_map(self.candidates[:k]).items():
            name, a, b = self.pieces[block]
            kept = np.zeros_like(a)
            width = self.width[block]
            for h in heads:
                kept[:, h * width:(h + 1) * width] = a[:, h * width:(h + 1) * width]
            out[name] = (kept, (strength * b).astype(np.float32))
        return out


@dataclass
class Forced:
    """A search problem, teacher-forced: the original's working, then the right number."""

    prompt: str
    tokens: list[int]
    reads: list[int]  # steps of `tokens` whose next token is part of the right number


def forced(model: LlamaModel, problems: Sequence[Problem], answers: Sequence[Answer]) -> list[Forced]:
    """Each problem's original working up to its last "Answer:" (all of it where the answer never
    got there), then "Answer: <the right number>"; the reads are the tokens after the longest
    token prefix the working alone shares (the number, and any token merged across the seam)."""
    out = []
    for p, a in zip(problems, answers):
        cut = a.reply.rfind(ANSWER_MARK)
        working = (a.reply[:cut] if cut >= 0 else a.reply.rstrip() + "\n") + ANSWER_MARK
        head = model.tokenize(working, bos=False)
        tokens = model.tokenize(f"{working} {p.answer}", bos=False)
        shared = next((i for i, (x, y) in enumerate(zip(head, tokens)) if x != y), min(len(head), len(tokens)))
        shared = min(shared, len(tokens) - 1)
        out.append(Forced(p.prompt, tokens, list(range(shared, len(tokens)))))
    return out


@dataclass
class Scored:
    """A trial's objectives."""

    answer_ll: float  # mean log-probability of the right numbers (higher is better)
    forced_right: int  # problems whose right number is the most likely continuation at every token
    kl: float  # first-token KL on the harmless prompts


class CapabilityScorer:
    """The original's readings once; then a trial's objectives under whatever adapter the
    model holds."""

    def __init__(self, model: LlamaModel, problems: Sequence[Forced], harmless: Sequence[str]):
        self.model, self.problems, self.harmless = model, list(problems), list(harmless)
        model.set_adapter(None)
        self.base_kl = model.next_token_logprobs(self.harmless, share_prefix=True)
        self.base = self.score()

    def score(self, progress: Callable[[int], None] = lambda n: None) -> Scored:
        rows = self.model.forced_logprobs([f.prompt for f in self.problems], [f.tokens for f in self.problems],
                                          progress, steps=[f.reads for f in self.problems])
        ll = [sum(float(r[j, f.tokens[s]]) for j, s in enumerate(f.reads)) for f, r in zip(self.problems, rows)]
        right = sum(all(int(np.argmax(r[j])) == f.tokens[s] for j, s in enumerate(f.reads))
                    for f, r in zip(self.problems, rows))
        kl = kl_divergence(self.base_kl, self.model.next_token_logprobs(self.harmless, share_prefix=True))
        return Scored(float(np.mean(ll)), int(right), kl)


@dataclass
class CapabilityTrial:
    number: int
    heads: int  # the top this many of the ranking
    strength: float  # signed: W_h - s u u^T W_h
    scored: Scored
    confirmed: int | None = None  # greedy right answers on the search split, where confirmed

    def to_json(self) -> dict[str, object]:
        return {"number": self.number, "heads": self.heads, "strength": self.strength,
                "answer_ll": self.scored.answer_ll, "forced_right": self.scored.forced_right, "kl": self.scored.kl,
                "confirmed": self.confirmed}


@dataclass(frozen=True, kw_only=True)
class CapabilitySearch:
    trials: int = 40
    minutes: float = 30.0  # a trial reads every search problem's whole working: 160 s on the 0.5B at 48
    max_heads: int = 64  # the ranking's top this many are the candidates
    strengths: tuple[float, float] = (-1.0, 2.0)  # the signed strength's range
    seed: int = 0


def run_search(scorer: CapabilityScorer, adapters: HeadAdapters, settings: CapabilitySearch,
               progress: Callable[[CapabilityTrial], None] = lambda t: None) -> list[CapabilityTrial]:
    """TPE over (heads, strength) against (minus the answer log-likelihood, KL): every finished
    trial. The first is the direction file's own edit (its number of heads, full removal)."""
    import time

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    top = len(adapters.candidates)
    study = optuna.create_study(directions=["minimize", "minimize"],
                                sampler=optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=5))
    study.enqueue_trial({"heads": min(top, DEFAULT_HEADS), "strength": 1.0})  # the direction file's own edit
    done: list[CapabilityTrial] = []
    stop = time.monotonic() + settings.minutes * 60
    while len(done) < settings.trials and time.monotonic() < stop:
        trial = study.ask()
        k = trial.suggest_int("heads", 1, top, log=True)
        s = trial.suggest_float("strength", *settings.strengths)
        scorer.model.set_adapter(adapters.edit(k, s))
        try:
            scored = scorer.score()
        finally:
            scorer.model.set_adapter(None)
        study.tell(trial, [-scored.answer_ll, scored.kl])
        done.append(CapabilityTrial(trial.number, k, s, scored))
        progress(done[-1])
    return done


def front(trials: Sequence[CapabilityTrial], max_kl: float) -> list[CapabilityTrial]:
    """The trials within `max_kl` that no other such trial beats on both objectives, likeliest
    right answers first."""
    ok = [t for t in trials if t.scored.kl <= max_kl]
    kept = [t for t in ok if not any(o.scored.answer_ll >= t.scored.answer_ll and o.scored.kl <= t.scored.kl
                                     and (o.scored.answer_ll, o.scored.kl) != (t.scored.answer_ll, t.scored.kl)
                                     for o in ok)]
    return sorted(kept, key=lambda t: -t.scored.answer_ll)
