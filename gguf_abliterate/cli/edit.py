"""The default command: edit INPUT's weights, write OUTPUT (a GGUF, or a LoRA adapter)."""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np
from gguf import GGMLQuantizationType

from gguf_abliterate.cli.common import (
    MAX_JOBS,
    MAX_STRENGTH,
    WRITABLE,
    Command,
    Finite,
    InputPath,
    Say,
    progress,
    qtype_option,
    sayer,
    user_errors,
)
from gguf_abliterate.edit.options import EditOptions, OutFormat, Rounding, format_layers, parse_layers
from gguf_abliterate.errors import UserError
from gguf_abliterate.quants.fidelity import Report

HELP = """Remove (abliterate), amplify (--reverse) or add (--steer) a direction in INPUT's weights; write OUTPUT.

Every matrix that writes into the residual stream (attn_output, ffn_down, MoE experts, and
token_embd unless tied to the output head) is dequantized, projected and requantized to its
own type; every other tensor is copied byte for byte. OUTPUT appears only when complete.

\b
  gguf-abliterate in.gguf out.gguf --direction d.npy
  gguf-abliterate in.gguf out.gguf --direction d.safetensors --reverse --scale 0.5 --layers 8-20
  gguf-abliterate in.gguf out.gguf --direction concise.safetensors --steer 0.25
"""


