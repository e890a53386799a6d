"""`judge`: label answers from anywhere (a JSONL of prompts and answers) with a local judge."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import click

from gguf_abliterate.cli.common import Command, InputPath, OutputPath, echo, user_errors
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io.atomic import claim_outputs, write_text
from gguf_abliterate.textfile import read_json, read_jsonl


def read_answers(path: Path) -> list[dict[str, str]]:
    """JSON Lines (or a JSON list) of objects with `prompt` and `answer` strings."""
    items: Any = read_json(path, "file") if path.suffix.lower() == ".json" else read_jsonl(path, "file")
    if not isinstance(items, list):
        raise UserError(f"{path}: expected JSON Lines of objects with 'prompt' and 'answer'")
    for n, item in enumerate(items, 1):
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), str) and isinstance(item.get("answer"), str)):
            raise UserError(f"{path}: entry {n} is not an object with string 'prompt' and 'answer' fields")
    if not items:
        raise UserError(f"{path}: no answers in the file")
    return items


def judge_file(answers_path: Path, judge: Path, json_path: Path | None = None,
               force: bool = False) -> list[dict[str, Any]]:
    from gguf_abliterate.evaluate.judge import Judge

    claim_outputs([json_path] if json_path else [], [answers_path, judge], force)
    items = read_answers(answers_path)
    with Judge(judge) as j:
        verdicts = j.label([i["prompt"] for i in items], [i["answer"] for i in items])
    out = [{"prompt": i["prompt"], "answer": i["answer"], "label": v.label.value, "probabilities": v.probabilities}
           for i, v in zip(items, verdicts)]
    counts = Counter(o["label"] for o in out)
    echo(f"{len(out)} answers judged by {judge.name}: " + ", ".join(f"{k} {n}" for k, n in counts.most_common()))
    if json_path is not None:
        write_text(json_path, json.dumps(out, indent=1))
    return out


@click.command("judge", cls=Command)
@click.argument("answers", type=InputPath())
@click.option("--judge", "judge_path", required=True, type=InputPath(), help="A local instruct GGUF to judge with.")
@click.option("--json", "json_path", type=OutputPath(),
              help="Write every answer with its label and each label's probability here.")
@click.option("--force", is_flag=True, help="Replace the --json file if it exists.")
@user_errors
def command(answers: Path, judge_path: Path, json_path: Path | None, force: bool) -> None:
    """Label each answer in ANSWERS (JSON Lines: {"prompt": ..., "answer": ...} per line) as
    refusal, complies, partial, evades or degenerate, by the judge model's next-token
    probabilities over those words (one forward pass per answer, no sampling)."""
    judge_file(answers, judge_path, json_path, force)
