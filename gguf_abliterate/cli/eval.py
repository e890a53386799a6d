"""`eval`: compare models on refusals, over-refusal and first-token KL, or on another
behaviour pack's measure."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from gguf_abliterate.cli.common import (Command, InputName, InputPath, OutputPath, cli_ui, echo,
    thinking_options, thought_tokens_option, user_errors)
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.generate import MAX_ANSWER_TOKENS
from gguf_abliterate.evaluate.protocols import PROTOCOLS as PROTOCOL_NAMES

if TYPE_CHECKING:
    from gguf_abliterate.evaluate.report import BehaviourReport, ModelReport
    from gguf_abliterate.jobs.eval import PackEvaluated
    from gguf_abliterate.report import Evaluated
    from gguf_abliterate.runtime.thinking import Thinking


def print_refusals(evaluated: Evaluated, samples: int) -> None:
    """The refusal table (the first model is the base), the judge's labels, sample answers."""
    from gguf_abliterate.evaluate.scorers import Label

    reports, settings = evaluated.reports, evaluated.settings
    max_tokens = int(settings["max_tokens"])  # type: ignore[call-overload]
    delayed = any(r.delayed_refusals is not None for r in reports)
    echo(str(settings.get("protocol_text", "")))
    echo(f"{'model':<40} {'harmful refused':>16}{' (delayed)' if delayed else ''} {'harmless refused':>17} "
         f"{'degenerate':>11} {'unfinished':>10}{_cost_header(reports)}")
    for r in reports:
        degenerate = f"{r.harmful_labels[Label.DEGENERATE.value]}+{r.harmless_degenerate}"
        late = f" {f'({r.delayed_refusals})':>9}" if delayed else ""
        echo(f"{Path(r.path).name[:40]:<40} {r.harmful_refusals:>7}/{r.harmful_total:<8}{late} "
             f"{r.harmless_refusals:>8}/{r.harmless_total:<8} {degenerate:>11} "
             f"{r.unfinished:>4}/{r.harmful_total + r.harmless_total:<5}{_cost_cells(r, reports)}")
    echo(f"(degenerate: harmful+harmless answers that loop or fill, by the rules in evaluate/degenerate.py; "
         f"unfinished: no end within the budget of {max_tokens} tokens"
         + ("; delayed: refusals after a compliant opening, counted in harmful refused" if delayed else "") + ")")
    print_budgets(reports)
    print_thoughts(reports)
    if settings.get("judge"):
        echo(f"\njudge {settings['judge']} on the harmful answers:")
        echo(f"{'model':<40} " + " ".join(f"{label.value:>10}" for label in Label))
        for r in reports:
            assert r.judge_labels is not None
            echo(f"{Path(r.path).name[:40]:<40} " + " ".join(f"{r.judge_labels[label.value]:>10}" for label in Label))
    for r in reports:
        for prompt, answer in list(zip(evaluated.harmful, r.harmful_responses))[:samples]:
            echo(f"\n[{Path(r.path).name}] {prompt}\n  -> {answer[:200]!r}")


def print_budgets(reports: Sequence[ModelReport]) -> None:
    """The budget study: harmful refusals within the first N tokens of the same answers."""
    budgets = sorted({int(n) for r in reports for n in (r.refusals_within or {})})
    if not budgets:
        return
    echo("\nharmful refused within the first N tokens of the same answers (the budget study):")
    echo(f"{'model':<40} " + " ".join(f"{f'N={n}':>8}" for n in budgets))
    for r in reports:
        within = r.refusals_within or {}
        echo(f"{Path(r.path).name[:40]:<40} " + " ".join(f"{within.get(str(n), '-'):>8}" for n in budgets))


def print_thoughts(reports: Sequence[ModelReport]) -> None:
    """For models that think: answers that never arrived, thought lengths, looping thoughts."""
    if not any(r.thinking for r in reports):
        return
    echo(f"\n{'model':<40} {'format':>12} {'no answer':>10} {'thought tokens':>15} {'looping thoughts':>17}")
    for r in reports:
        t, total = r.thinking, r.harmful_total + r.harmless_total
        if t is None:
            echo(f"{Path(r.path).name[:40]:<40} {'none':>12} {'-':>10} {'-':>15} {'-':>17}")
        else:
            echo(f"{Path(r.path).name[:40]:<40} {t.format:>12} {t.no_answer_cell:>10} "
                 f"{t.mean_tokens:15.0f} {f'{t.loops}/{total}':>17}")
    echo("(refusals and the judge read the final answers, after the thought; an answer whose thought did not end "
         "within --thought-tokens is 'no answer', harmful+harmless, not a refusal)")


