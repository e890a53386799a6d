"""The edit as one job: an `EditRequest` in, an `EditResult` out.

Every edit runs through `run_edit`: the command line (which parses and prints), the demo, the
search's bake check and the tools. It resolves each option once (where the model comes from,
where the output goes, the direction and whether it fits, the rounding and the statistics it
rounds by, the output form), then plans and writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from gguf_abliterate.formats.direction_file import Direction, load_direction
from gguf_abliterate.direction.lean import lean_of
from gguf_abliterate.edit.budget import apply_upgrades, measurement_pieces, parse_budget, spend_budget
from gguf_abliterate.edit.execute import apply_edit, default_jobs, output_nbytes
from gguf_abliterate.direction.statistics import measure_and_store
from gguf_abliterate.edit.moments import attach_moments, resolve_rounding
from gguf_abliterate.formats.statistics_file import PROMPTS, StoredMoments, given_statistics
from gguf_abliterate.edit.options import (EditOptions, OutFormat, Rounding, format_heads, format_layers, parse_heads,
    parse_layers)
from gguf_abliterate.edit.plan import EditPlan, plan_edit
from gguf_abliterate.edit.project import METHODS
from gguf_abliterate.edit.provenance import provenance
from gguf_abliterate.edit.schedule import Method, scheduled_edit
from gguf_abliterate.edit.steer import steer_plan
from gguf_abliterate.errors import UserError
from gguf_abliterate.export import lmstudio as lms
from gguf_abliterate.export import ollama as oll
from gguf_abliterate.gguf_io import Model, output_paths
from gguf_abliterate.gguf_io.atomic import claim_outputs, write_text
from gguf_abliterate.jobs.ui import Ui
from gguf_abliterate.quants.snapback import Report


@dataclass(frozen=True, kw_only=True)
class EditRequest:
    """One edit as asked for. With `ollama`, the model comes from the Ollama store and `input`
    is ignored; with `lmstudio`, `output` is a file name under LM Studio's models folder."""

    input: Path
    output: Path
    direction: Path
    reverse: bool = False
    scale: float | None = None  # None: 1
    steer: float | None = None  # add this many mean differences instead of projecting
    layers: str | None = None  # "4-20", "3,5,8-12"; None: all blocks
    embeddings: bool | None = None  # None: yes unless tied to the output head
    requant_type: GGMLQuantizationType | None = None
    rounding: Rounding = Rounding.AUTO
    statistics: Path | None = None  # None: those the direction file names
    size_budget: str | None = None  # "+5%"
    method: str | None = None  # plain or norm-preserving (a scheduled direction brings its own)
    trial: int | None = None  # with a search result: bake this trial instead of the chosen one
    heads: str | None = None  # "12.3,12.7": only these heads' attn_output columns; "all": lift the file's choice
    out_format: OutFormat = OutFormat.GGUF
    merge: bool = False
    jobs: int | None = None
    verify: bool = False
    ollama: str | None = None
    lmstudio: bool = False
    force: bool = False
    verbose: bool = False


@dataclass
class EditResult:
    """What the edit wrote, and the lines that sum it up (the caller prints them)."""

    written: list[Path]
    summary: list[str] = field(default_factory=list)
    fidelity: Report | None = None  # leak and RMSE of the requantized tensors (a GGUF output)


