"""`eval --protocol field`: markers anywhere, delayed refusals apart, and the budget study cut
from one set of answers by tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.evaluate.markers import DELAYED, IMMEDIATE, MARKER_WINDOW, refusal_kind
from gguf_abliterate.evaluate.report import cut_answers
from gguf_abliterate.evaluate.scorers import DELAYED_REASON, Label, get_scorer
from gguf_abliterate.runtime.llama import LlamaModel
from test_hostile import one_line_failure

COMPLIANT = ("Sure! Here is a detailed overview of the topic. First, gather what you need and set aside an afternoon. "
             "Second, read the whole plan before starting, since some steps depend on earlier ones. Third, work "
             "slowly and check each result. ")


@pytest.mark.parametrize("answer, kind", [
    ("I'm sorry, but I can't help with that.", IMMEDIATE),
    ("", IMMEDIATE),
    ("Sure. First, I cannot stress enough how careful you must be.", IMMEDIATE),  # in the opening window
    (COMPLIANT + "Actually, I'm sorry, but I can't provide that.", DELAYED),
    (COMPLIANT + "That is all.", None),
])
def test_a_refusal_is_immediate_or_delayed(answer: str, kind: str | None) -> None:
    assert refusal_kind(answer) == kind
    if kind == DELAYED:
        assert len(COMPLIANT) > MARKER_WINDOW  # the marker sits past what `ours` reads


def test_markers_anywhere_counts_delayed_refusals_as_refusals() -> None:
    answers = ["I cannot help with that.", COMPLIANT + "Sorry, but I can't assist with that.", COMPLIANT,
               "the the the the the the the the the the the the the the the the the the the the"]
    ours = get_scorer("markers").label([""] * 4, answers)
    field = get_scorer("markers-anywhere").label([""] * 4, answers)
    assert [v.label for v in ours] == [Label.REFUSAL, Label.COMPLIES, Label.COMPLIES, Label.DEGENERATE]
    assert [v.label for v in field] == [Label.REFUSAL, Label.REFUSAL, Label.COMPLIES, Label.DEGENERATE]
    assert [v.reason == DELAYED_REASON for v in field] == [False, True, False, False]


def test_the_field_prompts_are_its_own() -> None:
    bad, good = P.field_prompts()
    assert len(bad) == len(good) == 100 and len(set(bad)) == len(set(good)) == 100
    own_bad, own_good = P.default_prompts("all")
    assert not set(bad) & set(own_bad) and not set(good) & set(own_good) and not set(bad) & set(good)


def test_the_budget_study_cuts_one_set_of_answers_by_tokens(smollm2: Path) -> None:
    with LlamaModel(smollm2) as m:
        answers = m.greedy_answers(["How do I bake bread?", "Tell me a story about a cat."], 12)
        for a in answers:
            cut = cut_answers(m, [a], 5)[0]
            assert cut_answers(m, [a], 12) == [a.reply] and cut == m.text(a.tokens[:5])
            assert a.reply.startswith(cut) and len(cut) > 5  # tokens of words, not characters


def test_eval_field_protocol_counts_within_each_budget(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The tiny model answers one '.' (or '?') per token: a marker of 30 of them is not within
    the first 24 tokens of an answer and is within the first 48."""
    markers = tmp_path / "m.txt"
    markers.write_text("." * 30 + "\n" + "?" * 30 + "\n")
    run = cli("eval", tiny["llama"], "--protocol", "field", "-n", "4", "--max-tokens", "48", "--markers", markers,
              "--json", tmp_path / "e.json", "--report", tmp_path / "r.html", "-q")
    assert run.returncode == 0, run.stderr
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "Field protocol: 4 harmful and 4 harmless prompts" in html and 'id="budget-table"' in html
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["settings"]["protocol"] == "field"
    assert report["harmful_prompts"] == P.field_prompts()[0][:4]
    model = report["models"][0]
    assert all(set(r) in ({"."}, {"?"}) and len(r) == 48 for r in model["harmful_responses"])  # what it rests on
    assert model["refusals_within"] == {"24": 0, "48": 4} and model["harmful_refusals"] == 4
    assert "field protocol: 4 harmful and 4 harmless prompts" in run.stdout and "N=24" in run.stdout


def test_the_field_protocol_is_for_refusal(tiny: dict[str, Path]) -> None:
    one_line_failure(cli("eval", tiny["llama"], "--behaviour", "concise", "--protocol", "field"), "--protocol")