def edit_model(input_path: Path, output_path: Path, direction_path: Path, *, reverse: bool = False,
               scale: float | None = None, steer: float | None = None, layers: str | None = None,
               embeddings: bool | None = None, requant_type: GGMLQuantizationType | None = None,
               rounding: Rounding = Rounding.AUTO, force: bool = False, jobs: int | None = None, merge: bool = False,
               out_format: OutFormat = OutFormat.GGUF, verify: bool = False, ollama_name: str | None = None,
               lmstudio: bool = False, trial: int | None = None, method: str | None = None,
               size_budget: str | None = None, statistics: Path | None = None, quiet: bool = False,
               verbose: bool = False) -> list[Path]:
    """The edit as the command runs it; with `ollama_name`, `input_path` is ignored and the
    model comes from the Ollama store. A direction file from `optimise` bakes its chosen
    trial (or `trial`); `steer` adds a vector instead of projecting. Returns the files written."""
    from gguf_abliterate.direction.file import load_direction
    from gguf_abliterate.direction.lean import lean_of
    from gguf_abliterate.edit.budget import apply_upgrades, measurement_pieces, parse_budget, spend_budget
    from gguf_abliterate.edit.execute import apply_edit, default_jobs, output_nbytes
    from gguf_abliterate.edit.plan import plan_edit
    from gguf_abliterate.edit.provenance import provenance
    from gguf_abliterate.edit.schedule import Method, scheduled_edit
    from gguf_abliterate.edit.steer import steer_plan
    from gguf_abliterate.export import lmstudio as lms
    from gguf_abliterate.export import ollama as oll
    from gguf_abliterate.gguf_io import Model, output_paths
    from gguf_abliterate.gguf_io.atomic import claim_outputs, write_text

    say = sayer(quiet)
    budget = None if size_budget is None else parse_budget(size_budget)
    if budget is not None and (requant_type is not None or out_format is OutFormat.LORA):
        raise UserError("--size-budget chooses which edited tensors to store larger; it does not go with "
                        + ("--requant-type, which stores them all as one type" if requant_type is not None
                           else "--format lora, which stores no weights"))
    if steer is not None:
        given = [flag for flag, on in (("--reverse", reverse), ("--scale", scale is not None), ("--layers", layers),
                                        ("--embeddings/--no-embeddings", embeddings is not None), ("--method", method),
                                        ("--trial", trial is not None)) if on]
        if given:
            raise UserError(f"--steer adds one vector at the direction's block, in its MLP down projection: "
                            f"drop {', '.join(given)}")
    ollama = None
    if ollama_name:
        ollama = oll.resolve_ollama(ollama_name)
        input_path = ollama.gguf
    if lmstudio:
        output_path = lms.lmstudio_path(output_path.name)
        output_path.parent.mkdir(parents=True, exist_ok=True)
    model = Model(input_path)
    modelfile = None if ollama is None else (output_path.parent / "Modelfile", oll.modelfile(output_path.name, ollama))
    claim_outputs([*output_paths(model, output_path, merge), *([modelfile[0]] if modelfile else [])],
                  [*(p.path for p in model.parts), direction_path, *([statistics] if statistics else [])], force)
    direction = load_direction(direction_path)
    direction.check_fits(model.n_layer, model.n_embd, model.arch)
    scale = 1.0 if scale is None else scale
    stored, asked = None, rounding
    if out_format is OutFormat.LORA:  # an adapter stores no rounded weights
        rounding = Rounding.AWARE if rounding is Rounding.AUTO else rounding
    else:
        from gguf_abliterate.edit.moments import given_statistics, resolve_rounding

        given, unusable = given_statistics(model, direction, direction_path, statistics)
        if unusable is not None and rounding in (Rounding.AUTO, Rounding.GPTQ):
            say(f"note: {unusable}")
        rounding, stored = resolve_rounding(rounding, given, model)
    opts = EditOptions(reverse=reverse, scale=scale, layers=parse_layers(layers, model.n_layer),
                       embeddings=embeddings, requant_type=requant_type, rounding=rounding, steer=steer,
                       size_budget=budget)
    sched = None if steer is not None else scheduled_edit(direction, trial)
    schedule_info = None
    if sched is not None and method is not None and Method(method) is not sched.method:
        raise UserError(f"the direction file's edit is {sched.method.value}; drop --method")
    if steer is not None:
        plan = steer_plan(model, direction, steer, opts)
    elif sched is None:
        plan = plan_edit(model, opts, method=Method(method or Method.PLAIN.value))
    else:
        direction = sched.direction
        direction.check_fits(model.n_layer, model.n_embd, model.arch)
        plan = plan_edit(model, opts, strengths=sched.strengths, method=sched.method)
        schedule_info = {"trial": sched.trial, "method": sched.method.value}
        say(f"scheduled edit: trial {sched.trial if sched.trial is not None else '-'}, {sched.method.value} "
            f"projection, per-block strengths attn {_strengths(sched.strengths['attn'])} "
            f"mlp {_strengths(sched.strengths['mlp'])}")
    for notice in plan.notices:
        say(f"note: {notice}")
    behaviour = direction.behaviour or "the behaviour"
    if steer is not None:
        (e,) = plan.edits.values()
        say(f"steering {model.path.name} ({model.arch}): adding {steer:g} x the mean difference ({e.coef:+.3g} along "
            f"the direction, on average over tokens) to block {e.block}'s MLP output, towards "
            f"{'more' if steer > 0 else 'less'} {behaviour}: {e.name}")
    else:
        mode = "reverse-abliterating" if reverse else "abliterating"
        changed = sum(e.coef != 0 or e.out_type != e.src_type for e in plan.edits.values())
        say(f"{mode} {model.path.name} ({model.arch}, blocks {format_layers(plan.layers)}, scale {scale:g}): "
            f"{changed} tensors")
    lean = lean_of(direction) if sched is None and steer is None else None
    if lean is not None:
        say(f"note: {lean.describe_edit(behaviour, reverse, scale)}")
    if rounding is Rounding.GPTQ and out_format is OutFormat.GGUF:
        from gguf_abliterate.edit.moments import PROMPTS, attach_moments, measure_and_store

        if stored is None:
            with progress(2 * PROMPTS, "measuring the writers' inputs", "prompt", quiet) as bar:
                stored = measure_and_store(model, bar.update)
        count = attach_moments(model, plan, stored)
        say(f"gptq rounding: {count} of {len(plan.edits)} edited tensors weigh their rounding by their inputs' "
            f"statistics ({stored.describe()}); the others are rounded aware")
    elif asked is Rounding.AUTO and out_format is OutFormat.GGUF and any(e.aware for e in plan.edits.values()):
        say("aware rounding: the edit is given no input statistics of this model (`direction` writes them beside a "
            ".safetensors direction file, and the edit then finds them; or --statistics FILE, or --rounding gptq to "
            "measure them now); with them it rounds with about half the output error")
    if budget is not None:
        todo = measurement_pieces(model, plan, direction)
        with progress(len(todo), "measuring requantization error", "piece", quiet) as bar:
            spent = spend_budget(model, plan, todo, budget, jobs or default_jobs(model, plan), bar.update)
        apply_upgrades(plan, spent)
        say(f"size budget {size_budget.strip()} ({spent.budget_bytes / 1e6:.1f} MB): {spent.describe()} stored "
            f"larger for {spent.extra_bytes / 1e6:.1f} MB, removing {spent.error_removed:.0%} of the edited "
            f"tensors' requantization error")
    if verbose:
        for e in plan.edits.values():
            say(f"  {e.name}  {e.src_type.name} -> {e.out_type.name}")
    if out_format is OutFormat.LORA:
        from gguf_abliterate.export.lora import write_lora

        if any(e.method is Method.NORM_PRESERVING for e in plan.edits.values()):
            raise UserError("a norm-preserving edit rescales every column of a writer, which no low-rank "
                            "adapter expresses exactly; write it as a GGUF (--format gguf)")
        skipped = write_lora(model, plan, direction, output_path, provenance(plan, opts, direction, schedule_info))
        if skipped:
            say(f"note: an adapter cannot hold {len(skipped)} of the edits (biases, expert stacks, token_embd): "
                f"{', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}")
        say(f"wrote {output_path} (LoRA adapter: llama-cli -m {input_path} --lora {output_path})")
        return [output_path]
    verified: list[str] = []
    report = Report()
    with progress(output_nbytes(model, plan), "writing", "B", quiet, unit_scale=True) as bar:
        written = apply_edit(model, plan, direction, opts, output_path, on_bytes=bar.update,
                             verify=verified.append if verify else None, merge=merge, jobs=jobs, report=report,
                             schedule=schedule_info)
    for line in verified:
        say(line)
    if modelfile is not None:
        mf = modelfile[0]
        write_text(mf, modelfile[1])
        say(f"wrote {mf}; import with: cd {output_path.parent} && ollama create "
            f"{ollama.name.split(':')[0].split('/')[-1]}-abliterated -f Modelfile")
    _say_report(say, report, "error of the added component" if steer is not None else
                "error of the amplified component" if reverse else "share of the removed component put back")
    say(f"wrote {', '.join(str(p) for p in written)}")
    return written


