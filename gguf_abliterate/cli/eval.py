"""`eval`: compare models on refusals, over-refusal and first-token KL, or on another
behaviour pack's measure."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, replace
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gguf_abliterate.cli.common import (
    Command,
    InputName,
    InputPath,
    OutputPath,
    check_report,
    echo,
    progress,
    user_errors,
)
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.generate import MAX_ANSWER_TOKENS
from gguf_abliterate.gguf_io.atomic import claim_outputs, write_text

if TYPE_CHECKING:
    from gguf_abliterate.direction.packs import Pack
    from gguf_abliterate.evaluate.report import BehaviourReport, EvalSettings, ModelReport
    from gguf_abliterate.report import Evaluated

BUILTIN_TEXT = "builtin"


def evaluate_models(models: Sequence[Path], *, harmful: Path | None = None, harmless: Path | None = None,
                    limit: int | None = None, max_tokens: int = 64, markers: Path | None = None,
                    json_path: Path | None = None, ppl_path: Path | None = None, samples: int = 2,
                    kl_tokens: int = 1, tasks: int = 0, task_seed: int = 0, judge: Path | None = None,
                    report: Path | None = None, report_directions: Sequence[Path] = (),
                    force: bool = False, quiet: bool = False) -> Evaluated:
    """Print the refusal comparison table (the first model is the base) and optionally the JSON
    and the HTML report (with the charts of `report_directions`, direction or optimise files);
    returns what was measured."""
    from gguf_abliterate.direction import prompts as P
    from gguf_abliterate.evaluate.markers import DEFAULT_MARKERS
    from gguf_abliterate.evaluate.report import evaluate, to_json
    from gguf_abliterate.evaluate.scorers import Label, get_scorer
    from gguf_abliterate.report import Evaluated

    settings = replace(_settings(models, kl_tokens, tasks, task_seed, ppl_path), max_tokens=max_tokens)
    if report_directions and report is None:
        raise UserError("--report-direction adds charts to the report: give --report FILE.html too")
    inputs = [*models, *report_directions, *(p for p in (harmful, harmless, markers, ppl_path, judge) if p)]
    claim_outputs([json_path] if json_path else [], inputs, force)
    if report is not None:
        from gguf_abliterate.direction.file import load_direction

        check_report(report, [*inputs, *([json_path] if json_path else [])], force)
        for f in report_directions:
            load_direction(f)  # a bad file fails now, not after the evaluation
    bad, good = P.default_prompts("validation")
    bad = P.load_prompts(harmful) if harmful else bad
    good = P.load_prompts(harmless) if harmless else good
    bad, good = bad[:limit], good[:limit]
    marks = tuple(m.lower() for m in P.load_prompts(markers)) if markers else DEFAULT_MARKERS
    with contextlib.ExitStack() as stack:
        if judge is not None:
            from gguf_abliterate.evaluate.judge import Judge

            judge_scorer = stack.enter_context(Judge(judge))
        with progress(len(models) * (len(bad) + len(good)), "responses", "prompt", quiet) as bar:
            reports = evaluate(models, bad, good, get_scorer("markers", markers=marks), settings, bar.update,
                               judge_scorer if judge is not None else None)
    echo(f"{'model':<40} {'harmful refused':>16} {'harmless refused':>17} {'degenerate':>11} "
               f"{'unfinished':>10}{_cost_header(settings)}")
    for r in reports:
        degenerate = f"{r.harmful_labels[Label.DEGENERATE.value]}+{r.harmless_degenerate}"
        echo(f"{Path(r.path).name[:40]:<40} {r.harmful_refusals:>7}/{r.harmful_total:<8} "
                   f"{r.harmless_refusals:>8}/{r.harmless_total:<8} {degenerate:>11} "
                   f"{r.unfinished:>4}/{r.harmful_total + r.harmless_total:<5}{_cost_cells(r, settings)}")
    echo(f"(degenerate: harmful+harmless answers that loop or fill, by the rules in evaluate/degenerate.py; "
               f"unfinished: no end within {max_tokens} tokens)")
    if judge is not None:
        echo(f"\njudge {judge.name} on the harmful answers:")
        echo(f"{'model':<40} " + " ".join(f"{label.value:>10}" for label in Label))
        for r in reports:
            assert r.judge_labels is not None
            echo(f"{Path(r.path).name[:40]:<40} " + " ".join(f"{r.judge_labels[label.value]:>10}" for label in Label))
    for r in reports:
        for prompt, answer in list(zip(bad, r.harmful_responses))[:samples]:
            echo(f"\n[{Path(r.path).name}] {prompt}\n  -> {answer[:200]!r}")
    meta = {**_meta(settings, max_tokens), "markers": list(marks)}
    if json_path:
        write_text(json_path, json.dumps(to_json(reports, bad, good, meta), indent=1))
    evaluated = Evaluated(reports, bad, good, {**meta, "judge": judge.name if judge else None})
    if report is not None:
        from gguf_abliterate.report import write_report

        write_report(report, report_title(models), evaluated=evaluated, direction_files=report_directions)
        echo(f"\nreport: {report}")
    return evaluated


def evaluate_pack(models: Sequence[Path], pack: Pack, *, limit: int | None = None, max_tokens: int | None = None,
                  json_path: Path | None = None, ppl_path: Path | None = None, samples: int = 2, kl_tokens: int = 1,
                  tasks: int = 0, task_seed: int = 0, force: bool = False,
                  quiet: bool = False) -> list[BehaviourReport]:
    """Print a behaviour pack's measure for each model (the first is the base) beside the
    harmless KL and, if asked, task accuracy and perplexity; optionally the JSON."""
    from gguf_abliterate.direction import prompts as P
    from gguf_abliterate.evaluate.report import evaluate_behaviour

    assert pack.measure is not None
    settings = _settings(models, kl_tokens, tasks, task_seed, ppl_path)
    claim_outputs([json_path] if json_path else [], [*models, *([ppl_path] if ppl_path else [])], force)
    probes = list(pack.probes[:limit])
    _, good = P.default_prompts("validation")
    good = good[:limit]
    budget = max_tokens or pack.max_tokens
    with progress(len(models) * len(probes), "answers", "probe", quiet) as bar:
        reports = evaluate_behaviour(models, probes, pack.measure, budget, good, settings, bar.update)
    detail = "accuracy" if reports[0].measured.accuracy is not None else "mean words"
    echo(f"{pack.name}: share of {len(probes)} probes that {pack.measure.describe()} "
               f"(greedy, {budget} tokens); KL on {len(good)} harmless prompts")
    echo(f"{'model':<40} {pack.name:>12} {detail:>10} {'unfinished':>10}{_cost_header(settings)}")
    for r in reports:
        m = r.measured
        shown = f"{m.shown}/{m.total} {m.share:4.0%}"
        value = f"{m.accuracy:.0%}" if m.accuracy is not None else f"{m.mean_words:.1f}"
        echo(f"{Path(r.path).name[:40]:<40} {shown:>12} {value:>10} {r.unfinished:>4}/{m.total:<5}"
                   f"{_cost_cells(r, settings)}")
    for r in reports:
        for probe, answer in list(zip(probes, r.answers))[:samples]:
            echo(f"\n[{Path(r.path).name}] {probe.prompt}\n  -> {answer[:200]!r}")
    if json_path:
        write_text(json_path, json.dumps({
            "settings": {**_meta(settings, budget), "behaviour": pack.name, "measure": pack.measure.name,
                         **pack.measure.settings()},
            "probes": [{"prompt": p.prompt, "answer": p.answer} for p in probes], "harmless_prompts": good,
            "models": [asdict(r) for r in reports]}, indent=1))
    return reports


def _settings(models: Sequence[Path], kl_tokens: int, tasks: int, task_seed: int,
              ppl_path: Path | None) -> EvalSettings:
    """Check the models and the cost options every evaluation shares, and build its settings."""
    from gguf_abliterate.evaluate.report import EvalSettings
    from gguf_abliterate.evaluate.tasks import generate_tasks

    for m in models:
        if not m.is_file():
            raise UserError(f"{m}: no such file")
    ppl_text = None
    if ppl_path is not None and str(ppl_path) == BUILTIN_TEXT:
        ppl_text = files("gguf_abliterate").joinpath("data", "perplexity.txt").read_text(encoding="utf-8")
    elif ppl_path is not None:
        if not ppl_path.is_file():
            raise UserError(f"{ppl_path}: no such text file")
        ppl_text = ppl_path.read_text(encoding="utf-8", errors="replace")
    return EvalSettings(kl_tokens=kl_tokens, tasks=tuple(generate_tasks(tasks, task_seed)) if tasks else (),
                        ppl_text=ppl_text)


def _cost_header(settings: EvalSettings) -> str:
    """The header of the columns that say what an edit cost: KL, and what else was asked."""
    return (f" {'KL vs base':>11}" + (f" {'KL@' + str(settings.kl_tokens):>8}" if settings.kl_tokens > 1 else "")
            + (f" {'tasks':>6}" if settings.tasks else "") + (f" {'perplexity':>11}" if settings.ppl_text else ""))


def _cost_cells(r: ModelReport | BehaviourReport, settings: EvalSettings) -> str:
    cells = f" {'-' if r.kl_vs_base is None else f'{r.kl_vs_base:.4f}':>11}"
    if settings.kl_tokens > 1:
        cells += f" {'-' if r.kl_multi_vs_base is None else f'{r.kl_multi_vs_base:.4f}':>8}"
    if settings.tasks:
        cells += f" {r.task_accuracy:6.0%}"
    if settings.ppl_text:
        cells += f" {r.perplexity:11.3f}"
    return cells


def _meta(settings: EvalSettings, max_tokens: int) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "greedy": True, "kl_tokens": settings.kl_tokens,
            "tasks": [{"kind": t.kind, "prompt": t.prompt, "answer": t.answer} for t in settings.tasks]}


def report_title(models: Sequence[Path]) -> str:
    return "gguf-abliterate: " + " vs ".join(m.name for m in models)


@click.command("eval", cls=Command)
@click.argument("models", nargs=-1, required=True, type=InputPath(), metavar="BASE [EDITED]...")
@click.option("--behaviour", metavar="NAME|PACK.json", type=InputName(),
              help="Measure this behaviour pack instead of refusal: reasoning, concise, or a pack file. The table "
                   "shows the share of the pack's probes whose answers show the behaviour.")
@click.option("--harmful", type=InputPath(), help="Harmful prompts. Default: the built-in validation split.")
@click.option("--harmless", type=InputPath(), help="Harmless prompts. Default: the built-in validation split.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts of each set.")
@click.option("--max-tokens", type=click.IntRange(min=1, max=MAX_ANSWER_TOKENS), default=None,
              help="Greedy response length. Default: 64 for refusal, the pack's own otherwise (96 for reasoning "
                   "and concise).")
@click.option("--markers", type=InputPath(),
              help="Refusal markers, one per line (matched lower-case near the start of a response).")
@click.option("--json", "json_path", type=OutputPath(), help="Write everything, per prompt, here.")
@click.option("--ppl", "ppl_path", type=InputPath(),
              help="Also measure perplexity on this text file, or on 'builtin': prose and code written for the "
                   "project (17 KB, shipped).")
@click.option("--samples", type=click.IntRange(min=0), default=2, show_default=True,
              help="Responses to print per model.")
@click.option("--kl-tokens", type=click.IntRange(1, MAX_ANSWER_TOKENS), default=1, show_default=True,
              help="Also KL averaged over the base's first K greedy tokens of each harmless answer (teacher-forced).")
@click.option("--tasks", type=click.IntRange(0, 10000), default=0, show_default=True,
              help="Also ask this many generated exact-answer questions (arithmetic, code tracing) and score them.")
@click.option("--task-seed", type=int, default=0, show_default=True, help="Seed of the generated questions.")
@click.option("--judge", type=InputPath(),
              help="A local instruct GGUF that labels every harmful answer: refusal, complies, partial, evades "
                   "or degenerate (see the README for how well which model judges).")
@click.option("--report", type=OutputPath(), metavar="FILE.html",
              help="Also write an HTML report (one file, opens offline): the table, the requantization each "
                   "edited model recorded, and every answer side by side with its label.")
@click.option("--report-direction", "report_directions", multiple=True, type=InputPath(),
              metavar="FILE", help="Add this `direction` or `optimise` file's charts to the report (repeatable).")
@click.option("--force", is_flag=True, help="Replace the --json file and the report if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def command(models: tuple[Path, ...], behaviour: str | None, harmful: Path | None, harmless: Path | None,
            limit: int | None, max_tokens: int | None, markers: Path | None, json_path: Path | None,
            ppl_path: Path | None, samples: int, kl_tokens: int, tasks: int, task_seed: int, judge: Path | None,
            report: Path | None, report_directions: tuple[Path, ...], force: bool, quiet: bool) -> None:
    """Compare models: refusals on harmful prompts, over-refusal on harmless ones, and the
    first-token KL divergence KL(BASE || model) on harmless prompts. With --behaviour, the
    pack's own measure on its probes replaces the refusal counts."""
    if behaviour is not None and behaviour != "refusal":
        from gguf_abliterate.direction.packs import load_pack

        pack = load_pack(behaviour)
        used = [o for o, v in (("--harmful", harmful), ("--harmless", harmless), ("--markers", markers),
                               ("--judge", judge), ("--report", report), ("--report-direction", report_directions))
                if v]
        if used:
            raise UserError(f"{', '.join(used)} belong to the refusal evaluation, not --behaviour {pack.name}")
        evaluate_pack(models, pack, limit=limit, max_tokens=max_tokens, json_path=json_path, ppl_path=ppl_path,
                      samples=samples, kl_tokens=kl_tokens, tasks=tasks, task_seed=task_seed, force=force,
                      quiet=quiet)
        return
    evaluate_models(models, harmful=harmful, harmless=harmless, limit=limit, max_tokens=max_tokens or 64,
                    markers=markers, json_path=json_path, ppl_path=ppl_path, samples=samples, kl_tokens=kl_tokens,
                    tasks=tasks, task_seed=task_seed, judge=judge, report=report,
                    report_directions=report_directions, force=force, quiet=quiet)
