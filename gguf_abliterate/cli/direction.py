"""`direction`: compute the direction to remove from the model itself, on CPU."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import click
import numpy as np

from gguf_abliterate.cli.common import check_report, progress, sayer, user_errors
from gguf_abliterate.direction.measure import DEFAULT_MAX_KL
from gguf_abliterate.errors import UserError


class Engine(str, Enum):
    """What computes the residual stream."""

    LLAMA = "llama"  # llama.cpp's eval-callback hook
    TORCH = "torch"  # a CPU torch pass over the dequantized weights


def measure_direction(model_path: Path, output_path: Path, *, harmful: Path | None = None,
                      harmless: Path | None = None, layer: str = "auto", max_kl: float = DEFAULT_MAX_KL,
                      score_prompts: int = 32, raw: bool = False, engine: Engine = Engine.LLAMA,
                      report: Path | None = None, force: bool = False, quiet: bool = False) -> int:
    """Measure every block's direction, choose one, write the file (and, with `report`, its
    HTML report); returns the chosen block."""
    from gguf_abliterate import names
    from gguf_abliterate.direction import prompts as P
    from gguf_abliterate.direction.file import check_direction_path, save_measured
    from gguf_abliterate.direction.measure import candidate_layers, choose_layer, difference_of_means
    from gguf_abliterate.gguf_io import Model
    from gguf_abliterate.runtime.llama import LlamaModel

    say = sayer(quiet)
    check_direction_path(output_path)
    if output_path.exists() and not force:
        raise UserError(f"{output_path} exists; pass --force to replace it")
    if report is not None:
        if output_path.suffix.lower() != ".safetensors":
            raise UserError("--report charts the per-block statistics, which only a .safetensors output keeps")
        check_report(report, [model_path, output_path])
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
        if engine is Engine.TORCH:
            from gguf_abliterate.runtime.torch_pass import TorchModel

            tm = TorchModel(meta)
            say("computing residuals with the torch engine")
            stats = difference_of_means(tm.last_token_residuals(model.encode(d_bad)),
                                        tm.last_token_residuals(model.encode(d_good)))
            del tm
        else:
            with progress(len(d_bad) + len(d_good), "residuals", "prompt", quiet) as bar:
                stats = difference_of_means(model.residuals(d_bad, bar.update), model.residuals(d_good, bar.update))
        refusal = np.full(n_layer, np.nan, np.float32)
        kl = np.full(n_layer, np.nan, np.float32)
        info: dict[str, str] = {}
        if layer == "auto":
            v_bad = P.split(bad, "validation")[:score_prompts]
            v_good = P.split(good, "validation")[:score_prompts]
            candidates = candidate_layers(n_layer)
            with progress(len(candidates), "scoring layers", "layer", quiet) as bar:
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
        "chosen_by": "auto" if layer == "auto" else "user",
        "model": meta.get_str(names.NAME) or model_path.name, "architecture": meta.arch,
        "n_embd": str(stats.directions.shape[1]), "n_layer": str(n_layer),
        "harmful_sha256": P.prompt_hash(bad), "harmless_sha256": P.prompt_hash(good),
        "chat_template": "raw" if raw else "model", "engine": engine.value, **info,
    }
    statistics = {"harmful_mean_norm": stats.harmful_norm, "harmless_mean_norm": stats.harmless_norm,
                  "diff_norm": stats.diff_norm, "separation": stats.separation, "refusal_mass": refusal, "kl": kl}
    save_measured(output_path, stats.directions, stats.harmless_mean, chosen, statistics, metadata)
    say(f"wrote {output_path} (layer {chosen})")
    if report is not None:
        from gguf_abliterate.report import write_report

        write_report(report, f"gguf-abliterate direction: {model_path.name}", direction_files=[output_path])
        say(f"wrote {report}")
    return chosen


@click.command("direction")
@click.argument("model_path", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output_path", required=True, type=click.Path(path_type=Path),
              help=".safetensors (all layers, statistics, metadata) or .npy (the chosen layer's vector).")
@click.option("--harmful", type=click.Path(path_type=Path),
              help="Prompts showing the behaviour: .txt (one per line), .json or .jsonl. Default: built in.")
@click.option("--harmless", type=click.Path(path_type=Path), help="Contrasting prompts, same formats.")
@click.option("--layer", default="auto", show_default=True,
              help="Block whose output (l_out-L) gives the direction, or 'auto' to test candidates by ablation.")
@click.option("--max-kl", type=float, default=DEFAULT_MAX_KL, show_default=True,
              help="With --layer auto: largest first-token KL on harmless prompts a candidate may cause.")
@click.option("--score-prompts", type=click.IntRange(min=1), default=32, show_default=True,
              help="With --layer auto: validation prompts per set used to score each candidate.")
@click.option("--raw", is_flag=True, help="Feed prompts as raw text instead of through the model's chat template.")
@click.option("--engine", type=click.Choice([e.value for e in Engine]), default=Engine.LLAMA.value,
              show_default=True,
              help="What computes the residual stream: llama.cpp's hook, or a CPU torch pass over the "
                   "dequantized weights (llama, qwen2, gemma3). Layer scoring always runs in llama.cpp.")
@click.option("--report", type=click.Path(path_type=Path), metavar="FILE.html",
              help="Also write an HTML report: per-block statistics and the candidate layers' scores, charted.")
@click.option("--force", is_flag=True, help="Replace the output file if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@user_errors
def command(model_path: Path, output_path: Path, harmful: Path | None, harmless: Path | None, layer: str,
            max_kl: float, score_prompts: int, raw: bool, engine: str, report: Path | None, force: bool,
            quiet: bool) -> None:
    """Compute the direction to remove from MODEL itself, on CPU (llama.cpp hooks).

    Difference of means of the residual stream after each block at the last prompt token,
    harmful minus harmless. Even lines of each prompt set make the direction, odd lines
    validate it. With --layer auto, each candidate layer's direction is ablated from the
    residual stream and scored by refusal-opening probability on harmful prompts and KL
    on harmless ones.
    """
    measure_direction(model_path, output_path, harmful=harmful, harmless=harmless, layer=layer, max_kl=max_kl,
                      score_prompts=score_prompts, raw=raw, engine=Engine(engine), report=report, force=force,
                      quiet=quiet)