def run_edit(request: EditRequest, ui: Ui = Ui()) -> EditResult:
    """Resolve, plan and write the edit; notes go to `ui` as they come."""
    r = request
    budget = None if r.size_budget is None else parse_budget(r.size_budget)
    _refuse_combinations(r, budget)
    ollama = oll.resolve_ollama(r.ollama) if r.ollama else None
    input_path = ollama.gguf if ollama is not None else r.input
    output_path = lms.lmstudio_path(r.output.name) if r.lmstudio else r.output
    if r.lmstudio:
        output_path.parent.mkdir(parents=True, exist_ok=True)
    model = Model(input_path)
    modelfile = None if ollama is None else (output_path.parent / "Modelfile", oll.modelfile(output_path.name, ollama))
    claim_outputs([*output_paths(model, output_path, r.merge), *([modelfile[0]] if modelfile else [])],
                  [*(p.path for p in model.parts), r.direction, *([r.statistics] if r.statistics else [])], r.force)
    direction = load_direction(r.direction)
    direction.check_fits(model.n_layer, model.n_embd, model.arch)
    r = _strength_from_file(r, direction, ui)
    rounding, stored = _rounding(r, model, direction, ui)
    opts = EditOptions(reverse=r.reverse, scale=1.0 if r.scale is None else r.scale,
                       layers=parse_layers(r.layers, model.n_layer), embeddings=r.embeddings,
                       requant_type=r.requant_type, rounding=rounding, steer=r.steer, size_budget=budget)
    plan, direction, schedule = _plan(r, model, direction, opts, ui)
    _describe(r, model, plan, direction, opts, schedule, ui)
    if rounding is Rounding.GPTQ and r.out_format is OutFormat.GGUF:
        if stored is None:
            with ui.bar(total=2 * PROMPTS, desc="measuring the writers' inputs", unit="prompt") as bar:
                stored = measure_and_store(model, bar.update)
        count = attach_moments(model, plan, stored)
        ui.say(f"gptq rounding: {count} of {len(plan.edits)} edited tensors weigh their rounding by their inputs' "
               f"statistics ({stored.describe()}); the others are rounded aware")
    elif r.rounding is Rounding.AUTO and r.out_format is OutFormat.GGUF and any(e.aware for e in plan.edits.values()):
        ui.say("aware rounding: the edit is given no input statistics of this model (`direction` writes them beside "
               "a .safetensors direction file, and the edit then finds them; or --statistics FILE, or --rounding "
               "gptq to measure them now); with them it rounds with about half the output error")
    if budget is not None:
        todo = measurement_pieces(model, plan, direction)
        with ui.bar(total=len(todo), desc="measuring requantization error", unit="piece") as bar:
            spent = spend_budget(model, plan, todo, budget, r.jobs or default_jobs(model, plan), bar.update)
        apply_upgrades(plan, spent)
        ui.say(f"size budget {str(r.size_budget).strip()} ({spent.budget_bytes / 1e6:.1f} MB): {spent.describe()} "
               f"stored larger for {spent.extra_bytes / 1e6:.1f} MB, removing {spent.error_removed:.0%} of the "
               f"edited tensors' requantization error")
    if r.verbose:
        for e in plan.edits.values():
            ui.say(f"  {e.name}  {e.src_type.name} -> {e.out_type.name}")
    if r.out_format is OutFormat.LORA:
        return _write_lora(model, plan, direction, opts, schedule, input_path, output_path, ui)
    verified: list[str] = []
    report = Report()
    with ui.bar(total=output_nbytes(model, plan), desc="writing", unit="B", unit_scale=True) as bar:
        written = apply_edit(model, plan, direction, opts, output_path, on_bytes=bar.update,
                             verify=verified.append if r.verify else None, merge=r.merge, jobs=r.jobs, report=report,
                             schedule=schedule)
    summary = verified
    if modelfile is not None and ollama is not None:
        write_text(*modelfile)
        summary.append(f"wrote {modelfile[0]}; import with: cd {output_path.parent} && ollama create "
                       f"{ollama.name.split(':')[0].split('/')[-1]}-abliterated -f Modelfile")
    summary += _fidelity_lines(report, "error of the added component" if r.steer is not None else
                               "error of the amplified component" if r.reverse else
                               "share of the removed component put back")
    summary.append(f"wrote {', '.join(str(p) for p in written)}")
    return EditResult(written, summary, report)


def _strength_from_file(r: EditRequest, direction: Direction, ui: Ui) -> EditRequest:
    """A capability search's pick records its signed strength (`edit_strength`: positive removes
    the component, negative amplifies it); the edit takes it unless told --scale or --reverse."""
    given = direction.metadata.get("edit_strength")
    if given is None or r.scale is not None or r.reverse or r.steer is not None:
        return r
    try:
        value = float(given)
    except ValueError:
        raise UserError(f"{r.direction}: edit_strength {given[:40]!r} is not a number") from None
    if not np.isfinite(value):
        raise UserError(f"{r.direction}: edit_strength {given[:40]!r} is not a finite number")
    ui.say(f"strength {value:+g} from {r.direction.name} (the search's pick, "
           f"{'amplifying' if value < 0 else 'removing'} the component; --scale or --reverse overrides it)")
    return replace(r, scale=abs(value), reverse=value < 0)


def _refuse_combinations(r: EditRequest, budget: float | None) -> None:
    if budget is not None and (r.requant_type is not None or r.out_format is OutFormat.LORA):
        raise UserError("--size-budget chooses which edited tensors to store larger; it does not go with "
                        + ("--requant-type, which stores them all as one type" if r.requant_type is not None
                           else "--format lora, which stores no weights"))
    if r.steer is not None:
        given = [flag for flag, on in (("--reverse", r.reverse), ("--scale", r.scale is not None),
                                        ("--layers", r.layers), ("--embeddings/--no-embeddings", r.embeddings is not None),
                                        ("--method", r.method), ("--trial", r.trial is not None),
                                        ("--heads", r.heads is not None)) if on]
        if given:
            raise UserError(f"--steer adds one vector at the direction's block, in its MLP down projection: "
                            f"drop {', '.join(given)}")


def _rounding(r: EditRequest, model: Model, direction: Direction, ui: Ui) -> tuple[Rounding, StoredMoments | None]:
    """The rounding the edit uses, and the statistics it rounds by (None for gptq: measure them)."""
    if r.out_format is OutFormat.LORA:  # an adapter stores no rounded weights
        return (Rounding.AWARE if r.rounding is Rounding.AUTO else r.rounding), None
    given, unusable = given_statistics(model, direction, r.direction, r.statistics)
    if unusable is not None and r.rounding in (Rounding.AUTO, Rounding.GPTQ):
        ui.say(f"note: {unusable}")
    return resolve_rounding(r.rounding, given, model)