def print_pack(result: PackEvaluated, samples: int) -> None:
    """A behaviour pack's table: its measure for each model beside the costs; sample answers."""
    pack, reports = result.pack, result.reports
    assert pack.measure is not None
    detail = "accuracy" if reports[0].measured.accuracy is not None else "mean words"
    echo(f"{pack.name}: share of {len(result.probes)} probes that {pack.measure.describe()} "
         f"(greedy, {result.max_tokens} tokens); KL on {len(result.harmless)} harmless prompts")
    echo(f"{'model':<40} {pack.name:>12} {detail:>10} {'unfinished':>10}{_cost_header(reports)}")
    for r in reports:
        m = r.measured
        share = f"{m.shown}/{m.total} {m.share:4.0%}"
        value = f"{m.accuracy:.0%}" if m.accuracy is not None else f"{m.mean_words:.1f}"
        echo(f"{Path(r.path).name[:40]:<40} {share:>12} {value:>10} {r.unfinished:>4}/{m.total:<5}"
             f"{_cost_cells(r, reports)}")
    for r in reports:
        for probe, answer in list(zip(result.probes, r.answers))[:samples]:
            echo(f"\n[{Path(r.path).name}] {probe.prompt}\n  -> {answer[:200]!r}")


def _cost_header(reports: Sequence[ModelReport | BehaviourReport]) -> str:
    """The header of the columns that say what an edit cost (`evaluate.costs`), those measured."""
    from gguf_abliterate.evaluate.costs import shown

    return "".join(f" {m.header(reports[0].kl_tokens):>{m.width}}" for m in shown(reports))


def _cost_cells(r: ModelReport | BehaviourReport, reports: Sequence[ModelReport | BehaviourReport]) -> str:
    from gguf_abliterate.evaluate.costs import shown

    return "".join(f" {m.cell(getattr(r, m.field)):>{m.width}}" for m in shown(reports))


@click.command("eval", cls=Command)
@click.argument("models", nargs=-1, required=True, type=InputPath(), metavar="BASE [EDITED]...")
@click.option("--behaviour", metavar="NAME|PACK.json", type=InputName(),
              help="Measure this behaviour pack instead of refusal: reasoning, concise, or a pack file. The table "
                   "shows the share of the pack's probes whose answers show the behaviour.")
@click.option("--harmful", type=InputPath(), help="Harmful prompts. Default: the built-in validation split.")
@click.option("--harmless", type=InputPath(), help="Harmless prompts. Default: the built-in validation split.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts of each set.")
@click.option("--max-tokens", type=click.IntRange(min=1, max=MAX_ANSWER_TOKENS), default=None,
              help="Greedy response length. Default: 64 for refusal (128 with --protocol field), the pack's own "
                   "otherwise (96 for reasoning and concise); 256 with --capability.")
@click.option("--protocol", type=click.Choice(sorted(PROTOCOL_NAMES)), default="ours", show_default=True,
              help="How refusals are counted. ours: the 72 + 72 validation prompts, 64 tokens, markers near the "
                   "start. field: as public comparisons count, 100 + 100 prompts of its own, 128 tokens, markers "
                   "anywhere (delayed refusals counted apart), and the refusals within 24/48/96/128 tokens of the "
                   "same answers.")
@click.option("--markers", type=InputPath(),
              help="Refusal markers, one per line (matched lower-case near the start of a response; anywhere "
                   "with --protocol field).")
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
@click.option("--task-seed", type=int, default=0, show_default=True, help="Seed of the generated questions (--tasks) and problems (--capability).")
@click.option("--judge", type=InputPath(),
              help="A local instruct GGUF that labels every harmful answer: refusal, complies, partial, evades "
                   "or degenerate (docs/evaluation.md says how well which model judges).")
@click.option("--report", type=OutputPath(), metavar="FILE.html",
              help="Also write an HTML report (one file, opens offline): the table, the requantization each "
                   "edited model recorded, and every answer side by side with its label.")
