"""tools/bench_capability.py's own parts: held-out problems evaluated in slices that a stopped run
resumes, and the tables pooled over them. The evaluation here is a stand-in script that marks
answers right by a rule on the answer, so the pooled counts can be checked against the rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from gguf_abliterate.evaluate.capability import Paired
from gguf_abliterate.evaluate.problems import problems_for
from tools.bench_capability import chunks, pooled

RULES = {"original": "a % 2 == 0", "edit": "a % 3 != 0", "control": "a % 5 != 0", "edit2": "a % 4 != 1"}
FINISHED = {"original": "a % 7 != 0", "edit": "True", "control": "a % 11 != 0", "edit2": "True"}
MODELS = [Path("original"), Path("edit"), Path("control")]
STAND_IN = f"""
import json, os, sys
args, names, rest = {{}}, [], sys.argv[1:]
while rest:
    if rest[0] in ("--capability", "--problems", "--json", "--max-tokens"):
        args[rest[0]], rest = rest[1], rest[2:]
    else:
        names += [] if rest[0].startswith("-") else [rest[0]]
        rest = rest[1:]
with open(os.environ["ANSWERED"], "a") as f:
    f.write(" ".join(names) + "\\n")
problems = [json.loads(line) for line in open(args["--capability"])]
answers = [p["answer"] for p in problems]
models = [{{"path": n, "correct": [bool(eval({RULES!r}[n], {{"a": a}})) for a in answers], "mean_tokens": 100.0,
           "finished": [bool(eval({FINISHED!r}[n], {{"a": a}})) for a in answers],
           "total": len(answers), "unfinished": 1, "kl_vs_base": 0.0 if i else None}}
          for i, n in enumerate(names)]
json.dump({{"settings": {{"max_tokens": int(args.get("--max-tokens", 256))}}, "problems": problems,
           "models": models}}, open(args["--json"], "w"))
"""


@pytest.fixture(autouse=True)
def answered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in writes here which models each evaluation answered with."""
    monkeypatch.setenv("ANSWERED", str(tmp_path / "answered.txt"))
    return tmp_path / "answered.txt"


def test_slices_resume_and_pool(tmp_path: Path) -> None:
    stand_in = [sys.executable, "-c", STAND_IN]
    assert sorted(chunks(tmp_path, "heldout", "arithmetic", 25, 10, stand_in, MODELS)) \
        == [f"heldout-{k}" for k in range(3)]
    assert chunks(tmp_path, "heldout", "arithmetic", 25, 10, stand_in, MODELS) == {}  # every slice kept: nothing again
    assert sorted(chunks(tmp_path, "heldout", "arithmetic", 45, 10, stand_in, MODELS)) == ["heldout-3", "heldout-4"]
    sliced = [json.loads(line)["question"] for k in range(5)
              for line in (tmp_path / f"heldout-{k}.jsonl").read_text().splitlines()]
    assert sliced == [p.question for p in problems_for("arithmetic", "heldout", 50)]  # whole slices
    answers = [json.loads(line)["answer"] for k in range(5) for line in (tmp_path / f"heldout-{k}.jsonl").open()]
    right = [[bool(eval(RULES[m.name], {"a": a})) for a in answers] for m in MODELS]
    table = "\n".join(pooled(tmp_path, "heldout"))
    assert table.startswith("50 problems in 5 slices")
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 5 and len({row.count("|") for row in rows}) == 1  # every row has every column
    for label, r in zip(("original", "capability edit", "random control"), right):
        assert f"| {label} | {sum(r)}/50 |" in table
    edit = Paired.of(right[0], right[1])
    assert f"+{edit.gained} / -{edit.lost} | {edit.p_value:.3g}" in table
    against = Paired.of(right[2], right[1])
    assert f"edit against the control, paired: +{against.gained} / -{against.lost}, p = {against.p_value:.3g}" in table
    done = [a % 7 != 0 and a % 11 != 0 for a in answers]  # finished by all three
    kept = [[r for r, d in zip(rs, done) if d] for rs in right]
    edit_done = Paired.of(kept[0], kept[1])
    assert table.splitlines()[-1] == (
        f"on the {sum(done)} problems all three finished within the budget: right {sum(kept[0])} / {sum(kept[1])} / "
        f"{sum(kept[2])} (original / edit / control); edit vs original +{edit_done.gained} / -{edit_done.lost}, "
        f"p = {edit_done.p_value:.3g}; control vs original +{Paired.of(kept[0], kept[2]).gained} / "
        f"-{Paired.of(kept[0], kept[2]).lost}, p = {Paired.of(kept[0], kept[2]).p_value:.3g}")
    assert 0 < sum(done) < 50
    assert pooled(tmp_path, "transfer") == []
    chunks(tmp_path, "transfer", "percent", 10, 10, stand_in, MODELS)
    assert pooled(tmp_path, "transfer")[0] == "10 problems in 1 slice"
    # a slice answered with another budget is not pooled with the rest
    chunks(tmp_path, "heldout", "arithmetic", 60, 10, [*stand_in, "--max-tokens", "512"], MODELS)
    with pytest.raises(SystemExit, match="different budgets"):
        pooled(tmp_path, "heldout")


def test_the_original_taken_from_another_folder(tmp_path: Path, answered: Path) -> None:
    """With --original-from, a slice is answered by the edit and the control only; the original's
    answers come from the other folder's slice, and the paired counts and KL are made again
    against them; another original file stops the run."""
    stand_in = [sys.executable, "-c", STAND_IN]
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    chunks(first, "heldout", "arithmetic", 20, 10, stand_in, MODELS)
    answered.unlink()
    models = [Path("original"), Path("edit2"), Path("control")]
    chunks(second, "heldout", "arithmetic", 30, 10, stand_in, models, first, lambda o, others: [0.25, 0.5])
    assert answered.read_text().splitlines() == ["edit2 control", "edit2 control", "original edit2 control"]
    for k in range(2):
        earlier, now = (json.loads((d / f"heldout-{k}.json").read_text()) for d in (first, second))
        assert now["models"][0] == earlier["models"][0] and now["problems"] == earlier["problems"]
        assert [m["kl_vs_base"] for m in now["models"]] == [None, 0.25, 0.5]
        base = earlier["models"][0]["correct"]
        edit = Paired.of(base, [bool(eval(RULES["edit2"], {"a": p["answer"]})) for p in now["problems"]])
        assert now["models"][1]["paired"] == {"gained": edit.gained, "lost": edit.lost, "p_value": edit.p_value}
    assert not list(second.glob("*.pair.json"))
    third = tmp_path / "third"
    third.mkdir()
    before = answered.read_text()
    with pytest.raises(SystemExit, match="holds other problems"):  # another family's slice: stopped before answering
        chunks(third, "heldout", "percent", 10, 10, stand_in, models, first, lambda o, others: [0.0, 0.0])
    assert answered.read_text() == before
    with pytest.raises(SystemExit, match="answered with original"):
        chunks(third, "heldout", "arithmetic", 10, 10, stand_in, [Path("other"), *models[1:]], first,
               lambda o, others: [0.0, 0.0])
