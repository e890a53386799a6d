"""First-token measures shared by the layer choice, `eval` and (later) the optimiser.

- refusal mass: the probability the first response token gives to typical refusal openings
  ("I", "Sorry", ...), a cheap stand-in for generating and reading the answer;
- KL(base || other) of the next-token distribution, over the full vocabulary;
- the steps a KL along a long answer (a thought and what follows) is read at.
"""

from __future__ import annotations

import numpy as np

from gguf_abliterate.runtime.llama import LlamaModel

REFUSAL_OPENINGS = ("I", "I'm", "I cannot", "I can't", "Sorry", "I apologize", "As an", "Unfortunately",
                    "No", "It is not", "Cannot")


def refusal_token_ids(model: LlamaModel) -> list[int]:
    """First tokens of typical refusal openings, with and without a leading space."""
    ids = set()
    for text in REFUSAL_OPENINGS:
        for variant in (text, " " + text):
            toks = model.tokenize(variant)
            toks = [t for t in toks if model.ll.llama_vocab_bos(model.vocab) != t]
            if toks:
                ids.add(toks[0])
    return sorted(ids)


def refusal_masses(logprobs: np.ndarray, ids: list[int]) -> np.ndarray:
    """Per prompt, the probability the first response token gives to refusal openings."""
    return np.exp(logprobs[:, ids]).sum(axis=1)


def refusal_mass(logprobs: np.ndarray, ids: list[int]) -> float:
    """Mean probability the first response token gives to refusal openings."""
    return float(refusal_masses(logprobs, ids).mean())


def kl_per_prompt(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """Per prompt, KL(base || other) from log-probabilities over the full vocabulary."""
    p = np.exp(base.astype(np.float64))
    return np.sum(p * (base - other), axis=1)


def kl_divergence(base: np.ndarray, other: np.ndarray) -> float:
    """Mean KL(base || other) over prompts."""
    return float(np.mean(kl_per_prompt(base, other)))


# a KL along a thought reads this many of its steps: llama.cpp keeps a vocabulary-wide row of
# logits per step read, and a 500-token thought over Qwen's 152k-token vocabulary would be
# 300 MB per prompt, held for every prompt of the base
KL_STEPS = 24


def spaced_steps(n: int, most: int = KL_STEPS) -> list[int]:
    """Up to `most` steps of an n-step continuation (n >= 1), evenly spaced, the first and last among them."""
    if n <= most:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, most)})


def kl_steps(continuations: list[list[int]]) -> list[list[int]]:
    """The steps a KL along each continuation reads (an empty one still has its first step)."""
    return [spaced_steps(max(1, len(c))) for c in continuations]
