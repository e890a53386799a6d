"""Find the direction to remove: difference of means per layer, and the layer that works best.

Per layer L (llama.cpp's `l_out-L`, the residual stream after block L, at the last prompt
token): mean activation over the pack's positive prompts (for refusal, harmful ones) minus the
mean over its negative ones (harmless), normalised.
`choose_layer` then ablates each candidate layer's direction from the whole residual stream
(inside llama.cpp, through the capture hook) and scores it on the validation prompts by the
behaviour pack's measure (for refusal, how much probability the first response token gives to
refusal openings, "I", "Sorry", ...; for other packs, the share of short greedy answers that
show the behaviour), and by the KL divergence of the first-token distribution on harmless
prompts, eliminating the worse half of the candidates at each doubling of the prompts.
The last 20% of layers are not candidates (they hold little of the direction and ablating
there damages the output most).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import numpy as np

from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.first_token import kl_per_prompt
from gguf_abliterate.runtime.llama import Answer, AtAnswer, LlamaModel, Prompt
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET

MAX_LAYER_FRACTION = 0.8
FIRST_RUNG = 2  # prompts (of each kind) every candidate is scored on before the first elimination
# the residual capture stops once the direction's split-half agreement reaches CONVERGED, read
# every CAPTURE_STEP prompt pairs from MIN_PAIRS on (the shipped 72 pairs do not reach it on
# Qwen2.5-Coder 0.5B or 1.5B: 0.91 and 0.977, so they are captured whole)
CONVERGED = 0.98
MIN_PAIRS = 32
CAPTURE_STEP = 32
DEFAULT_MAX_KL = 0.1


class Engine(str, Enum):
    """What computes the residual stream."""

    LLAMA = "llama"  # llama.cpp's eval-callback hook
    TORCH = "torch"  # a CPU torch pass over the dequantized weights


class Position(str, Enum):
    """Where a thinking model's prompts are read (for a model that does not think, all one)."""

    PROMPT = "prompt"  # the last prompt token, as the template renders it (inside an opened thought)
    ANSWER = "answer"  # where the final answer opens, past a closed empty thought
    THOUGHT = "thought"  # the same, past the model's own thought (generated first, greedy)


DEFAULT_POSITION = Position.ANSWER
ProgressBars = Callable[..., Any]  # tqdm-like: bars(total=, desc=, unit=) as a context manager


def at_position(model: LlamaModel, prompts: Sequence[str], position: Position,
                bars: ProgressBars | None = None, thought_tokens: int = THOUGHT_BUDGET) -> list[Prompt]:
    """`prompts` as read at `position`: a model that does not think reads them as they are.
    At THOUGHT the model's own thoughts are generated first (with a bar from `bars`, a
    tqdm-like factory, where given)."""
    if not model.thinks or position is Position.PROMPT:
        return list(prompts)
    if position is Position.ANSWER:
        return model.at_answer(prompts)
    answers = own_answers(model, prompts, thought_tokens, bars)
    # where the model's own answer opened, as it wrote the way there; a thought that never
    # ended within the budget is closed for it
    return [AtAnswer(p, a.thought or "", a.opening) for p, a in zip(prompts, answers)]


def own_answers(model: LlamaModel, prompts: Sequence[str], tokens: int, bars: ProgressBars | None = None) -> list[Answer]:
    """The model's greedy answers, thoughts and all, with a bar from `bars` where given."""
    if bars is None:
        return model.greedy_answers(prompts, tokens)
    with bars(total=len(prompts), desc="the model's own thoughts", unit="prompt") as bar:
        return model.greedy_answers(prompts, tokens, bar.update)


@dataclass
class LayerStats:
    """Per-layer numbers stored with the directions."""

    directions: np.ndarray  # (n_layer, n_embd), unit rows
    harmless_mean: np.ndarray  # (n_layer, n_embd)
    harmful_norm: np.ndarray  # (n_layer,) norm of the harmful mean
    harmless_norm: np.ndarray
    diff_norm: np.ndarray  # norm of the difference of means
    separation: np.ndarray  # gap of the projections' means over their pooled std


@dataclass
class LayerChoice:
    layer: int
    candidates: list[int]
    score: dict[int, float] = field(default_factory=dict)  # the behaviour's score, candidate ablated
    kl: dict[int, float] = field(default_factory=dict)
    baseline: float = float("nan")  # the score without ablation
    steered: bool = False  # candidates tested by adding the mean difference, not by ablation
    prompts: dict[int, int] = field(default_factory=dict)  # how many prompts each candidate was scored on