def _plan(r: EditRequest, model: Model, direction: Direction, opts: EditOptions,
          ui: Ui) -> tuple[EditPlan, Direction, dict[str, object] | None]:
    """The plan; for a search result, its scheduled trial (whose direction replaces the file's)."""
    sched = None if r.steer is not None else scheduled_edit(direction, r.trial)
    if sched is not None and r.method is not None and Method(r.method) is not sched.method:
        raise UserError(f"the direction file's edit is {sched.method.value}; drop --method")
    if r.steer is not None:
        return steer_plan(model, direction, r.steer, opts), direction, None
    if sched is None:
        spec = r.heads if r.heads is not None else direction.metadata.get("heads")
        try:
            heads = parse_heads(spec)
        except UserError as e:
            raise UserError(f"{'--heads' if r.heads is not None else r.direction}: {e}") from None
        plan = plan_edit(model, opts, method=Method(r.method or Method.PLAIN.value), heads=heads)
        if heads is not None:
            ui.say(f"head-restricted edit: only the attention output columns of heads {format_heads(heads)}"
                   + ("" if r.heads is not None else " (chosen by the direction file; --heads all edits every writer)"))
        return plan, direction, None
    sched.direction.check_fits(model.n_layer, model.n_embd, model.arch)
    ui.say(f"scheduled edit: trial {sched.trial if sched.trial is not None else '-'}, {sched.method.value} "
           f"projection, per-block strengths "
           + " ".join(f"{c.value} {_strengths(s)}" for c, s in sched.strengths.items()))
    plan = plan_edit(model, opts, strengths=sched.strengths, method=sched.method)
    return plan, sched.direction, {"trial": sched.trial, "method": sched.method.value}


def _describe(r: EditRequest, model: Model, plan: EditPlan, direction: Direction, opts: EditOptions,
              schedule: dict[str, object] | None, ui: Ui) -> None:
    """What is about to be done, before the long work."""
    for notice in plan.notices:
        ui.say(f"note: {notice}")
    behaviour = direction.behaviour or "the behaviour"
    if r.steer is not None:
        (e,) = plan.edits.values()
        ui.say(f"steering {model.path.name} ({model.arch}): adding {r.steer:g} x the mean difference ({e.coef:+.3g} "
               f"along the direction, on average over tokens) to block {e.block}'s MLP output, towards "
               f"{'more' if r.steer > 0 else 'less'} {behaviour}: {e.name}")
        return
    mode = "reverse-abliterating" if r.reverse else "abliterating"
    changed = sum(e.coef != 0 or e.out_type != e.src_type for e in plan.edits.values())
    ui.say(f"{mode} {model.path.name} ({model.arch}, blocks {format_layers(plan.layers)}, scale {opts.scale:g}): "
           f"{changed} tensors")
    lean = lean_of(direction) if schedule is None else None
    if lean is not None:
        ui.say(f"note: {lean.describe_edit(behaviour, r.reverse, opts.scale)}")


def _write_lora(model: Model, plan: EditPlan, direction: Direction, opts: EditOptions,
                schedule: dict[str, object] | None, input_path: Path, output_path: Path, ui: Ui) -> EditResult:
    from gguf_abliterate.export.lora import write_lora

    exact = {e.method for e in plan.edits.values()} - {m for m, rec in METHODS.items() if rec.low_rank}
    if exact:
        raise UserError(f"a {sorted(exact)[0].value} edit ({METHODS[sorted(exact)[0]].about}) is one no low-rank "
                        f"adapter expresses exactly; write it as a GGUF (--format gguf)")
    skipped = write_lora(model, plan, direction, output_path, provenance(plan, opts, direction, schedule))
    if skipped:
        ui.say(f"note: an adapter cannot hold {len(skipped)} of the edits (biases, expert stacks, token_embd): "
               f"{', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}")
    return EditResult([output_path], [f"wrote {output_path} (LoRA adapter: llama-cli -m {input_path} --lora "
                                      f"{output_path})"])


def _strengths(s: np.ndarray) -> str:
    """Per-block strengths, compactly: 0 as '.', others to one decimal."""
    return "[" + " ".join("." if v == 0 else f"{v:.1f}" for v in np.asarray(s).tolist()) + "]"


def _fidelity_lines(report: Report, what: str) -> list[str]:
    summary = report.summary()
    if not summary:
        return []
    return [f"requantization ({what}; weight RMSE):"] + [
        f"  {qtype:<6} {s['tensors']:4d} tensors  leak median {s['leak_median']:.2%} worst "
        f"{s['leak_worst']:.2%}  RMSE median {s['rmse_median']:.3g} worst {s['rmse_worst']:.3g}"
        for qtype, s in summary.items()]