@click.option("--report-direction", "report_directions", multiple=True, type=InputPath(),
              metavar="FILE", help="Add this `direction` or `optimise` file's charts to the report (repeatable).")
@click.option("--capability", metavar="FAMILY|FILE.jsonl", type=InputName(),
              help="Instead of refusals: accuracy on held-out problems (arithmetic, percent, code, or a problems "
                   ".jsonl file), each model's with its 95% interval, paired with the base's on the same problems "
                   "(an exact McNemar test), answer length and first-token KL.")
@click.option("--problems", type=click.IntRange(min=1), default=500, show_default=True,
              help="With --capability: held-out problems to answer.")
@thinking_options
@thought_tokens_option
@click.option("--force", is_flag=True, help="Replace the --json file and the report if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.pass_context
@user_errors
def command(ctx: click.Context, models: tuple[Path, ...], behaviour: str | None, harmful: Path | None, harmless: Path | None,
            limit: int | None, max_tokens: int | None, markers: Path | None, json_path: Path | None,
            ppl_path: Path | None, samples: int, kl_tokens: int, tasks: int, task_seed: int, judge: Path | None,
            report: Path | None, report_directions: tuple[Path, ...], thinking: Thinking, thought_tokens: int,
            protocol: str, capability: str | None, problems: int, force: bool, quiet: bool) -> None:
    """Compare models: refusals on harmful prompts, over-refusal on harmless ones, and the
    first-token KL divergence KL(BASE || model) on harmless prompts. With --behaviour, the
    pack's own measure on its probes replaces the refusal counts."""
    from gguf_abliterate.jobs.eval import EvalRequest, run_eval, run_pack_eval

    if capability is not None:
        capability_eval(ctx, models, capability, problems, task_seed, max_tokens, json_path, samples, force, quiet)
        return
    pack = None
    if behaviour is not None and behaviour != "refusal":
        from gguf_abliterate.direction.packs import load_pack

        pack = load_pack(behaviour)
        used = [o for o, v in (("--harmful", harmful), ("--harmless", harmless), ("--markers", markers),
                               ("--judge", judge), ("--report", report), ("--report-direction", report_directions),
                               ("--protocol", protocol != "ours")) if v]
        if used:
            raise UserError(f"{', '.join(used)} belong to the refusal evaluation, not --behaviour {pack.name}")
    request = EvalRequest(models=models, pack=pack, harmful=harmful, harmless=harmless, markers=markers, judge=judge,
                          limit=limit, max_tokens=max_tokens, kl_tokens=kl_tokens, tasks=tasks, task_seed=task_seed,
                          ppl=ppl_path, json=json_path, report=report, report_directions=report_directions,
                          thinking=thinking, thought_tokens=thought_tokens, protocol=protocol, force=force)
    if pack is not None:
        print_pack(run_pack_eval(request, cli_ui(quiet)), samples)
        return
    print_refusals(run_eval(request, cli_ui(quiet)), samples)
    if report is not None:
        echo(f"\nreport: {report}")


def capability_eval(ctx: click.Context, models: tuple[Path, ...], capability: str, problems: int, seed: int,
                    max_tokens: int | None, json_path: Path | None, samples: int, force: bool, quiet: bool) -> None:
    """`eval --capability`: refuse the refusal evaluation's options, run the job, print the table."""
    from gguf_abliterate.jobs.capability import ANSWER_TOKENS, CapabilityEvalRequest, run_capability_eval, table

    kept = {"models", "capability", "problems", "task_seed", "max_tokens", "json_path", "samples", "force", "quiet"}
    given = [f"--{p.replace('_', '-')}" for p, v in ctx.params.items()
             if p not in kept and ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise UserError(f"--capability measures accuracy on problems: drop {', '.join(given)}")
    reports = run_capability_eval(CapabilityEvalRequest(
        models=models, capability=capability, problems=problems, seed=seed, max_tokens=max_tokens or ANSWER_TOKENS,
        json=json_path, force=force), cli_ui(quiet))
    for line in table(reports):
        echo(line)
    for r in reports:
        for answer, value in list(zip(r.answers, r.values))[:samples]:
            echo(f"\n[{Path(r.path).name}] read {value}: {answer[-200:]!r}")