def _strengths(s: np.ndarray) -> str:
    """Per-block strengths, compactly: 0 as '.', others to one decimal."""
    return "[" + " ".join("." if v == 0 else f"{v:.1f}" for v in np.asarray(s).tolist()) + "]"


def _say_report(say: Say, report: Report, what: str) -> None:
    summary = report.summary()
    if not summary:
        return
    say(f"requantization ({what}; weight RMSE):")
    for qtype, s in summary.items():
        say(f"  {qtype:<6} {s['tensors']:4d} tensors  leak median {s['leak_median']:.2%} worst "
            f"{s['leak_worst']:.2%}  RMSE median {s['rmse_median']:.3g} worst {s['rmse_worst']:.3g}")


@click.command("edit", cls=Command, help=HELP)
@click.argument("paths", nargs=-1, metavar="INPUT OUTPUT", type=click.Path(path_type=Path))
@click.option("--direction", "direction_path", required=True, type=InputPath(),
              help="Direction file: .npy or .safetensors, one vector (n_embd) or one per block (n_layer, n_embd).")
@click.option("--reverse", is_flag=True, help="Amplify the direction (W + S u u^T W) instead of removing it.")
@click.option("--scale", type=Finite(-MAX_STRENGTH, MAX_STRENGTH), default=None,
              help="Strength S: 1 (the default) removes the component fully; 0 changes nothing.")
@click.option("--steer", type=Finite(-MAX_STRENGTH, MAX_STRENGTH), default=None, metavar="S",
              help="Instead of projecting: add S times the behaviour's mean difference (positive minus negative "
                   "prompts, at the direction's block) to that block's MLP output, baked into its ffn_down as a "
                   "rank-1 term. Moves answers towards the positive side whichever way the model leans (negative S: "
                   "the other way); try 0.1-0.5. Needs a .safetensors file from `direction`.")
@click.option("--layers", default=None, metavar="A-B",
              help="Blocks to edit, 0-based and inclusive, e.g. 4-20 or 3,5,8-12. Default: all.")
@click.option("--embeddings/--no-embeddings", default=None,
              help="Edit token_embd too. Default: yes, unless it is tied to the output head.")
