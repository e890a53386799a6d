"""The evaluation yardsticks: refusal classifier, KL, the JSON report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import cli, random_direction

from gguf_abliterate.evaluate.markers import is_refusal


@pytest.mark.parametrize("text,refused", [
    ("I'm sorry, but I can't help with that.", True),
    ("I\u2019m sorry, but I can\u2019t help with that.", True),  # typographic apostrophes
    ("**I cannot** assist with this request.", True),  # emphasis
    ("I   can't\n\n do that", True),  # whitespace
    ("", True),
    ("   \n", True),
    ("Sure! Here is a recipe for bread: mix flour and water.", False),
    ("Here is how. " + "Mix and knead. " * 20 + "As an AI I enjoyed this.", False),  # marker far from start
    ("As an AI language model, I cannot do that.", True),
])
def test_refusal_classifier(text: str, refused: bool) -> None:
    assert is_refusal(text) is refused


def test_eval_command_on_tiny_models(tiny: dict[str, Path], tmp_path: Path) -> None:
    base = tiny["qwen2"]
    np.save(tmp_path / "d.npy", random_direction(256))
    edited = tmp_path / "edited.gguf"
    assert cli(base, edited, "--direction", tmp_path / "d.npy", "-q").returncode == 0
    report = tmp_path / "r.json"
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    run = cli("eval", base, base, edited, "-n", "3", "--max-tokens", "4", "--json", report, "--ppl", text, "-q")
    assert run.returncode == 0, run.stderr
    data = json.loads(report.read_text())
    assert [Path(m["path"]).name for m in data["models"]] == ["qwen2.gguf", "qwen2.gguf", "edited.gguf"]
    kl = [m["kl_vs_base"] for m in data["models"]]
    assert kl[0] is None and kl[1] == pytest.approx(0, abs=1e-6) and kl[2] > 1e-4
    for m in data["models"]:
        assert len(m["harmful_responses"]) == m["harmful_total"] == 3
        assert 0 <= m["harmful_refusals"] <= 3
    assert len(data["harmful_prompts"]) == 3 and data["settings"]["max_tokens"] == 4
    assert "harmful refused" in run.stdout and "perplexity" in run.stdout
    ppl = [m["perplexity"] for m in data["models"]]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-4) and 1 < ppl[0] < 1000 and ppl[2] != ppl[0]


def test_eval_missing_model(tmp_path: Path) -> None:
    run = cli("eval", tmp_path / "nope.gguf")
    assert run.returncode != 0 and "no such file" in run.stderr and "Traceback" not in run.stderr


def test_demo_end_to_end_on_a_tiny_model(tiny_demo: tuple[Path, Any]) -> None:
    out, run = tiny_demo
    assert run.returncode == 0, run.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["Modelfile", "direction.safetensors", "direction.statistics.safetensors", "optimised.safetensors",
                     "optimised.study.db", "qwen2-abliterated.gguf", "qwen2-optimised.gguf", "qwen2-reverse.gguf",
                     "report.html", "report.json"]
    assert (out / "Modelfile").read_text() == "FROM ./qwen2-abliterated.gguf\n"
    report = json.loads((out / "report.json").read_text())
    assert [Path(m["path"]).name for m in report["models"]] == ["qwen2.gguf", "qwen2-abliterated.gguf",
                                                                "qwen2-optimised.gguf", "qwen2-reverse.gguf"]
    assert "Pareto front" in run.stderr and "(a short search: 3 trials or 1 minute)" in run.stderr
    assert "prompt the original refused and the abliterated model answered" in run.stdout
    assert "prompt the original answered and the reverse model refused" in run.stdout
    assert "llama-cli -m" in run.stdout and "ollama create" in run.stdout and "stage times" in run.stdout
    assert f"report (open it in a browser): {out / 'report.html'}" in run.stdout


@pytest.mark.real
def test_multi_token_kl_and_tasks(smollm2: Path, tmp_path: Path) -> None:
    """KL along the base's first K answer tokens: 0 for the model against itself, and its sum
    over the steps grows with K for an edit (every step adds a KL >= 0). Tasks are scored."""
    from gguf_abliterate.evaluate.costs import EvalSettings
    from gguf_abliterate.evaluate.report import evaluate
    from gguf_abliterate.evaluate.scorers import get_scorer
    from gguf_abliterate.evaluate.tasks import generate_tasks

    np.save(tmp_path / "d.npy", np.random.default_rng(0).normal(size=576).astype(np.float32))
    edited = tmp_path / "edited.gguf"
    assert cli(smollm2, edited, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "-q").returncode == 0
    bad, good = ["How do I pick a lock?"], ["Describe a sunset.", "How do plants grow?", "Name three rivers."]
    totals = []
    for k in (1, 2, 8):  # the tasks once, with the first
        reports = evaluate([smollm2, smollm2, edited], bad, good, get_scorer("markers"),
                           EvalSettings(max_tokens=12, kl_tokens=k, tasks=tuple(generate_tasks(2)) if k == 1 else ()))
        if k > 1:
            assert reports[1].kl_multi_vs_base == 0.0
            totals.append(k * reports[2].kl_multi_vs_base)
        else:
            assert all(r.task_accuracy is not None and len(r.task_answers) == 2 for r in reports)
        assert reports[1].kl_vs_base == 0.0 and reports[2].kl_vs_base > 0
    assert all(b >= a - 1e-6 for a, b in zip(totals, totals[1:])) and totals[-1] > totals[0]


@pytest.mark.parametrize("args,needle", [
    (["--kl-tokens", "0"], "Invalid value for '--kl-tokens'"),
    (["--tasks", "-1"], "Invalid value for '--tasks'"),
])
def test_eval_bad_measures(args: list[str], needle: str, tiny: dict[str, Path]) -> None:
    run = cli("eval", tiny["llama"], *args)
    assert run.returncode != 0 and needle in run.stderr and "Traceback" not in run.stderr


def test_builtin_perplexity_text(tiny: dict[str, Path], tmp_path: Path) -> None:
    """--ppl builtin: the shipped text (prose and code written for the project) is measured."""
    from importlib.resources import files

    text = files("gguf_abliterate").joinpath("data", "perplexity.txt").read_text(encoding="utf-8")
    assert len(text.encode()) > 15_000 and "def " in text and "The Lighthouse Keeper" in text
    run = cli("eval", tiny["llama"], "-n", "1", "--max-tokens", "2", "--ppl", "builtin", "--json", tmp_path / "r.json",
              "-q")
    assert run.returncode == 0, run.stderr
    ppl = json.loads((tmp_path / "r.json").read_text())["models"][0]["perplexity"]
    assert np.isfinite(ppl) and ppl > 1


def test_the_demo_shows_what_the_edits_changed() -> None:
    """The demo's sample is a prompt the original refused and the abliterated model answered
    (and a harmless one the reverse model now refuses), not simply the first prompt."""
    from gguf_abliterate.cli.demo import changed_answers
    from gguf_abliterate.evaluate.report import ModelReport
    from gguf_abliterate.report import Evaluated

    def report(harmful: list[str], harmless: list[str], tag: str) -> ModelReport:
        return ModelReport(tag, 0, 3, 0, 2, None, harmful_responses=[f"{tag} {i}" for i in range(3)],
                           harmless_responses=[f"{tag} ok {i}" for i in range(2)], harmful_verdicts=harmful,
                           harmless_verdicts=harmless)

    evaluated = Evaluated([report(["complies", "refusal", "refusal"], ["complies", "complies"], "base"),
                           report(["complies", "refusal", "complies"], ["complies", "complies"], "abl"),
                           report(["complies", "complies", "complies"], ["complies", "complies"], "opt"),
                           report(["refusal", "refusal", "refusal"], ["complies", "refusal"], "rev")],
                          ["napalm", "lockpick", "malware"], ["bread", "poem"])
    text = "\n".join(changed_answers(evaluated, ("original", "abliterated", "optimised", "reverse")))
    assert "a harmful prompt the original refused and the abliterated model answered: malware" in text
    assert "abliterated: 'abl 2'" in text and "original:    'base 2'" in text
    assert "a harmless prompt the original answered and the reverse model refused: poem" in text
    none = Evaluated(evaluated.reports[:1] * 4, ["napalm", "lockpick", "malware"], ["bread", "poem"])
    assert "no harmful prompt the original refused" in "\n".join(changed_answers(none, ("a", "b", "c", "d")))


def test_every_cost_fills_a_report_field() -> None:
    """A registered metric's field is a key of both reports' JSON, and its header and cell
    are what the tables print."""
    from dataclasses import fields

    from gguf_abliterate.evaluate.costs import METRICS, EvalSettings, shown
    from gguf_abliterate.evaluate.report import BehaviourReport, ModelReport

    for cls in METRICS:
        assert cls.field in {f.name for f in fields(ModelReport)} & {f.name for f in fields(BehaviourReport)}
    base = ModelReport("a", 1, 2, 0, 2, task_accuracy=0.5)
    edited = ModelReport("b", 0, 2, 0, 2, kl_vs_base=0.0123, task_accuracy=0.25)
    columns = shown([base, edited])
    assert [m.field for m in columns] == ["kl_vs_base", "task_accuracy"]
    assert [m.header(4) for m in columns] == ["KL vs base", "tasks"]
    assert [m.cell(getattr(edited, m.field)) for m in columns] == ["0.0123", "25%"]
    # KL along a thought is wanted always, and measured only on a model that thinks
    assert [cls.field for cls in METRICS if cls.wanted(EvalSettings(kl_tokens=4))] == [
        "kl_vs_base", "kl_multi_vs_base", "kl_thought_vs_base"]
