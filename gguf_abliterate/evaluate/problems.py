"""Capability packs: generated problems with exact, checkable answers, for edits that aim to make
a model better at something.

Three families, written for this project (no benchmark copied or fetched; public benchmarks are
kept to judge this work independently):

- `arithmetic`: word problems of two or three steps on one quantity (bought, given away, doubled,
  shared out), each step in one of several wordings;
- `percent`: percentages, discounts, rates and units (minutes, grams, centimetres);
- `code`: what a short Python program with a loop, a branch or a list prints.

A problem belongs to one split, `direction`, `search` or `heldout`, by a hash of its text, so the
problems a direction is read from, those a search tunes on and those that judge the result never
share a question, whatever the seeds. A user's own problems come as JSONL, one
`{"question": ..., "answer": <integer>}` a line, and are split the same way.

An answer is right when the number after the last "Answer:" (else the last integer in the
answer) is the expected one.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.tasks import answer_value as last_integer
from gguf_abliterate.textfile import read_text

INSTRUCTION = ("Solve this problem without writing code. Show short working, one line per step, then give the "
               "final answer on the last line as: Answer: <number>")
SPLITS = {"direction": range(0, 4), "search": range(4, 6), "heldout": range(6, 10)}  # hash mod 10
NAMES = ("Mia", "Omar", "Lena", "Kofi", "Ana", "Ravi", "Ines", "Tom", "Yuki", "Sara")
ITEMS = ("marbles", "stickers", "apples", "coins", "stamps", "shells", "cards", "beads")


@dataclass(frozen=True)
class Problem:
    family: str
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        return f"{self.question}\n\n{INSTRUCTION}"

    @property
    def split(self) -> str:
        """Which split this problem's text falls in (its sha256, mod 10)."""
        bucket = int(hashlib.sha256(self.question.encode()).hexdigest(), 16) % 10
        return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def _arithmetic(r: random.Random) -> Problem:
    """A quantity through 2-3 steps; every intermediate value a whole, positive number."""
    name, item = r.choice(NAMES), r.choice(ITEMS)
    value = r.randint(5, 60)
    lines = [r.choice([f"{name} has {value} {item}.", f"{name} starts with {value} {item}.",
                       f"There are {value} {item} in {name}'s box."])]
    for _ in range(r.randint(2, 3)):
        op = r.choice(["add", "sub", "mul", "div"])
        if op == "div":
            k = next((k for k in r.sample([2, 3, 4, 5], 4) if value % k == 0 and value >= 2 * k), None)
            op = "div" if k else "add"
        if op == "add":
            k = r.randint(3, 40)
            value += k
            lines.append(r.choice([f"Then {name} buys {k} more.", f"A friend gives {name} {k} {item}.",
                                   f"{name} finds {k} more {item}."]))
        elif op == "sub" and value > 3:
            k = r.randint(1, value - 1)
            value -= k
            lines.append(r.choice([f"Then {name} gives away {k} of them.", f"{name} loses {k} {item}.",
                                   f"{name} sells {k} {item} at the market."]))
        elif op == "mul" and value <= 200:
            k = r.choice([2, 3])
            value *= k
            word = {2: "doubles", 3: "triples"}[k]
            lines.append(r.choice([f"Then the number of {item} {word}.", f"Then {name}'s {item} {word}."]))
        elif op == "div" and k:
            value //= k
            lines.append(r.choice([f"{name} splits the {item} equally into {k} bags and keeps one bag.",
                                   f"{name} shares them equally with {k - 1} "
                                   f"{'friend' if k == 2 else 'friends'}, keeping one share."]))
        else:
            k = r.randint(3, 20)
            value += k
            lines.append(f"Then {name} wins {k} {item}.")
    lines.append(r.choice([f"How many {item} does {name} have now?", f"How many {item} does {name} end up with?"]))
    return Problem("arithmetic", " ".join(lines), value)


