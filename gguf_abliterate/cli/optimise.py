"""`optimise`: search the edit (directions, per-block strengths) against refusal and KL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from gguf_abliterate.cli.common import (
    Command,
    Finite,
    InputPath,
    OutputPath,
    Say,
    check_report,
    progress,
    sayer,
    user_errors,
)
from gguf_abliterate.errors import Interrupted, UserError
from gguf_abliterate.evaluate.generate import MAX_ANSWER_TOKENS
from gguf_abliterate.optimise.study import SearchSettings

D = SearchSettings()  # the defaults, in one place


def optimise_model(model_path: Path, output: Path | None, *, settings: Any = None, storage: str | None = None,
                   resume: bool = False, join: str | None = None, measured: Path | None = None,
                   bake: Path | None = None, report: Path | None = None, force: bool = False,
                   quiet: bool = False) -> int | None:
    """Run (or join, or resume) the search; unless joining, write the pick to `output` (and,
    with `bake`, the pick baked into a GGUF there; with `report`, the search charted in HTML).
    Returns the chosen trial's number (None for a joining worker)."""
    from gguf_abliterate.gguf_io.atomic import claim_outputs
    from gguf_abliterate.optimise.study import (Search, default_storage, drop_study, shown_url, sqlite_path,
                                               study_state)

    say = sayer(quiet)
    settings = settings or SearchSettings()

    def bars(**kwargs: Any) -> Any:
        return progress(kwargs.pop("total"), kwargs.pop("desc"), kwargs.pop("unit"), quiet, **kwargs)

    if report is not None:
        if join is not None:
            raise UserError("--report charts the result a search writes; a joining worker writes none")
        check_report(report, [model_path, *(p for p in (output, bake, measured) if p is not None)], force)
    if join is not None:
        search = Search(model_path, join, settings, create=False, say=say, progress=bars)
        try:
            done = search.run()
        except KeyboardInterrupt:
            raise Interrupted("interrupted; the finished trials are in the study") from None
        finally:
            search.close()
        say(f"this worker finished {done} trials of the study in {shown_url(join)}")
        return None
    if output is None:
        raise UserError("give -o OUTPUT.safetensors (or --join URL to add a worker to a running study)")
    if output.suffix.lower() != ".safetensors":
        raise UserError(f"{output}: the search result needs metadata: write a .safetensors file")
    inputs = [model_path, *([measured] if measured else []), *([settings.judge] if settings.judge else [])]
    claim_outputs([output, *([bake] if bake else [])], inputs, force)
    if bake is not None and settings.bake_checks < 1:
        raise UserError("--bake writes the bake the check makes: drop --bake-checks 0")
    if bake is not None and bake.suffix.lower() != ".gguf":
        raise UserError(f"--bake {bake}: the baked model is a GGUF file: name it .gguf")
    url = storage or default_storage(output)
    db = sqlite_path(url)
    if db is not None:  # resumed or replaced, by the rules below, but never one of the inputs
        claim_outputs([db], [*inputs, output, *([bake] if bake else [])], force=True)
    state = study_state(url)
    if resume and state == "none":
        raise UserError(f"--resume: no study at {db or shown_url(url)}")
    if not resume and state == "ready":
        raise UserError(f"a study is already stored in {db or shown_url(url)}: --resume to continue it, or remove it to start over")
    if not resume and state == "half":
        say(f"note: replacing the study in {db or shown_url(url)}, whose set-up was interrupted before any trial")
        drop_study(url)
    if measured is not None and resume:
        raise UserError("--from starts a study; a resumed one keeps the directions it was made with")
    if measured is not None:
        from gguf_abliterate.direction.file import load_direction

        behaviour = load_direction(measured).behaviour
        if behaviour not in (None, "refusal"):
            raise UserError(f"{measured}: a {behaviour!r} direction; optimise searches refusal edits only (its "
                            f"objectives are refusal and KL): edit with --scale and measure with eval --behaviour")
    search = Search(model_path, url, settings, create=not resume, say=say, progress=bars, measured=measured)
    try:
        interrupted = False
        try:
            search.run()
        except KeyboardInterrupt:
            interrupted = True
            say("interrupted: keeping the finished trials and writing the best so far (unconfirmed)")
        if not interrupted:
            search.wait_for_others()
        records = search.records()
        chosen, original, front = search.pick(records, confirm=not interrupted)
        checked = chosen is not None and original is not None and search.settings.bake_checks > 0
        if checked:
            chosen = search.check_baked(chosen, output, original, records, baker(model_path, bars), keep=bake)
        _table(say, front, chosen, original, search.settings.max_refusals)
        if not checked:
            search.save(output, chosen, original, records)
    finally:
        search.close()
    assert chosen is not None
    if report is not None:
        from gguf_abliterate.report import write_report

        write_report(report, f"gguf-abliterate optimise: {model_path.name}", direction_files=[output])
        say(f"wrote {report}")
    if bake is not None and original is not None:
        say(f"wrote {output} and {bake}: trial {chosen.number} of {len(records)} (another: gguf-abliterate "
            f"{model_path} OUT.gguf --direction {output} --trial N)")
    else:
        say(f"wrote {output}: trial {chosen.number} of {len(records)} "
            f"(bake it: gguf-abliterate {model_path} OUT.gguf --direction {output}; another: --trial N)")
    if interrupted:  # the best so far is written, but the search did not finish: say so by the exit code
        raise Interrupted(f"interrupted after {len(records)} trials: {output} holds the best so far, unconfirmed "
                          f"(--resume continues the study)")
    return chosen.number


