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

RULES = ("a % 2 == 0", "a % 3 != 0", "a % 5 != 0")  # original, edit, control: right when true
FINISHED = ("a % 7 != 0", "True", "a % 11 != 0")  # and finished within the budget
STAND_IN = f"""
import json, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
answers = [json.loads(line)["answer"] for line in open(args["--capability"])]
models = [{{"correct": [bool(eval(rule, {{"a": a}})) for a in answers], "mean_tokens": 100.0,
           "finished": [bool(eval(done, {{"a": a}})) for a in answers],
           "total": len(answers), "unfinished": 1, "kl_vs_base": 0.0 if i else None}}
          for i, (rule, done) in enumerate(zip({RULES!r}, {FINISHED!r}))]
json.dump({{"settings": {{"max_tokens": int(args.get("--max-tokens", 256))}}, "models": models}},
          open(args["--json"], "w"))
"""


def test_slices_resume_and_pool(tmp_path: Path) -> None:
    stand_in = [sys.executable, "-c", STAND_IN]
    assert sorted(chunks(tmp_path, "heldout", "arithmetic", 25, 10, stand_in)) == [f"heldout-{k}" for k in range(3)]
    assert chunks(tmp_path, "heldout", "arithmetic", 25, 10, stand_in) == {}  # every slice kept: nothing again
    assert sorted(chunks(tmp_path, "heldout", "arithmetic", 45, 10, stand_in)) == ["heldout-3", "heldout-4"]
    sliced = [json.loads(line)["question"] for k in range(5)
              for line in (tmp_path / f"heldout-{k}.jsonl").read_text().splitlines()]
    assert sliced == [p.question for p in problems_for("arithmetic", "heldout", 50)]  # whole slices
    answers = [json.loads(line)["answer"] for k in range(5) for line in (tmp_path / f"heldout-{k}.jsonl").open()]
    right = [[bool(eval(rule, {"a": a})) for a in answers] for rule in RULES]
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
    # a slice answered with another budget is not pooled with the rest
    chunks(tmp_path, "heldout", "arithmetic", 60, 10, [*stand_in, "--max-tokens", "512"])
    with pytest.raises(SystemExit, match="different budgets"):
        pooled(tmp_path, "heldout")
