"""Evaluating models as one job: an `EvalRequest` in, what was measured out (the caller prints
the table). Refusal by default: greedy answers to harmful and harmless prompts counted by
markers (and labelled by a judge where one is given), first-token KL against the first model;
with a behaviour pack, the pack's measure on its probes instead of the refusal counts. The
JSON and the HTML report are written here, claimed before any model runs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.direction.packs import Pack
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.markers import DEFAULT_MARKERS
from gguf_abliterate.evaluate.costs import EvalSettings
from gguf_abliterate.evaluate.protocols import PROTOCOLS
from gguf_abliterate.evaluate.report import BehaviourReport, evaluate, evaluate_behaviour, to_json
from gguf_abliterate.evaluate.scorers import get_scorer
from gguf_abliterate.evaluate.tasks import generate_tasks
from gguf_abliterate.gguf_io.atomic import claim_outputs, write_text
from gguf_abliterate.jobs.ui import Ui
from gguf_abliterate.report import Evaluated, claim_report
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET, Thinking, render_for
from gguf_abliterate.textfile import read_text

BUILTIN_TEXT = "builtin"  # --ppl builtin: the shipped text


@dataclass(frozen=True, kw_only=True)
class EvalRequest:
    models: Sequence[Path]  # the first is the base
    pack: Pack | None = None  # None: refusal
    harmful: Path | None = None  # refusal's prompt sets (None: the built-in validation split)
    harmless: Path | None = None
    markers: Path | None = None
    judge: Path | None = None
    limit: int | None = None
    max_tokens: int | None = None  # None: 64 for refusal, the pack's own otherwise
    kl_tokens: int = 1
    tasks: int = 0
    task_seed: int = 0
    ppl: Path | None = None  # a text file, or Path("builtin")
    json: Path | None = None
    report: Path | None = None
    report_directions: Sequence[Path] = ()
    thinking: Thinking = field(default_factory=Thinking)
    thought_tokens: int = THOUGHT_BUDGET  # a thinking model's budget for its thought, on top of max_tokens
    protocol: str = "ours"  # how refusals are counted (evaluate/protocols.py)
    force: bool = False


@dataclass
class PackEvaluated:
    """What a behaviour pack's evaluation measured."""

    pack: Pack
    reports: list[BehaviourReport]
    probes: list[Any]
    harmless: list[str]
    max_tokens: int
    settings: EvalSettings = field(default_factory=EvalSettings)


def eval_settings(request: EvalRequest, max_tokens: int) -> EvalSettings:
    """Check the models and the cost options every evaluation shares, and build its settings."""
    for m in request.models:
        if not m.is_file():
            raise UserError(f"{m}: no such file")
        render_for(m, request.thinking)  # a --thinking the model cannot do fails before any work
    ppl_text = None
    if request.ppl is not None and str(request.ppl) == BUILTIN_TEXT:
        ppl_text = files("gguf_abliterate").joinpath("data", "perplexity.txt").read_text(encoding="utf-8")
    elif request.ppl is not None:
        ppl_text = read_text(request.ppl, "text file")
    return EvalSettings(max_tokens=max_tokens, kl_tokens=request.kl_tokens, ppl_text=ppl_text,
                        tasks=tuple(generate_tasks(request.tasks, request.task_seed)) if request.tasks else (),
                        thinking=request.thinking, thought_tokens=request.thought_tokens)


def run_eval(request: EvalRequest, ui: Ui = Ui()) -> Evaluated:
    """The refusal evaluation (`request.pack` None)."""
    r = request
    protocol = PROTOCOLS[r.protocol]
    settings = eval_settings(r, r.max_tokens or protocol.max_tokens)
    if r.report_directions and r.report is None:
        raise UserError("--report-direction adds charts to the report: give --report FILE.html too")
    inputs = [*r.models, *r.report_directions, *(p for p in (r.harmful, r.harmless, r.markers, r.ppl, r.judge) if p)]
    claim_outputs([r.json] if r.json else [], inputs, r.force)
    if r.report is not None:
        from gguf_abliterate.formats.direction_file import load_direction

        claim_report(r.report, [*inputs, *([r.json] if r.json else [])], r.force)
        for f in r.report_directions:
            load_direction(f)  # a bad file fails now, not after the evaluation
    bad, good = P.field_prompts() if protocol.prompts == "field" else P.default_prompts("validation")
    bad = P.load_prompts(r.harmful) if r.harmful else bad
    good = P.load_prompts(r.harmless) if r.harmless else good
    bad, good = bad[:r.limit], good[:r.limit]
    marks = tuple(m.lower() for m in P.load_prompts(r.markers)) if r.markers else DEFAULT_MARKERS
    with contextlib.ExitStack() as stack:
        judge = None
        if r.judge is not None:
            from gguf_abliterate.evaluate.judge import Judge

            judge = stack.enter_context(Judge(r.judge))
        with ui.bar(total=len(r.models) * (len(bad) + len(good)), desc="responses", unit="prompt") as bar:
            reports = evaluate(r.models, bad, good, get_scorer(protocol.scorer, markers=marks), settings, bar.update,
                               judge, protocol.budgets)
    meta = {**_meta(settings), "markers": list(marks), "protocol": protocol.name,
            "protocol_text": protocol.describe(settings.max_tokens, len(bad), len(good))}
    if r.json:
        write_text(r.json, json.dumps(to_json(reports, bad, good, meta), indent=1))
    evaluated = Evaluated(reports, bad, good, {**meta, "judge": r.judge.name if r.judge else None})
    if r.report is not None:
        from gguf_abliterate.report import write_report

        write_report(r.report, report_title(r.models), evaluated=evaluated, direction_files=r.report_directions)
    return evaluated


def run_pack_eval(request: EvalRequest, ui: Ui = Ui()) -> PackEvaluated:
    """A behaviour pack's measure for each model beside the harmless KL and, if asked, task
    accuracy and perplexity."""
    r = request
    pack = r.pack
    assert pack is not None and pack.measure is not None
    budget = r.max_tokens or pack.max_tokens
    settings = eval_settings(r, budget)
    claim_outputs([r.json] if r.json else [], [*r.models, *([r.ppl] if r.ppl else [])], r.force)
    probes = list(pack.probes[:r.limit])
    good = P.default_prompts("validation")[1][:r.limit]
    with ui.bar(total=len(r.models) * len(probes), desc="answers", unit="probe") as bar:
        reports = evaluate_behaviour(r.models, probes, pack.measure, budget, good, settings, bar.update)
    if r.json:
        write_text(r.json, json.dumps({
            "settings": {**_meta(settings), "behaviour": pack.name, "measure": pack.measure.name,
                         **pack.measure.settings()},
            "probes": [{"prompt": p.prompt, "answer": p.answer} for p in probes], "harmless_prompts": good,
            "models": [asdict(m) for m in reports]}, indent=1))
    return PackEvaluated(pack, reports, probes, good, budget, settings)


def _meta(settings: EvalSettings) -> dict[str, Any]:
    return {"max_tokens": settings.max_tokens, "greedy": True, "kl_tokens": settings.kl_tokens,
            "thinking": settings.thinking.mode, "thought_tokens": settings.thought_tokens,
            "tasks": [{"kind": t.kind, "prompt": t.prompt, "answer": t.answer} for t in settings.tasks]}


def report_title(models: Sequence[Path]) -> str:
    return "gguf-abliterate: " + " vs ".join(m.name for m in models)