def baker(model_path: Path, bars: Any) -> Any:
    """The search's bake: the edit job on a result file's chosen trial, with the command's
    defaults, as one file (what `gguf-abliterate MODEL OUT --direction RESULT` writes)."""
    from gguf_abliterate.jobs.edit import EditRequest, run_edit
    from gguf_abliterate.jobs.ui import Ui

    def bake(result: Path, out: Path) -> None:
        run_edit(EditRequest(input=model_path, output=out, direction=result, merge=True, force=True), Ui(bar=bars))
    return bake


def _table(say: Say, front: list[Any], chosen: Any, original: int | None, max_refusals: float) -> None:
    """The Pareto front, by refusal, with the pick marked."""
    say(f"Pareto front ({len(front)} trials; refusal = first-token refusal mass / the original's; "
        f"confirmed = greedy refusals{'' if original is None else f', original {original}'}; "
        f"baked = the same, baked into the file's own types):")
    say(f"{'trial':>5} {'refusal':>8} {'KL':>8} {'confirmed':>9} {'baked':>5}  direction            attn (peak@pos w edge)   "
        f"mlp (peak@pos w edge)")
    from gguf_abliterate.optimise.space import describe

    for r in front:
        d, attn, mlp = describe(r.params)
        k = f"{attn}  {mlp}"
        kl = "-" if r.kl is None else f"{r.kl:.4f}"
        conf = "-" if r.confirmed_refusals is None else str(r.confirmed_refusals)
        baked = "-" if r.baked_refusals is None else str(r.baked_refusals)
        mark = "  <- pick" if r is chosen else ""
        say(f"{r.number:5d} {r.refusal:8.3f} {kl:>8} {conf:>9} {baked:>5}  {d:<20} {k}{mark}")


@click.command("optimise", cls=Command)
@click.argument("model_path", metavar="MODEL", type=InputPath())
@click.option("-o", "--output", type=OutputPath(),
              help="Where the result goes (.safetensors): every trial, and the chosen one ready to bake.")
@click.option("--trials", type=click.IntRange(min=1), default=D.trials, show_default=True,
              help="Finished trials to run, over all workers of the study.")
@click.option("--minutes", type=Finite(min=0, min_open=True), default=D.minutes, show_default=True,
              help="Start no trial after this long (the pick's confirmation comes after).")
@click.option("--resume", is_flag=True, help="Continue the study stored beside OUTPUT (or in --storage).")
@click.option("--storage", metavar="URL",
              help="Optuna storage URL for the study (sqlite:///x.db, postgresql://..., mysql://...). "
                   "Default: sqlite beside OUTPUT (edit.study.db).")
@click.option("--join", metavar="URL", help="Add this process as a worker to the study at URL (no OUTPUT).")
@click.option("--from", "measured", type=InputPath(),
              help="Take every block's direction and harmless mean from this `direction` file instead of "
                   "measuring them (saves the residual capture).")
