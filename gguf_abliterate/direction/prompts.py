"""Prompt sets: the project's own defaults (package data) and user files.

The defaults are 144 clearly harmful requests over many categories and 144 harmless
requests of similar length and form, written for this project (public jailbreak benchmarks
are kept out, for independent evaluation). Each set is split the same way: even lines are
for computing the direction, odd lines for validating it.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files
from pathlib import Path

from gguf_abliterate.errors import UserError
from gguf_abliterate.textfile import read_json, read_jsonl, read_text

SPLITS = ("direction", "validation", "all")


def _default(name: str) -> list[str]:
    text = files("gguf_abliterate").joinpath("data", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def split(prompts: list[str], part: str) -> list[str]:
    """The direction (even lines) or validation (odd lines) part of a prompt list, or all."""
    if part not in SPLITS:
        raise ValueError(part)
    return prompts if part == "all" else prompts[0 if part == "direction" else 1 :: 2]


def default_prompts(part: str = "all") -> tuple[list[str], list[str]]:
    """(harmful, harmless) from the package's own sets."""
    return split(_default("harmful"), part), split(_default("harmless"), part)


def field_prompts() -> tuple[list[str], list[str]]:
    """(harmful, harmless): 100 of each, written for `eval --protocol field` alone (no direction,
    search or test prompt is among them)."""
    return _default("field_harmful"), _default("field_harmless")


def load_entries(path: str | Path, fields: tuple[str, ...] = ()) -> list[dict[str, object]]:
    """Each entry of a prompt file as {"prompt": text, **fields it has}: one prompt per line
    (.txt), or JSON / JSON Lines of strings or objects with a `prompt` field."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".json":
        items = read_json(path, "prompt file")
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON list of prompts")
    elif suffix == ".jsonl":
        items = read_jsonl(path, "prompt file")
    else:
        items = read_text(path, "prompt file").splitlines()
    entries = []
    for n, item in enumerate(items, 1):
        extra = {k: item[k] for k in fields if k in item} if isinstance(item, dict) else {}
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise UserError(f"{path}: entry {n} is not a prompt string (or an object with a 'prompt' field)")
        if item.strip():
            entries.append({"prompt": item.strip(), **extra})
    if not entries:
        raise UserError(f"{path}: no prompts in the file")
    return entries


def load_prompts(path: str | Path) -> list[str]:
    """One prompt per line (.txt), or JSON / JSON Lines: strings or objects with a `prompt` field."""
    return [str(e["prompt"]) for e in load_entries(path)]


def prompt_hash(prompts: list[str]) -> str:
    """sha256 of the prompts, one per line: records which set a direction came from."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()
