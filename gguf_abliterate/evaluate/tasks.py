"""Capability tasks with exact answers, generated from a seed: no download, no benchmark copied.

Two kinds, alternating: arithmetic word problems (change from a purchase, pages read, boxes
needed, distance travelled) and what-does-this-code-print questions (a loop, a filtered sum, a
string count, a small recursion). Each asks for the number only; an answer is right when the
last integer in it is the expected one (a worked answer ends with its result).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from gguf_abliterate.errors import UserError

INSTRUCTION = "Answer with the number only."
NAMES = ("Mia", "Omar", "Lena", "Kofi", "Ana", "Ravi", "Ines", "Tom")
ITEMS = ("pencils", "apples", "stamps", "candles", "tickets", "notebooks")


@dataclass(frozen=True)
class Task:
    kind: str  # "arithmetic" or "code"
    question: str
    answer: int

    @property
    def prompt(self) -> str:
        return f"{INSTRUCTION}\n\n{self.question}"


def _arithmetic(r: random.Random) -> Task:
    name = r.choice(NAMES)
    form = r.randrange(4)
    if form == 0:
        price, count = r.randint(2, 9), r.randint(2, 9)
        note = r.choice([50, 100]) if price * count < 50 else 100
        return Task("arithmetic", f"A shop sells {r.choice(ITEMS)} at {price} coins each. {name} buys {count} of "
                    f"them and pays with a {note}-coin note. How much change, in coins, does {name} get?",
                    note - price * count)
    if form == 1:
        first, daily, days = r.randint(5, 40), r.randint(3, 25), r.randint(2, 6)
        return Task("arithmetic", f"{name} reads {first} pages on Monday and {daily} pages on each of the next "
                    f"{days} days. How many pages has {name} read in total?", first + daily * days)
    if form == 2:
        size, eggs = r.randint(4, 12), r.randint(20, 150)
        return Task("arithmetic", f"A box holds {size} eggs. How many boxes are needed to pack {eggs} eggs?",
                    math.ceil(eggs / size))
    v, h, w, g = r.randint(40, 120), r.randint(1, 4), r.randint(30, 90), r.randint(1, 3)
    return Task("arithmetic", f"A train travels at {v} km per hour for {h} hours, then at {w} km per hour for {g} "
                f"hours. How many km does it travel in all?", v * h + w * g)


def _code(r: random.Random) -> Task:
    form = r.randrange(4)
    if form == 0:
        x, n, b = r.randint(1, 9), r.randint(2, 5), r.randint(1, 5)
        value = x
        for _ in range(n):
            value = value * 2 - b
        code = f"x = {x}\nfor i in range({n}):\n    x = x * 2 - {b}\nprint(x)"
    elif form == 1:
        values = [r.randint(1, 30) for _ in range(6)]
        m = r.randint(2, 4)
        rest = r.randrange(m)
        value = sum(v for v in values if v % m == rest)
        code = f"values = {values}\nprint(sum(v for v in values if v % {m} == {rest}))"
    elif form == 2:
        word = "".join(r.choice("abcde") for _ in range(r.randint(5, 9)))
        k, c = r.randint(2, 5), r.choice("abc")
        value = len(word) * k + word.count(c)
        code = f"s = '{word}'\nprint(len(s) * {k} + s.count('{c}'))"
    else:
        n = r.randint(5, 12)
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        value = a
        code = f"def f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)\n\nprint(f({n}))"
    return Task("code", f"What does this Python program print?\n\n```python\n{code}\n```", value)


def generate_tasks(count: int, seed: int = 0) -> list[Task]:
    """`count` tasks, arithmetic and code alternating, the same for the same seed."""
    if count < 1:
        raise UserError("the task set is empty: ask for at least one task")
    r = random.Random(seed)
    return [_arithmetic(r) if i % 2 == 0 else _code(r) for i in range(count)]


def answer_value(text: str) -> int | None:
    """The last integer in an answer (thousands separators allowed), or None."""
    found = re.findall(r"-?\d[\d,]*", text)
    return int(found[-1].replace(",", "")) if found else None


def is_correct(task: Task, text: str) -> bool:
    return answer_value(text) == task.answer
