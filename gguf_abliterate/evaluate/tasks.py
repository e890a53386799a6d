"""Capability tasks with exact answers, generated from a seed: no download, no benchmark copied.

Two kinds, alternating: arithmetic word problems and what-does-this-code-print questions, half
of them one step (a sum, a product, a difference, a share; an expression, max or min, a length,
a counting loop) and half two or more (change from a purchase, pages read, boxes needed,
distance travelled; a loop, a filtered sum, a string count, a small recursion). Each asks for
the number only, so a model must do it in its head: small models get the one-step half and
miss most of the rest, which leaves room to see an edit cost capability either way (with only
the multi-step forms, Qwen2.5-Coder-0.5B scored 2%). An answer is right when the last integer
in it is the expected one (a worked answer ends with its result).
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
    name, items = r.choice(NAMES), r.choice(ITEMS)
    form = r.randrange(8)
    if form == 4:
        a, b = r.randint(12, 89), r.randint(12, 89)
        return Task("arithmetic", f"{name} has {a} {items} and gets {b} more. How many {items} does {name} have "
                    f"now?", a + b)
    if form == 5:
        price, count = r.randint(2, 9), r.randint(2, 9)
        return Task("arithmetic", f"A shop sells {items} at {price} coins each. {name} buys {count} of them. How "
                    f"many coins does {name} pay?", price * count)
    if form == 6:
        a, b = r.randint(40, 99), r.randint(5, 39)
        return Task("arithmetic", f"{name} had {a} {items} and gave {b} of them away. How many {items} does "
                    f"{name} have left?", a - b)
    if form == 7:
        friends, each = r.randint(2, 9), r.randint(2, 12)
        return Task("arithmetic", f"{friends * each} {items} are shared equally among {friends} friends. How many "
                    f"{items} does each friend get?", each)
    if form == 0:
        price, count = r.randint(2, 9), r.randint(2, 9)
        note = r.choice([50, 100]) if price * count < 50 else 100
        return Task("arithmetic", f"A shop sells {items} at {price} coins each. {name} buys {count} of "
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
    form = r.randrange(8)
    if form == 4:
        x, y, k = r.randint(1, 20), r.randint(1, 9), r.randint(2, 5)
        value = x + y * k
        code = f"x = {x}\ny = {y}\nprint(x + y * {k})"
    elif form == 5:
        values = [r.randint(1, 99) for _ in range(r.randint(4, 7))]
        which = r.choice(["max", "min"])
        value = max(values) if which == "max" else min(values)
        code = f"values = {values}\nprint({which}(values))"
    elif form == 6:
        values = [r.randint(1, 9) for _ in range(r.randint(3, 8))]
        value = len(values)
        code = f"items = {values}\nprint(len(items))"
    elif form == 7:
        n, k = r.randint(2, 6), r.randint(2, 9)
        value = n * k
        code = f"total = 0\nfor i in range({n}):\n    total += {k}\nprint(total)"
    elif form == 0:
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
