"""The search as one job: an `OptimiseRequest` in, an `OptimiseResult` out.

Runs (or resumes, or joins as a worker) the Optuna study of `optimise/study.py`, picks and
confirms the edit, confirms the pick once more baked into the file's own types (through the
edit job, so a bake is the very bytes the edit command writes) and writes the result file, the
kept bake and the report. Files are claimed before the study opens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gguf_abliterate.formats.direction_file import load_direction
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io.atomic import claim_outputs
from gguf_abliterate.jobs.edit import EditRequest, run_edit
from gguf_abliterate.jobs.ui import Ui
from gguf_abliterate.optimise.space import describe
from gguf_abliterate.optimise.study import (
    Search,
    SearchSettings,
    TrialRecord,
    default_storage,
    drop_study,
    shown_url,
    sqlite_path,
    study_state,
)
from gguf_abliterate.report import claim_report
from gguf_abliterate.runtime.stages import Stage, Stages


@dataclass(frozen=True, kw_only=True)
class OptimiseRequest:
    model: Path
    output: Path | None  # the result (.safetensors); None only for a joining worker
    settings: SearchSettings = field(default_factory=SearchSettings)
    storage: str | None = None  # an Optuna storage URL; None: sqlite beside the output
    resume: bool = False
    join: str | None = None  # add this process as a worker to the study at this URL
    measured: Path | None = None  # --from: every block's direction and harmless mean from this file
    bake: Path | None = None  # keep the final pick's bake here
    report: Path | None = None
    force: bool = False


@dataclass
class OptimiseResult:
    chosen: TrialRecord | None  # None for a joining worker
    original: int | None = None  # the original model's confirmed refusals (None: unconfirmed)
    front: list[TrialRecord] = field(default_factory=list)
    records: list[TrialRecord] = field(default_factory=list)
    interrupted: bool = False  # Ctrl-C: the best so far was written, unconfirmed
    summary: list[str] = field(default_factory=list)
    opening_tokens: int = 0  # a model that thinks: refusal was read in this many tokens of each trial's own answer
    stages: list[Stage] = field(default_factory=list)  # where the time went


def run_optimise(request: OptimiseRequest, ui: Ui = Ui()) -> OptimiseResult:
    r = request
    if r.report is not None:
        if r.join is not None:
            raise UserError("--report charts the result a search writes; a joining worker writes none")
        claim_report(r.report, [r.model, *(p for p in (r.output, r.bake, r.measured) if p is not None)], r.force)
    if r.join is not None:
        return _join(r, ui)
    if r.output is None:
        raise UserError("give -o OUTPUT.safetensors (or --join URL to add a worker to a running study)")
    output = r.output
    url = _claim(r, output, ui)
    stages = Stages()
    with stages.stage("set-up"):
        search = Search(r.model, url, r.settings, create=not r.resume, say=ui.say, progress=ui.bar,
                        measured=r.measured)
    opening = search.scorer.opening_tokens
    try:
        interrupted = False
        with stages.stage("trials"):
            try:
                search.run()
            except KeyboardInterrupt:
                interrupted = True
                ui.say("interrupted: keeping the finished trials and writing the best so far (unconfirmed)")
            if not interrupted:
                search.wait_for_others()
        records = search.records()
        if not interrupted and search.settings.bake_checks > 0:
            with stages.stage("bake checks"):
                chosen, original, front = search.pick_baked(records, output, _baker(r.model, ui), keep=r.bake)
        else:
            with stages.stage("confirmation"):
                chosen, original, front = search.pick(records, confirm=not interrupted)
            search.save(output, chosen, original, records)
    finally:
        search.close()
    assert chosen is not None
    result = OptimiseResult(chosen, original, front, records, interrupted, opening_tokens=opening, stages=stages.done)
    if r.report is not None:
        from gguf_abliterate.report import write_report

        write_report(r.report, f"gguf-abliterate optimise: {r.model.name}", direction_files=[output])
        result.summary.append(f"wrote {r.report}")
    if r.bake is not None and original is not None:
        result.summary.append(f"wrote {output} and {r.bake}: trial {chosen.number} of {len(records)} (another: "
                              f"gguf-abliterate {r.model} OUT.gguf --direction {output} --trial N)")
    else:
        result.summary.append(f"wrote {output}: trial {chosen.number} of {len(records)} (bake it: gguf-abliterate "
                              f"{r.model} OUT.gguf --direction {output}; another: --trial N)")
    result.summary.append(stages.describe())
    return result


def _join(r: OptimiseRequest, ui: Ui) -> OptimiseResult:
    """A worker in a running study: it runs trials until the study's stop rules, writes nothing."""
    assert r.join is not None
    search = Search(r.model, r.join, r.settings, create=False, say=ui.say, progress=ui.bar)
    try:
        try:
            done = search.run()
        except KeyboardInterrupt:
            return OptimiseResult(None, interrupted=True)  # the command says so, exiting 130
    finally:
        search.close()
    return OptimiseResult(None, summary=[f"this worker finished {done} trials of the study in {shown_url(r.join)}"])


