"""An interrupted `direction --capability` resumes where it stopped: answering hundreds of problems
takes most of an hour on a small model on 2 cores, more on a larger one. Each batch of the model's
answers is appended to a log in the cache as soon as it is generated, under a key of what the
answers depend on (the model's bytes, the prompts, the token budget); a run that finds the log
takes the answers in it and generates only the rest. The run removes the log once it ends with
a direction written, or with an error about the answers themselves; an interruption keeps it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from gguf_abliterate import pip_models
from gguf_abliterate.runtime.llama import Answer


def answers_dir() -> Path:
    """`$GGUF_ABLITERATE_ANSWERS`, else `answers/` in the model cache."""
    return pip_models.cache_subdir("GGUF_ABLITERATE_ANSWERS", "answers")


class AnswerLog:
    """Greedy answers of a model that does not think, by prompt, appended as they come."""

    def __init__(self, model_digest: str, prompts: Sequence[str], budget: int):
        key = hashlib.sha256(json.dumps([model_digest, list(prompts), budget]).encode()).hexdigest()
        self.path = answers_dir() / f"{key[:32]}.jsonl"

    def load(self) -> dict[str, Answer]:
        """The answers logged so far (a last line cut by an interruption is not one)."""
        kept: dict[str, Answer] = {}
        if not self.path.is_file():
            return kept
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                kept[row["prompt"]] = Answer(row["text"], row["tokens"], row["finished"], final=row["text"])
            except (ValueError, KeyError, TypeError):
                continue
        return kept

    def add(self, prompts: Sequence[str], answers: Sequence[Answer]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as f:
            if f.tell():  # a line the stop cut: end it
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            for p, a in zip(prompts, answers):
                row = {"prompt": p, "text": a.text, "tokens": a.tokens, "finished": a.finished}
                f.write((json.dumps(row) + "\n").encode())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