def _percent(r: random.Random) -> Problem:
    """Percentages, discounts, rates and units, with whole answers."""
    form = r.randrange(6)
    name = r.choice(NAMES)
    if form == 0:
        p, n = r.choice([10, 20, 25, 50, 75]), r.randint(2, 20) * 20
        return Problem("percent", f"A school has {n} students. {p}% of them walk to school. How many students "
                       f"do not walk to school?", n - n * p // 100)
    if form == 1:
        price, off = r.randint(2, 30) * 20, r.choice([10, 15, 20, 25, 30, 40, 50])
        return Problem("percent", f"A jacket costs {price} dollars. It is sold at {off}% off. What is the sale "
                       f"price in dollars?", price - price * off // 100)
    if form == 2:
        h, m, k = r.randint(1, 3), r.choice([5, 10, 15, 20, 30, 45]), r.randint(2, 4)
        return Problem("percent", f"A film lasts {h} hours and {m} minutes. {name} watches it {k} times. How "
                       f"many minutes does {name} spend watching?", (60 * h + m) * k)
    if form == 3:
        grams, cakes = r.choice([125, 200, 250, 400, 500]), r.randint(2, 6)
        kg = -(-grams * cakes // 1000) + r.randint(0, 2)  # enough flour
        return Problem("percent", f"One cake needs {grams} grams of flour. {name} has {kg} kilograms of flour "
                       f"and bakes {cakes} cakes. How many grams of flour are left?", kg * 1000 - grams * cakes)
    if form == 4:
        speed, minutes = r.choice([6, 8, 10, 12, 14, 20]), r.choice([30, 60, 90, 120, 150])
        return Problem("percent", f"A cyclist rides at {speed} km per hour for {minutes} minutes. How many km "
                       f"does the cyclist ride?", speed * minutes // 60)
    base, up = r.randint(10, 25) * 20, r.choice([10, 20, 25, 50])
    cm = r.randint(2, 9)
    return Problem("percent", f"A plank is {base} cm long. It is made {up}% longer, then {cm * 10} cm is cut "
                   f"off. How long is it now, in cm?", base + base * up // 100 - cm * 10)


def _code(r: random.Random) -> Problem:
    """What a short program with a loop, a branch or a list prints (the answer found by running it)."""
    form = r.randrange(5)
    if form == 0:
        a, b, n = r.randint(1, 9), r.randint(1, 5), r.randint(3, 6)
        code = f"x = {a}\nfor i in range({n}):\n    if i % 2 == 0:\n        x += {b}\n    else:\n        x *= 2\nprint(x)"
    elif form == 1:
        values = [r.randint(-9, 20) for _ in range(r.randint(5, 8))]
        t = r.randint(0, 10)
        code = f"values = {values}\ntotal = 0\nfor v in values:\n    if v > {t}:\n        total += v\nprint(total)"
    elif form == 2:
        n, k = r.randint(4, 9), r.randint(2, 4)
        code = f"count = 0\nfor i in range(1, {n * k + 1}):\n    if i % {k} == 0:\n        count += i\nprint(count)"
    elif form == 3:
        values = [r.randint(1, 9) for _ in range(r.randint(4, 7))]
        code = f"values = {values}\nvalues.sort()\nprint(values[-1] * values[0] + len(values))"
    else:
        a, b, n = r.randint(1, 5), r.randint(1, 5), r.randint(3, 6)
        code = f"a, b = {a}, {b}\nfor _ in range({n}):\n    a, b = b, a + b\nprint(a)"
    return Problem("code", f"What does this Python program print?\n\n```python\n{code}\n```", _run(code))


def _run(code: str) -> int:
    """The integer a generated program prints."""
    printed: list[object] = []
    exec(code, {"print": printed.append})  # our own generated text, never user input
    return int(printed[-1])  # type: ignore[call-overload]


FAMILIES: dict[str, Callable[[random.Random], Problem]] = {
    "arithmetic": _arithmetic, "percent": _percent, "code": _code}


def generate(family: str, split: str, count: int, seed: int = 0) -> list[Problem]:
    """`count` distinct problems of `family` in `split`, the same for the same seed."""
    if family not in FAMILIES:
        raise UserError(f"no problem family {family!r}: the families are {', '.join(FAMILIES)}")
    if split not in SPLITS:
        raise UserError(f"no split {split!r}: the splits are {', '.join(SPLITS)}")
    return _take(_stream(FAMILIES[family], seed), split, count, f"family {family}")


def _stream(make: Callable[[random.Random], Problem], seed: int) -> Iterator[Problem]:
    r = random.Random(f"{make.__name__}:{seed}")
    while True:
        yield make(r)


def _take(problems: Iterator[Problem], split: str, count: int, what: str) -> list[Problem]:
    out: dict[str, Problem] = {}
    misses = 0
    for p in problems:
        if p.split != split or p.question in out:
            misses += 1
            if misses > 50 * count + 1000:
                break
            continue
        out[p.question] = p
        if len(out) == count:
            break
    if len(out) < count:
        raise UserError(f"{what} has only {len(out)} distinct problems in the {split} split, {count} asked")
    return list(out.values())


def load_problems(path: Path, split: str, count: int | None = None) -> list[Problem]:
    """A user's problems (JSONL: question, integer answer), those of `split`, in file order."""
    problems = []
    for n, line in enumerate(read_text(path, "problem file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, answer = row["question"], row["answer"]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: a problem is a JSON object with a question and an answer") from None
        if not isinstance(question, str) or not question.strip() or isinstance(answer, bool) \
                or not isinstance(answer, int):
            raise UserError(f"{path}:{n}: the question must be text and the answer an integer")
        problems.append(Problem(path.stem, question.strip(), answer))
    if not problems:
        raise UserError(f"{path}: no problems in the file")
    chosen = [p for p in problems if p.split == split][:count]
    if not chosen:
        raise UserError(f"{path}: none of its {len(problems)} problems falls in the {split} split")
    return chosen


def problems_for(name: str, split: str, count: int, seed: int = 0) -> list[Problem]:
    """A family's problems, or a JSONL file's (`name` ending .jsonl)."""
    if name.endswith(".jsonl"):
        return load_problems(Path(name), split, count)
    return generate(name, split, count, seed)


ANSWER_LINE = re.compile(r"answer\s*[:=]\s*\**\s*\$?(-?\d[\d,]*)", re.IGNORECASE)


def answer_value(text: str) -> int | None:
    """The number after the last "Answer:", else the last integer in the text (as the tasks read
    it), or None."""
    found = ANSWER_LINE.findall(text)
    return int(found[-1].replace(",", "")) if found else last_integer(text)


def is_right(problem: Problem, text: str) -> bool:
    return answer_value(text) == problem.answer
