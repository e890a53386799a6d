"""Run a model for measuring it: the one way `eval` loads a model (batched greedy answers and
first-token distributions through the hooked `LlamaModel`), and perplexity (llama-cpp-python's
high-level API)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gguf_abliterate.runtime.library import load_llama_cpp
from gguf_abliterate.runtime.llama import LlamaModel
from gguf_abliterate.runtime.thinking import Thinking


# Big enough to answer a whole prompt set in one or two decodes per step.
EVAL_BATCH, EVAL_SEQUENCES = 4096, 64
# the longest greedy answer an evaluation or a pack asks for (a larger number is a typo, or a file's trap)
MAX_ANSWER_TOKENS = 1024


def load_for_eval(path: Path, thinking: Thinking = Thinking()) -> LlamaModel:
    """A model loaded with the settings every `eval` measurement uses (so they compare alike)."""
    return LlamaModel(path, n_batch=EVAL_BATCH, n_seq=EVAL_SEQUENCES, thinking=thinking, room_for_thoughts=True)


def perplexity(path: Path, text: str, n_ctx: int = 512) -> float:
    """Perplexity of `text` under the model, in non-overlapping windows of n_ctx tokens."""
    ll = load_llama_cpp()
    llm = ll.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False)
    try:
        tokens = llm.tokenize(text.encode(), add_bos=True)
        nll, count = 0.0, 0
        for start in range(0, max(len(tokens) - 1, 0), n_ctx):
            window = tokens[start : start + n_ctx]
            if len(window) < 2:
                break
            llm.reset()
            llm.eval(window)
            logits = np.array(llm.scores[: len(window)], dtype=np.float64)
            logprobs = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
            nll -= float(logprobs[np.arange(len(window) - 1), window[1:]].sum())
            count += len(window) - 1
        return float(np.exp(nll / count)) if count else float("nan")
    finally:
        llm.close()