@click.option("--startup-trials", type=click.IntRange(min=0), default=D.startup_trials, show_default=True,
              help="Random trials before the TPE sampler takes over.")
@click.option("--score-prompts", type=click.IntRange(min=2), default=D.score_prompts, show_default=True,
              help="Harmful and harmless validation prompts each trial is scored on.")
@click.option("--kl-tokens", type=click.IntRange(min=1), default=D.kl_tokens, show_default=True,
              help="KL over the original's first K greedy tokens (teacher-forced), not only the first.")
@click.option("--max-refusals", type=Finite(0, 100), default=D.max_refusals, show_default=True,
              help="Pick rule: the lowest-KL trial whose greedy refusals are at most this percent of the original's.")
@click.option("--confirm", type=click.IntRange(min=1), default=D.confirm, show_default=True,
              help="Front trials confirmed by generation, at most (lowest KL first; the first that passes is the pick).")
@click.option("--confirm-tokens", type=click.IntRange(1, MAX_ANSWER_TOKENS), default=D.confirm_tokens, show_default=True,
              help="Greedy tokens per confirmation answer (refusals show in the opening).")
@click.option("--bake-checks", type=click.IntRange(min=0), default=D.bake_checks, show_default=True,
              help="Bake the pick into the model's own types and confirm it once more there; if requantizing "
                   "brought refusals back, look up the front (from its strongest end, by bisection) for the "
                   "lowest-KL trial that passes baked; at most this many bakes (0: skip).")
@click.option("--bake", type=OutputPath(), metavar="OUT.gguf",
              help="Keep the final pick's bake as OUT.gguf (what `gguf-abliterate MODEL OUT.gguf --direction "
                   "OUTPUT` would write, as one file even for a split model), saving a second pass.")
@click.option("--patience", type=click.IntRange(min=1), default=D.patience, show_default=True,
              help="Stop when the front of candidate edits (refusal ratio <= 0.3) has not moved for this many trials.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--judge", type=InputPath(),
              help="Confirm the front with this local instruct GGUF as a judge instead of refusal markers "
                   "(slower: one more model and a pass per answer).")
@click.option("--fix", multiple=True, metavar="NAME=VALUE",
              help="Fix a parameter instead of searching it (repeatable): direction_index=12.5 or per-block, "
                   "orthogonal=true, attn.peak=1, attn.position, attn.edge, attn.width, mlp.* (mlp.peak=0 "
                   "switches the MLP edit off).")
@click.option("--report", type=OutputPath(), metavar="FILE.html",
              help="Also write an HTML report: every trial, the Pareto front with the pick, its strengths per block.")
@click.option("--force", is_flag=True, help="Replace OUTPUT, the --bake file and the report if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@user_errors
def command(model_path: Path, output: Path | None, trials: int, minutes: float, resume: bool, storage: str | None,
            join: str | None, measured: Path | None, startup_trials: int, score_prompts: int, kl_tokens: int, max_refusals: float,
            confirm: int, confirm_tokens: int, bake_checks: int, bake: Path | None, patience: int, seed: int,
            judge: Path | None, fix: tuple[str, ...], report: Path | None, force: bool, quiet: bool) -> None:
    """Search the edit for MODEL on CPU: per-block directions (blended between neighbouring
    blocks, or each block its own, optionally orthogonal to the harmless mean) and per-block
    strengths of the attention and MLP edits, against two objectives, refusal on harmful
    prompts and KL on harmless ones. Each trial runs inside llama.cpp as a rank-1 adapter.
    The result bakes with `gguf-abliterate MODEL OUT.gguf --direction OUTPUT`."""
    from gguf_abliterate.optimise.space import parse_fixed

    settings = SearchSettings(trials=trials, minutes=minutes, startup_trials=startup_trials,
                              score_prompts=score_prompts, kl_tokens=kl_tokens, max_refusals=max_refusals,
                              confirm=confirm, confirm_tokens=confirm_tokens, bake_checks=bake_checks,
                              patience=patience, seed=seed,
                              fixed=parse_fixed(fix), judge=judge)
    optimise_model(model_path, output, settings=settings, storage=storage, resume=resume, join=join,
                   measured=measured, bake=bake, report=report, force=force, quiet=quiet)
