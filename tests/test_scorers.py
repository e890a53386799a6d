"""Scorers, degenerate-output detection and the generated capability tasks, on crafted text."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.degenerate import degenerate_reason
from gguf_abliterate.evaluate.scorers import SCORERS, Label, get_scorer
from gguf_abliterate.evaluate.tasks import answer_value, generate_tasks, is_correct

LOOPS = {
    "sentence": "Here is how. First you take the jar. Here is how. Then you wait. Here is how. Here is how.",
    "ngrams": " ".join(["the step is to mix the powder and"] * 6),
    "filler": "Sure! Here it is: " + "=" * 40,
    "word": "Okay okay okay okay okay okay okay okay okay, so",
    "diversity": "ab" * 60,
}
FINE = {
    "prose": "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen. It happens in the "
             "chloroplasts of leaves, where chlorophyll absorbs mostly red and blue light.",
    "code": "```python\ndef add(a, b):\n    return a + b\n\nprint(add(2, 3))\n```\nThis prints 5.",
    "list": "1. Preheat the oven.\n2. Mix the flour and sugar.\n3. Add the eggs.\n4. Bake for 20 minutes.",
    "short": "42",
}


@pytest.mark.parametrize("case", sorted(LOOPS))
def test_degenerate_loops_are_caught(case: str) -> None:
    assert degenerate_reason(LOOPS[case]) is not None


@pytest.mark.parametrize("case", sorted(FINE))
def test_ordinary_answers_are_not_degenerate(case: str) -> None:
    assert degenerate_reason(FINE[case]) is None


def test_markers_scorer_labels() -> None:
    scorer = get_scorer("markers")
    answers = ["I'm sorry, but I can't help with that.", "", LOOPS["ngrams"], FINE["prose"],
               "I can't. I can't. I can't. I can't."]
    labels = [v.label for v in scorer.label(["q"] * len(answers), answers)]
    # a refusal that loops is still a refusal: refusal counts stay what markers always gave
    assert labels == [Label.REFUSAL, Label.REFUSAL, Label.DEGENERATE, Label.COMPLIES, Label.REFUSAL]
    assert "markers" in SCORERS
    with pytest.raises(UserError, match="unknown scorer 'oracle'"):
        get_scorer("oracle")


def test_tasks_are_deterministic_and_right() -> None:
    tasks = generate_tasks(40, seed=5)
    assert tasks == generate_tasks(40, seed=5) and tasks != generate_tasks(40, seed=6)
    assert {t.kind for t in tasks[::2]} == {"arithmetic"} and {t.kind for t in tasks[1::2]} == {"code"}
    for t in tasks:
        assert t.prompt.startswith("Answer with the number only.")
        assert _solve(t.question) == t.answer, t.question


def _solve(question: str) -> int:
    """The answer, computed another way: code is run; word problems are read for their numbers."""
    code = re.search(r"```python\n(.*)\n```", question, re.S)
    if code:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code.group(1), {})  # the generator's own program, nothing else
        return int(out.getvalue())
    n = [int(x) for x in re.findall(r"\d+", question)]
    if "change" in question:
        return n[2] - n[0] * n[1]
    if "pages" in question:
        return n[0] + n[1] * n[2]
    if "boxes" in question:
        return -(-n[1] // n[0])
    return n[0] * n[1] + n[2] * n[3]


def test_answer_extraction() -> None:
    task = generate_tasks(1, seed=1)[0]
    assert answer_value("The answer is 1,250.") == 1250 and answer_value("-3") == -3 and answer_value("none") is None
    assert is_correct(task, f"{task.answer}") and is_correct(task, f"First 3 + 4, so: {task.answer}")
    assert not is_correct(task, f"{task.answer} and then 7")
    with pytest.raises(UserError, match="task set is empty"):
        generate_tasks(0)
