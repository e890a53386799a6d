"""Where a job's time goes: seconds and tokens forwarded per stage.

A job wraps each stage that runs the model in `Stages.stage(name)`; the command line prints
the tally at the end, and `tools/bench_direction.py` sets it beside a plain llama.cpp forward
of as many tokens (the floor for any method that must read the model that much).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from gguf_abliterate.runtime.llama import LlamaModel


@dataclass(frozen=True)
class Stage:
    name: str
    seconds: float
    tokens: int  # tokens llama.cpp decoded in the stage


@dataclass
class Stages:
    """Stages of one job, timed, with the tokens every model of the process decoded meanwhile
    (a search's bake checks load models of their own)."""

    done: list[Stage] = field(default_factory=list)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0, k0 = time.perf_counter(), LlamaModel.decoded
        try:
            yield
        finally:
            self.done.append(Stage(name, time.perf_counter() - t0, LlamaModel.decoded - k0))

    def describe(self) -> str:
        """One line: each stage's seconds and tokens."""
        parts = ", ".join(f"{s.name} {s.seconds:.0f} s ({s.tokens:,} tokens)" for s in self.done)
        return f"time: {parts}"
