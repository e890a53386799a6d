"""Find the direction to remove: difference of means per layer, and the layer that works best.

Per layer L (llama.cpp's `l_out-L`, the residual stream after block L, at the last prompt
token): mean activation over the pack's positive prompts (for refusal, harmful ones) minus the
mean over its negative ones (harmless), normalised.
`choose_layer` then ablates each candidate layer's direction from the whole residual stream
(inside llama.cpp, through the capture hook) and scores it on the validation prompts by the
behaviour pack's measure (for refusal, how much probability the first response token gives to
refusal openings, "I", "Sorry", ...; for other packs, the share of short greedy answers that
show the behaviour), and by the KL divergence of the first-token distribution on harmless
prompts.
The last 20% of layers are not candidates (they hold little of the direction and ablating
there damages the output most).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.first_token import kl_divergence
from gguf_abliterate.runtime.llama import Answer, AtAnswer, LlamaModel, Prompt
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET

MAX_LAYER_FRACTION = 0.8
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


def candidate_layers(n_layer: int) -> list[int]:
    """Layers from a fifth of the depth up to (not into) the last 20%."""
    return list(range(max(1, n_layer // 5), max(2, int(n_layer * MAX_LAYER_FRACTION))))


def choose_layer(model: LlamaModel, stats: LayerStats, score: Callable[[np.ndarray | None], float],
                 harmless: list[str], candidates: list[int], max_kl: float = DEFAULT_MAX_KL,
                 progress: Callable[[int], None] = lambda n: None, steer_below: float | None = None,
                 steerable: Collection[int] | None = None) -> LayerChoice:
    """Test each candidate's direction and keep the one that moves the behaviour most within
    max_kl (the lower KL on a tie). The test is ablation (the direction projected out
    of the residual stream after every block; lowest `score` wins) unless the model shows the
    behaviour less than `steer_below` without it: then removal has nothing to remove, and the
    test is steering (the mean difference added after the candidate block, as a control vector;
    highest `score` wins). If no candidate stays within max_kl, the least disruptive one
    (lowest KL): moving the most there would mean picking the layer that breaks the model most."""
    opening = model.at_answer(harmless)  # never the first token of a thought
    base_harmless = model.next_token_logprobs(opening, share_prefix=True)
    choice = LayerChoice(-1, candidates, baseline=score(None))
    choice.steered = steer_below is not None and choice.baseline < steer_below
    if choice.steered and steerable is not None:  # blocks a control vector reaches (nemotron_h: MLP blocks)
        candidates = choice.candidates = [c for c in candidates if c in steerable]
        if not candidates:
            raise UserError("no candidate block can be steered in this architecture; pass --layer N")
    for layer in candidates:
        r = stats.directions[layer]
        if choice.steered:
            model.set_control_vector({layer: float(stats.diff_norm[layer]) * r})
            try:
                choice.score[layer] = score(None)
                edited = model.next_token_logprobs(opening, share_prefix=True)
            finally:
                model.set_control_vector(None)
        else:
            choice.score[layer] = score(r)
            edited = model.next_token_logprobs(opening, ablate=r, share_prefix=True)
        choice.kl[layer] = kl_divergence(base_harmless, edited)
        progress(1)
    sign = -1.0 if choice.steered else 1.0
    within = [layer for layer in candidates if choice.kl[layer] <= max_kl]
    if within:
        choice.layer = min(within, key=lambda layer: (sign * choice.score[layer], choice.kl[layer]))
    else:
        choice.layer = min(candidates, key=lambda layer: choice.kl[layer])
    return choice