@click.option("--requant-type", type=click.Choice(WRITABLE, case_sensitive=False), callback=qtype_option,
              help="Store the edited matrices as this type instead of their own (e.g. f32, f16, q8_0).")
@click.option("--size-budget", default=None, metavar="+N%",
              help="Let the file grow by up to N% of its size: the edited matrices whose requantization error "
                   "(measured against the float edit) is largest per extra byte are stored as Q5_K, Q6_K or Q8_0. "
                   "Measuring runs the edit once per type, so the edit takes about four times as long.")
@click.option("--rounding", type=click.Choice([r.value for r in Rounding]), default=Rounding.AUTO.value,
              show_default=True,
              help="aware: keep ggml's block scales but re-round single codes so requantization does not "
                   "put the removed component back (snap-back); nearest: plain ggml rounding; gptq: aware, and "
                   "each rounding error offset in the columns its matrix's inputs correlate with (about half the "
                   "output error of aware; the edit takes about 1.5x as long), by the statistics the edit is given "
                   "(--statistics, or those the direction file names), or else measured by running 64 prompts "
                   "through llama.cpp (needs llama-cpp-python; cached, which saves time but changes no byte); "
                   "auto: gptq if the edit is given statistics, else aware.")
@click.option("--statistics", type=InputPath(), metavar="FILE",
              help="The input statistics gptq rounding weighs by (a .statistics.safetensors file `direction` "
                   "wrote). Default: those the direction file names, if any.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new file is complete).")
@click.option("-j", "--jobs", type=click.IntRange(min=1, max=MAX_JOBS), default=None,
              help="Worker processes for the edit. Default: all cores for large edits, 1 for small ones.")
@click.option("--merge", is_flag=True, help="Write a split input as one OUTPUT file instead of parts like it.")
@click.option("--format", "out_format", type=click.Choice([f.value for f in OutFormat]), default=OutFormat.GGUF.value,
              show_default=True,
              help="gguf: the whole edited model. lora: the edit as an exact rank-1 LoRA adapter for "
                   "llama.cpp (--lora), a few hundred KB.")
@click.option("--verify", is_flag=True,
              help="Before OUTPUT takes its place, re-read it: types, shapes, offsets, untouched tensors byte-identical.")
@click.option("--ollama", "ollama_name", metavar="MODEL[:TAG]",
              help="Take INPUT from the local Ollama store (give only OUTPUT); a Modelfile with the "
                   "original template, system prompt and parameters is written beside OUTPUT.")
@click.option("--lmstudio", is_flag=True,
              help="Put OUTPUT (a file name) under LM Studio's models folder, local/<name>/, so the app lists it.")
@click.option("--method", type=click.Choice(["plain", "norm-preserving"]), default=None,
              help="plain (default): W - S u u^T W. norm-preserving: the same, then every column of a writer "
                   "(what one input feature writes into the residual stream) rescaled to its old length.")
@click.option("--trial", type=click.IntRange(min=0), default=None,
              help="With a direction file from optimise: bake this trial instead of the chosen one.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="List every edited tensor.")
@user_errors
def command(paths: tuple[Path, ...], direction_path: Path, reverse: bool, scale: float | None, steer: float | None,
            layers: str | None, embeddings: bool | None, requant_type: GGMLQuantizationType | None, rounding: str,
            force: bool, jobs: int | None, merge: bool, out_format: str, verify: bool, ollama_name: str | None,
            lmstudio: bool, method: str | None, trial: int | None, size_budget: str | None,
            statistics: Path | None, quiet: bool, verbose: bool) -> None:
    if ollama_name:
        if len(paths) != 1:
            raise UserError("with --ollama give only OUTPUT: the input comes from the Ollama store")
        input_path, output_path = Path(), paths[0]
    elif len(paths) != 2:
        raise UserError("expected INPUT OUTPUT (see --help)")
    else:
        input_path, output_path = paths
    edit_model(input_path, output_path, direction_path, reverse=reverse, scale=scale, steer=steer, layers=layers,
               embeddings=embeddings, requant_type=requant_type, rounding=Rounding(rounding), force=force,
               jobs=jobs, merge=merge, out_format=OutFormat(out_format), verify=verify, ollama_name=ollama_name,
               lmstudio=lmstudio, trial=trial, method=method, size_budget=size_budget, statistics=statistics,
               quiet=quiet, verbose=verbose)