def difference_of_means(harmful: np.ndarray, harmless: np.ndarray) -> LayerStats:
    """From residuals (n_prompts, n_layer, n_embd) of each set: per-layer directions and stats."""
    mh, ml = harmful.mean(axis=0, dtype=np.float64), harmless.mean(axis=0, dtype=np.float64)
    bad = np.flatnonzero(~(np.isfinite(mh).all(axis=1) & np.isfinite(ml).all(axis=1)))
    if bad.size:
        raise UserError(f"llama.cpp computed NaN or Inf in the residual stream after block(s) "
                        f"{', '.join(map(str, bad))} on these prompts: the model file is broken, or overflows")
    diff = mh - ml
    norm = np.linalg.norm(diff, axis=-1)
    directions = (diff / np.where(norm > 0, norm, 1)[:, None]).astype(np.float32)
    ph = np.einsum("pld,ld->pl", harmful, directions)
    pl = np.einsum("pld,ld->pl", harmless, directions)
    pooled = np.sqrt(0.5 * (ph.var(axis=0) + pl.var(axis=0))) + 1e-12
    return LayerStats(directions, ml.astype(np.float32), np.linalg.norm(mh, axis=-1),
                      np.linalg.norm(ml, axis=-1), norm,
                      (ph.mean(axis=0) - pl.mean(axis=0)) / pooled)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (n_layer, n_embd) arrays."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return np.sum(a.astype(np.float64) * b, axis=-1) / np.maximum(na * nb, 1e-30)