def _claim(r: OptimiseRequest, output: Path, ui: Ui) -> str:
    """Check the request against its files and the study at its storage (replacing a half-made
    one); returns the storage URL."""
    if output.suffix.lower() != ".safetensors":
        raise UserError(f"{output}: the search result needs metadata: write a .safetensors file")
    inputs = [r.model, *([r.measured] if r.measured else []), *([r.settings.judge] if r.settings.judge else [])]
    claim_outputs([output, *([r.bake] if r.bake else [])], inputs, r.force)
    if r.bake is not None and r.settings.bake_checks < 1:
        raise UserError("--bake writes the bake the check makes: drop --bake-checks 0")
    if r.bake is not None and r.bake.suffix.lower() != ".gguf":
        raise UserError(f"--bake {r.bake}: the baked model is a GGUF file: name it .gguf")
    url = r.storage or default_storage(output)
    db = sqlite_path(url)
    where = db or shown_url(url)
    if db is not None:  # resumed or replaced, by the rules below, but never one of the inputs
        claim_outputs([db], [*inputs, output, *([r.bake] if r.bake else [])], force=True)
    state = study_state(url)
    if r.resume and state == "none":
        raise UserError(f"--resume: no study at {where}")
    if not r.resume and state == "ready":
        raise UserError(f"a study is already stored in {where}: --resume to continue it, or remove it to start over")
    if not r.resume and state == "half":
        ui.say(f"note: replacing the study in {where}, whose set-up was interrupted before any trial")
        drop_study(url)
    if r.measured is not None and r.resume:
        raise UserError("--from starts a study; a resumed one keeps the directions it was made with")
    if r.measured is not None:
        behaviour = load_direction(r.measured).behaviour
        if behaviour not in (None, "refusal"):
            raise UserError(f"{r.measured}: a {behaviour!r} direction; optimise searches refusal edits only (its "
                            f"objectives are refusal and KL): edit with --scale and measure with eval --behaviour")
    return url


def _baker(model: Path, ui: Ui) -> Any:
    """The search's bake: the edit job on a result file's chosen trial, with the command's
    defaults, as one file (what `gguf-abliterate MODEL OUT --direction RESULT` writes)."""
    def bake(result: Path, out: Path) -> None:
        run_edit(EditRequest(input=model, output=out, direction=result, merge=True, force=True), Ui(bar=ui.bar))
    return bake


def front_table(result: OptimiseResult) -> list[str]:
    """The Pareto front, by refusal, with the pick marked."""
    original = result.original
    measure = (f"the share of its own {result.opening_tokens}-token openings that refuse" if result.opening_tokens
               else "first-token refusal mass")
    lines = [f"Pareto front ({len(result.front)} trials; refusal = {measure} / the original's; "
             f"confirmed = greedy refusals{'' if original is None else f', original {original}'} (a trial "
             f"that fails: those found when it was stopped); baked = the same, baked into the file's own types):",
             f"{'trial':>5} {'refusal':>8} {'KL':>8} {'confirmed':>9} {'baked':>5}  direction            "
             f"attn (peak@pos w edge)   mlp (peak@pos w edge)"]
    thinks = any(t.confirmed_thought is not None or t.baked_thought is not None for t in result.front)
    if thinks:
        lines[0] = (lines[0].removesuffix("):")
                    + "; thought = the mean thought in tokens on the harmless scoring prompts, through the "
                    "adapter/baked):")
        lines[1] = lines[1].replace("  direction", f" {'thought':>9}  direction", 1)
    for t in result.front:
        d, attn, mlp = describe(t.params)
        kl = "-" if t.kl is None else f"{t.kl:.4f}"
        conf = "-" if t.confirmed_refusals is None else str(t.confirmed_refusals)
        baked = "-" if t.baked_refusals is None else str(t.baked_refusals)
        mark = "  <- pick" if t is result.chosen else ""
        shown = f" {t.thought_cell():>9}" if thinks else ""
        lines.append(f"{t.number:5d} {t.refusal:8.3f} {kl:>8} {conf:>9} {baked:>5}{shown}  {d:<20} {attn}  {mlp}{mark}")
    return lines
