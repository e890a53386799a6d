"""Text and JSON from files the user did not write (packs, prompt files, answers to judge, Ollama
manifests, the JSON a downloaded GGUF or direction file carries in its metadata).

One place turns every way such text can be malformed into one line of error: bytes that are
not UTF-8 become U+FFFD (as a text editor shows them), and JSON is refused when it is invalid,
nested deeper than any of our formats needs (100,000 brackets exhaust Python's parser and
later its printer), uses NaN or Infinity (not JSON), or escapes a lone surrogate (`"\\ud800"`
decodes to a string that cannot be printed or written as UTF-8).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf_abliterate.errors import UserError

MAX_DEPTH = 32  # our deepest format (a pack's probe with its answer) needs 3
# control characters but tab and newline, DEL and the C1 controls: shown as escapes when printed
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)}


def printable(text: str) -> str:
    """`text` safe for a terminal: a control character (an escape sequence in a model's name or
    answer, a file name) is shown as `\\x1b` rather than obeyed, and a lone surrogate as `\\ud800`
    rather than failing the print."""
    return text.translate(_CONTROLS).encode("utf-8", "backslashreplace").decode("utf-8")


def read_text(path: Path, what: str = "file") -> str:
    """A text file, undecodable bytes replaced."""
    if not path.is_file():
        raise UserError(f"{path}: no such {what}")
    return path.read_bytes().decode("utf-8", errors="replace")


def parse_json(text: str, where: str) -> Any:
    """JSON text as Python values, checked as above; `where` starts every error."""
    try:
        value = json.loads(text, parse_constant=_constant)
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: invalid JSON ({e})") from None
    except ValueError as e:  # _constant
        raise UserError(f"{where}: {e}") from None
    _check(value, where)
    return value


def read_json(path: Path, what: str = "JSON file") -> Any:
    return parse_json(read_text(path, what), str(path))


def read_jsonl(path: Path, what: str = "JSON Lines file") -> list[Any]:
    """One JSON value per non-empty line."""
    return [parse_json(line, f"{path}: line {n}") for n, line in enumerate(read_text(path, what).splitlines(), 1)
            if line.strip()]


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _check(value: Any, where: str) -> None:
    """Depth and strings, walked without recursion (the value may be deep)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_DEPTH:
                raise UserError(f"{where}: JSON nested too deeply (more than {MAX_DEPTH} levels)")
            items = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend((item, depth + 1) for item in items)
        elif isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"{where}: a string escapes a lone surrogate ({v[:40]!r}), which is not text") from None
