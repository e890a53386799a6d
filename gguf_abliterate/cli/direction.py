"""`direction`: compute the direction to remove from the model itself, on CPU."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import click
import numpy as np

from gguf_abliterate.cli.common import (
    Command,
    Finite,
    InputName,
    InputPath,
    OutputPath,
    check_report,
    progress,
    sayer,
    user_errors,
)
from gguf_abliterate.direction.measure import DEFAULT_MAX_KL
from gguf_abliterate.errors import UserError

if TYPE_CHECKING:
    from gguf_abliterate.direction.packs import Pack


class Engine(str, Enum):
    """What computes the residual stream."""

    LLAMA = "llama"  # llama.cpp's eval-callback hook
    TORCH = "torch"  # a CPU torch pass over the dequantized weights


def measure_direction(model_path: Path, output_path: Path, *, pack: Pack | None = None, layer: str = "auto",
                      max_kl: float | None = None, score_prompts: int | None = None, raw: bool = False,
                      engine: Engine = Engine.LLAMA, report: Path | None = None, force: bool = False,
                      quiet: bool = False) -> int:
    """Measure every block's direction for a behaviour pack (refusal by default), choose one,
    write the file (and, with `report`, its HTML report); returns the chosen block."""
    from gguf_abliterate import names
    from gguf_abliterate.arch import steerable_blocks
    from gguf_abliterate.direction import prompts as P
    from gguf_abliterate.direction.file import check_direction_path, save_measured
    from gguf_abliterate.direction.lean import measure_lean
    from gguf_abliterate.direction.measure import candidate_layers, choose_layer, difference_of_means
    from gguf_abliterate.direction.packs import SCORE_PROBES, STEER_BELOW, load_pack
    from gguf_abliterate.edit.moments import encode_statistics, statistics_path, write_statistics
    from gguf_abliterate.gguf_io import Model
    from gguf_abliterate.gguf_io.atomic import claim_outputs
    from gguf_abliterate.quants.rounding import column_block
    from gguf_abliterate.runtime.llama import LlamaModel

    say = sayer(quiet)
    pack = pack or load_pack("refusal")
    check_direction_path(output_path)
    keeps_statistics = output_path.suffix.lower() == ".safetensors" and engine is Engine.LLAMA
    stats_path = statistics_path(output_path) if keeps_statistics else None
    claim_outputs([output_path, *([stats_path] if stats_path else [])], [model_path], force)
    if report is not None:
        if output_path.suffix.lower() != ".safetensors":
            raise UserError("--report charts the per-block statistics, which only a .safetensors output keeps")
        check_report(report, [model_path, output_path], force)
    meta = Model(model_path)
    with LlamaModel(model_path, chat=not raw) as model:
        if model.template is None and not raw:
            say("note: the model has no chat template; prompts are fed as raw text")
        n_layer = model.n_layer
        if layer != "auto" and not (layer.isdigit() and int(layer) < n_layer):
            raise UserError(f"--layer must be 'auto' or a block number 0-{n_layer - 1}")
        d_pos, d_neg = pack.direction_sets()
        if engine is Engine.TORCH:
            from gguf_abliterate.runtime.torch_pass import TorchModel

            tm = TorchModel(meta)
            say("computing residuals with the torch engine")
            stats = difference_of_means(tm.last_token_residuals(model.encode(d_pos)),
                                        tm.last_token_residuals(model.encode(d_neg)))
            del tm
            mlp_means = None
        else:
            with (progress(len(d_pos) + len(d_neg), "residuals", "prompt", quiet) as bar, model.mlp_inputs() as mlp,
                  model.input_moments(column_block) as moments):
                stats = difference_of_means(model.residuals(d_pos, bar.update), model.residuals(d_neg, bar.update))
            mlp_means = mlp.means()
            # the same passes give what gptq rounding needs: written beside the direction, the edit
            # runs no model for it (written last, with the direction file)
            stored = (encode_statistics(meta, moments, f"direction ({pack.name}, {len(d_pos) + len(d_neg)} prompts)")
                      if stats_path is not None else None)
            del moments
        scores = np.full(n_layer, np.nan, np.float32)
        kl = np.full(n_layer, np.nan, np.float32)
        info: dict[str, str] = {}
        candidates = candidate_layers(n_layer)
        if layer == "auto" and pack.measure is None:
            chosen = max(candidates, key=lambda c: stats.separation[c])
            say(f"note: pack {pack.name!r} has no measure, so block {chosen} was chosen by separation alone "
                f"(a pack file with a measure, or --layer N, chooses better)")
            info = {"candidates": ",".join(map(str, candidates))}
        elif layer == "auto":
            score_prompts = score_prompts or (32 if pack.first_token else SCORE_PROBES)
            max_kl = max_kl if max_kl is not None else (DEFAULT_MAX_KL if pack.first_token else float("inf"))
            harmless = pack.negative if pack.name == "refusal" else load_pack("refusal").negative
            v_good = P.split(list(harmless), "validation")[:score_prompts]
            measure = pack.layer_measure()
            with progress(len(candidates), "scoring layers", "layer", quiet) as bar:
                choice = choose_layer(model, stats, pack.layer_scorer(model, score_prompts), v_good, candidates,
                                      max_kl, bar.update, None if pack.first_token else STEER_BELOW,
                                      steerable_blocks(meta.arch, n_layer, meta.tensors))
            chosen, candidates = choice.layer, choice.candidates
            for c in candidates:
                scores[c], kl[c] = choice.score[c], choice.kl[c]
            test = "steering (+ the mean difference after the block)" if choice.steered else "ablation"
            say(f"{pack.name}: {measure} without an edit: {choice.baseline:.3f}; candidates tested by {test}")
            say(f"{'layer':>5} {'score':>8} {'KL':>8} {'separation':>10}")
            for c in candidates:
                mark = "  <- chosen" if c == chosen else ("  (KL too high)" if kl[c] > max_kl else "")
                say(f"{c:5d} {scores[c]:8.3f} {kl[c]:8.4f} {stats.separation[c]:10.2f}{mark}")
            if kl[chosen] > max_kl:
                say(f"note: no candidate kept the KL within --max-kl {max_kl:g}; took the lowest-KL one. "
                    f"Check the prompts (a base model without a chat template often has no refusal to find).")
            info = {"candidates": ",".join(map(str, candidates)), "max_kl": str(max_kl),
                    "layer_measure": measure, "baseline_score": f"{choice.baseline:.6f}", "layer_test": test,
                    "score_prompts": str(min(score_prompts, len(pack.probes)))}
        else:
            chosen = int(layer)
        with progress(len(pack.probes), "probes' lean", "prompt", quiet) as bar:
            lean = measure_lean(model, [p.prompt for p in pack.probes], stats.directions[chosen], chosen,
                                stats.harmless_mean[chosen], float(stats.diff_norm[chosen]), bar.update)
        say(f"{pack.name} at block {chosen}: {lean.describe(pack.name)}")
        if mlp_means is not None:
            say(f"--steer S adds S mean differences at block {chosen} instead, towards more {pack.name} whatever the "
                f"lean (negative S: less)")
    metadata = {
        "chosen_by": "auto" if layer == "auto" else "user",
        "model": meta.get_str(names.NAME) or model_path.name, "architecture": meta.arch,
        "n_embd": str(stats.directions.shape[1]), "n_layer": str(n_layer), **pack.metadata(),
        "chat_template": "raw" if raw else "model", "engine": engine.value, **info, **lean.metadata(),
    }
    statistics = {"harmful_mean_norm": stats.harmful_norm, "harmless_mean_norm": stats.harmless_norm,
                  "diff_norm": stats.diff_norm, "separation": stats.separation, "layer_score": scores, "kl": kl}
    if stats_path is not None and stored is not None:
        metadata |= {"statistics": stats_path.name, "statistics_sha256": stored.sha256}
        write_statistics(stats_path, stored)
    try:
        save_measured(output_path, stats.directions, stats.harmless_mean, chosen, statistics, metadata, mlp_means)
    except BaseException:
        if stats_path is not None:
            stats_path.unlink(missing_ok=True)
        raise
    say(f"wrote {output_path} ({pack.name} direction, layer {chosen})")
    if stats_path is not None and stored is not None:
        say(f"wrote {stats_path}: the writers' input statistics ({stored.tokens} tokens), which the edit finds "
            f"through the direction file and rounds by (gptq)")
    elif engine is Engine.LLAMA:
        say("note: a .npy direction carries no input statistics, so the edit rounds aware (write .safetensors to "
            "keep them, or edit with --rounding gptq to measure them)")
    if report is not None:
        from gguf_abliterate.report import write_report

        write_report(report, f"gguf-abliterate direction: {model_path.name}", direction_files=[output_path])
        say(f"wrote {report}")
    return chosen


def choose_pack(behaviour: str | None, harmful: Path | None = None, harmless: Path | None = None,
                positive: Path | None = None, negative: Path | None = None, name: str | None = None) -> Pack:
    """The pack the prompt options name: --behaviour, --positive/--negative, or the refusal
    pack (with --harmful/--harmless replacing its sets)."""
    from gguf_abliterate.direction.packs import load_pack, pack_from_files, refusal_pack

    if behaviour is not None and (harmful or harmless or positive or negative):
        raise UserError("--behaviour brings its own prompt sets: drop --harmful/--harmless/--positive/--negative")
    if (positive is None) != (negative is None):
        raise UserError("--positive and --negative go together")
    if positive is not None and (harmful or harmless):
        raise UserError("--harmful/--harmless are the refusal pack's sets: use them or --positive/--negative")
    if name is not None and positive is None:
        raise UserError("--name names a pack made with --positive and --negative")
    if behaviour is not None:
        return load_pack(behaviour)
    if positive is not None and negative is not None:
        return pack_from_files(positive, negative, name or "custom")
    return refusal_pack(harmful, harmless)


@click.command("direction", cls=Command)
@click.argument("model_path", metavar="MODEL", type=InputPath())
@click.option("-o", "--output", "output_path", required=True, type=OutputPath(),
              help=".safetensors (all layers, statistics, metadata) or .npy (the chosen layer's vector).")
@click.option("--behaviour", metavar="NAME|PACK.json", type=InputName(),
              help="The behaviour pack: refusal (the default), reasoning, concise, or a pack file (see the README).")
@click.option("--positive", type=InputPath(),
              help="Prompts that show the behaviour: .txt (one per line), .json or .jsonl.")
@click.option("--negative", type=InputPath(),
              help="The same topics without the behaviour, same formats (with --positive).")
@click.option("--name", help="The behaviour's name, recorded in the file (with --positive/--negative).")
@click.option("--harmful", type=InputPath(),
              help="The refusal pack's positive set from this file instead of the built-in one.")
@click.option("--harmless", type=InputPath(), help="The refusal pack's negative set, likewise.")
@click.option("--layer", default="auto", show_default=True,
              help="Block whose output (l_out-L) gives the direction, or 'auto' to test candidates by ablation.")
@click.option("--max-kl", type=Finite(min=0), default=None,
              help=f"With --layer auto: largest first-token KL on harmless prompts a candidate may cause (default: "
                   f"{DEFAULT_MAX_KL:g} for refusal; none for packs scored by generation, whose behaviour changes "
                   f"harmless answers too).")
@click.option("--score-prompts", type=click.IntRange(min=1), default=None,
              help="With --layer auto: validation prompts used to score each candidate (default: 32 for refusal, "
                   "16 for packs scored by generating answers).")
@click.option("--raw", is_flag=True, help="Feed prompts as raw text instead of through the model's chat template.")
@click.option("--engine", type=click.Choice([e.value for e in Engine]), default=Engine.LLAMA.value,
              show_default=True,
              help="What computes the residual stream: llama.cpp's hook, or a CPU torch pass over the "
                   "dequantized weights (llama, qwen2, gemma3). Layer scoring always runs in llama.cpp.")
@click.option("--report", type=OutputPath(), metavar="FILE.html",
              help="Also write an HTML report: per-block statistics and the candidate layers' scores, charted.")
@click.option("--force", is_flag=True, help="Replace the output file and the report if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@user_errors
def command(model_path: Path, output_path: Path, behaviour: str | None, positive: Path | None,
            negative: Path | None, name: str | None, harmful: Path | None, harmless: Path | None, layer: str,
            max_kl: float | None, score_prompts: int | None, raw: bool, engine: str, report: Path | None, force: bool,
            quiet: bool) -> None:
    """Compute a behaviour's direction in MODEL itself, on CPU (llama.cpp hooks).

    Difference of means of the residual stream after each block at the last prompt token,
    the pack's positive prompts minus its negative ones (refusal: harmful minus harmless).
    Even lines of each set make the direction, odd lines validate it. With --layer auto,
    each candidate layer's direction is ablated from the residual stream and scored by the
    pack's measure (refusal: refusal-opening probability; other packs: short greedy answers
    to the probes) and by KL on harmless prompts. Abliterating with the file pulls the
    component along the direction to zero; --reverse amplifies it on whichever side the model
    leans to, so the command ends by saying where the pack's probes sit and which way each
    edit moves them.
    """
    pack = choose_pack(behaviour, harmful, harmless, positive, negative, name)
    measure_direction(model_path, output_path, pack=pack, layer=layer, max_kl=max_kl, score_prompts=score_prompts,
                      raw=raw, engine=Engine(engine), report=report, force=force, quiet=quiet)
