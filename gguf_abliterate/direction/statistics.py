"""Measure a model's writer-input statistics in llama.cpp (for `gptq` rounding; the file
format is `formats.statistics_file`).

The runtime's hook sums, per block, the second moments of what the attention output and the
dense MLP's down projection read, in diagonal blocks (`rounding.column_block`), while the model
runs chat prompts. `direction` keeps those of its own passes; `measure_and_store` is the one
fixed measurement an edit makes when asked for `gptq` rounding without statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.formats.statistics_file import (
    MEASURED,
    PROMPTS,
    StoredMoments,
    encode_statistics,
    moments_dir,
    write_statistics,
)
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.gguf_io.model import model_digest
from gguf_abliterate.quants import rounding

if TYPE_CHECKING:  # llama-cpp-python is optional: the runtime is imported only when it runs
    from gguf_abliterate.runtime.llama import InputMoments, LlamaModel


def measure_moments(m: LlamaModel, per_kind: int = PROMPTS,
                    progress: Callable[[int], None] = lambda n: None) -> InputMoments:
    """The writers' input moments of a loaded model on `per_kind` harmless and harmful
    direction prompts, eight prompts a pass."""
    bad, good = P.default_prompts("direction")
    prompts = good[:per_kind] + bad[:per_kind]
    with m.input_moments(rounding.column_block) as moments:
        for i in range(0, len(prompts), 8):
            m.next_token_logprobs(prompts[i : i + 8])
            progress(len(prompts[i : i + 8]))
    return moments


def measure_and_store(model: Model, progress: Callable[[int], None] = lambda n: None) -> StoredMoments:
    """Run the model on `PROMPTS` prompts of each kind and cache the moments. Needs
    llama-cpp-python (a clear error otherwise)."""
    from gguf_abliterate.runtime.llama import LlamaModel

    with LlamaModel(model.path) as m:
        moments = measure_moments(m, PROMPTS, progress)
    stored = encode_statistics(model, moments.means(), moments.tokens, MEASURED)
    path = moments_dir() / f"{model_digest(model)}.safetensors"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_statistics(path, stored)
    except OSError:  # no cache: the moments still serve this run
        return stored