def split_half(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """(n_layer,): the cosine, per block, between the directions measured from the even and
    the odd prompts of each set (residuals (n_prompts, n_layer, n_embd)). Near 1: the prompts
    agree and more would not change the direction; much lower: too few prompts for it."""
    if min(len(positive), len(negative)) < 2:
        raise UserError("a split-half check needs at least two prompts in each set")
    first = difference_of_means(positive[0::2], negative[0::2]).directions
    second = difference_of_means(positive[1::2], negative[1::2]).directions
    return cosines(first, second)


def agreement(pos: np.ndarray, neg: np.ndarray, layers: Sequence[int]) -> float:
    """How well the prompts so far pin the direction down: the split-half cosine at each of
    `layers`, stepped up to the whole set's size (Spearman-Brown, 2r / (1 + r)), the median
    over the layers. NaN with fewer than two prompts a set."""
    if min(len(pos), len(neg)) < 2:
        return float("nan")
    layers = list(layers)
    r = split_half(pos[:, layers], neg[:, layers])
    return float(np.median(2 * r / (1 + np.abs(r))))


def candidate_layers(n_layer: int) -> list[int]:
    """Layers from a fifth of the depth up to (not into) the last 20%."""
    return list(range(max(1, n_layer // 5), max(2, int(n_layer * MAX_LAYER_FRACTION))))


def rungs(count: int, harmless: int, first: int = FIRST_RUNG) -> list[tuple[int, int]]:
    """(probes, harmless prompts) the elimination scores candidates on at each rung: `first`
    probes, doubling, ending at `count`, with harmless prompts in proportion, ending at
    `harmless` (one rung, everything on all prompts, when `count` is at most `first`)."""
    sizes = [count]
    while sizes[0] // 2 >= first:
        sizes.insert(0, sizes[0] // 2)
    return [(n, max(1, harmless * n // count)) for n in sizes[:-1]] + [(count, harmless)]


def survivors(alive: int) -> int:
    """Candidates a rung passes on: the better half, and never fewer than two finalists."""
    return min(alive, max(2, alive // 2))


def planned_prompts(n_candidates: int, count: int, harmless: int) -> int:
    """Prompts forwarded (probes and harmless) if no rung stops the elimination early."""
    total, have, alive = 0, (0, 0), n_candidates
    for n in rungs(count, harmless):
        total += alive * (n[0] - have[0] + n[1] - have[1])
        have, alive = n, survivors(alive)
    return total


class LayerScorer(Protocol):
    """A behaviour's score on each of probes lo:hi with a direction ablated (or None; lower
    means less of the behaviour), and the next-token log-probabilities of the prompts `also`
    under the same edit, in the same pass where the measure allows."""

    def __call__(self, r: np.ndarray | None, lo: int, hi: int,
                 also: Sequence[Prompt] = ()) -> tuple[np.ndarray, np.ndarray]: ...


def choose_layer(model: LlamaModel, stats: LayerStats, score: LayerScorer, count: int,
                 harmless: Sequence[str], candidates: list[int], max_kl: float = DEFAULT_MAX_KL,
                 progress: Callable[[int], None] = lambda n: None, steer_below: float | None = None,
                 steerable: Collection[int] | None = None, baseline: np.ndarray | None = None) -> LayerChoice:
    """Test candidates' directions and keep the one that moves the behaviour most within
    max_kl (the lower KL on a tie). The test is ablation (the direction projected out
    of the residual stream after every block; lowest `score` wins) unless the model shows the
    behaviour less than `steer_below` without it: then removal has nothing to remove, and the
    test is steering (the mean difference added after the candidate block, as a control vector;
    highest `score` wins). If no candidate stays within max_kl, the least disruptive one
    (lowest KL): moving the most there would mean picking the layer that breaks the model most.
    `baseline`: the unedited model's scores on the `count` probes, where a pass the caller makes
    anyway measured them.

    By elimination (successive halving): every candidate is scored on the first few of `count`
    probes and of the `harmless` prompts, the better half goes on to twice as many, and so on up to
    `count`; the elimination ends early once the leader is ahead of every other finalist by more
    than twice the standard error of their paired per-prompt difference. Scoring every candidate
    on every prompt took 2.7 times as long on Qwen2.5-Coder-1.5B and picked among the same close few
    (docs/directions.md, what it costs)."""
    opening = model.at_answer(harmless)  # never the first token of a thought
    base_harmless = np.zeros((0, model.n_vocab), np.float32)
    base_score = np.zeros(0) if baseline is None else np.asarray(baseline, np.float64)
    steered = False
    choice = LayerChoice(-1, candidates)
    if steer_below is not None:  # whether removal has anything to remove decides the test
        if baseline is None:
            base_score = score(None, 0, count)[0]
        steered = float(base_score.mean()) < steer_below
    if steered and steerable is not None:  # blocks a control vector reaches (nemotron_h: MLP blocks)
        candidates = choice.candidates = [c for c in candidates if c in steerable]
        if not candidates:
            raise UserError("no candidate block can be steered in this architecture; pass --layer N")
    choice.steered = steered
    sign = -1.0 if steered else 1.0
    scores: dict[int, np.ndarray] = {c: np.zeros(0) for c in candidates}
    kls: dict[int, np.ndarray] = {c: np.zeros(0) for c in candidates}

    def key(layer: int) -> tuple[float, ...]:
        return rank(scores[layer], kls[layer], sign, max_kl)

    alive, have, had = list(candidates), 0, 0  # probes and harmless prompts scored so far
    for n, g in rungs(count, len(harmless)):
        if len(base_score) >= n:
            base_more = model.next_token_logprobs(opening[had:g], share_prefix=True)
        else:
            more, base_more = score(None, len(base_score), n, opening[had:g])
            base_score = np.concatenate([base_score, more])
        base_harmless = np.concatenate([base_harmless, base_more])
        for layer in alive:
            r = stats.directions[layer]
            if steered:
                model.set_control_vector({layer: float(stats.diff_norm[layer]) * r})
                try:
                    new, edited = score(None, have, n, opening[had:g])
                finally:
                    model.set_control_vector(None)
            else:
                new, edited = score(r, have, n, opening[had:g])
            scores[layer] = np.concatenate([scores[layer], new])
            kls[layer] = np.concatenate([kls[layer], kl_per_prompt(base_harmless[had:g], edited)])
            progress(n - have + g - had)
        have, had = n, g
        alive.sort(key=key)
        if n == count or _clear_leader(alive, scores, kls, sign, max_kl):
            break
        alive = alive[: survivors(len(alive))]
    choice.baseline = float(base_score.mean())
    choice.layer = alive[0]
    choice.score = {c: float(scores[c].mean()) for c in candidates}
    choice.kl = {c: float(kls[c].mean()) for c in candidates}
    choice.prompts = {c: len(scores[c]) for c in candidates}
    return choice


def rank(score: np.ndarray, kl: np.ndarray, sign: float, max_kl: float) -> tuple[float, ...]:
    """A candidate's place in `choose_layer`'s order, from its per-prompt scores and KLs (lower
    first): within max_kl by the signed mean score, then the mean KL; beyond it after all
    of those, by KL alone."""
    mean_kl = float(kl.mean())
    return (0, sign * float(score.mean()), mean_kl) if mean_kl <= max_kl else (1, mean_kl)


def _clear_leader(ranked: list[int], scores: dict[int, np.ndarray], kls: dict[int, np.ndarray], sign: float,
                  max_kl: float) -> bool:
    """Whether more prompts would not change the pick: the leader's KL is within max_kl by two
    standard errors, and its paired per-prompt advantage over every other finalist is more than
    two standard errors."""
    lead = ranked[0]
    if len(ranked) == 1:
        return True
    if kls[lead].mean() + 2 * _se(kls[lead]) > max_kl:
        return False
    for other in ranked[1:]:
        gap = sign * (scores[other] - scores[lead])
        if gap.mean() <= 2 * _se(gap):
            return False
    return True


def _se(x: np.ndarray) -> float:
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("inf")
