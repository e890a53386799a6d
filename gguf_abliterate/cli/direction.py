"""`direction`: compute the direction to remove from the model itself, on CPU."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from gguf_abliterate.cli.common import (Command, Finite, InputName, InputPath, OutputPath, cli_ui, sayer,
    thinking_options, user_errors)
from gguf_abliterate.direction.measure import DEFAULT_MAX_KL, FIRST_RUNG, Engine, Position
from gguf_abliterate.errors import UserError
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET

if TYPE_CHECKING:
    from gguf_abliterate.direction.packs import Pack
    from gguf_abliterate.runtime.thinking import Thinking


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
              help="The behaviour pack: refusal (the default), reasoning, concise, or a pack file (docs/packs.md).")
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
              help="With --layer auto: validation prompts (of each set) the last candidates are scored on; "
                   f"the first are scored on {FIRST_RUNG} (default: 32 for refusal, 16 for packs scored by generating "
                   f"answers).")
@click.option("--raw", is_flag=True, help="Feed prompts as raw text instead of through the model's chat template.")
@click.option("--engine", type=click.Choice([e.value for e in Engine]), default=Engine.LLAMA.value,
              show_default=True,
              help="What computes the residual stream: llama.cpp's hook, or a CPU torch pass over the "
                   "dequantized weights (llama, qwen2, gemma3). Layer scoring always runs in llama.cpp.")
@thinking_options
@click.option("--position", type=click.Choice([p.value for p in Position]), default=None,
              help="For a model that thinks: where each prompt is read. prompt: its last token, as rendered; "
                   "answer: where the final answer opens, past a closed empty thought; thought: the same, past "
                   "the model's own thought (generated first). Default: answer (prompt for a model that does "
                   "not think, where all three are the same).")
@click.option("--thought-tokens", type=click.IntRange(min=1), default=THOUGHT_BUDGET, show_default=True,
              help="With --position thought: tokens each generated thought may take (one that runs past them is "
                   "closed there); every contrast prompt and probe is generated first, so this bounds the cost.")
@click.option("--capability", metavar="FAMILY|FILE.jsonl", type=InputName(),
              help="Instead of two prompt sets: a capability direction from the model's own right and wrong answers "
                   "to generated problems (arithmetic, percent, code; or your problems, one JSON object with a "
                   "question and an integer answer a line). Per block, the residual stream averaged over the "
                   "answers' tokens, right minus wrong; the file names the attention heads that write most along "
                   "the failure side, and the edit then changes only those (docs/capability.md).")
@click.option("--problems", type=click.IntRange(min=16), default=256, show_default=True,
              help="With --capability: problems the model answers (from the direction split, never evaluated on).")
@click.option("--top-heads", "n_heads", type=click.IntRange(min=1), default=20, show_default=True,
              help="With --capability: how many attention heads the file names for the edit.")
@click.option("--finished-only", is_flag=True,
              help="With --capability: read the direction from the answers that finished within the budget only. "
                   "Answers the budget cut are mostly wrong and mostly loops, so with them the direction reads "
                   "finishing against running on as much as right against wrong.")
@click.option("--report", type=OutputPath(), metavar="FILE.html",
              help="Also write an HTML report: per-block statistics and the candidate layers' scores, charted.")
@click.option("--force", is_flag=True, help="Replace the output file and the report if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_context
@user_errors
def command(ctx: click.Context, model_path: Path, output_path: Path, behaviour: str | None, positive: Path | None,
            negative: Path | None, name: str | None, harmful: Path | None, harmless: Path | None, layer: str,
            max_kl: float | None, score_prompts: int | None, raw: bool, engine: str, thinking: Thinking,
            position: str | None, thought_tokens: int, capability: str | None, problems: int, n_heads: int,
            finished_only: bool, report: Path | None, force: bool, quiet: bool) -> None:
    """Compute a behaviour's direction in MODEL itself, on CPU (llama.cpp hooks).

    Difference of means of the residual stream after each block at the last prompt token,
    the pack's positive prompts minus its negative ones (refusal: harmful minus harmless).
    Even lines of each set make the direction, odd lines validate it. With --layer auto,
    each candidate layer's direction is ablated from the residual stream and scored by the
    pack's measure (refusal: refusal-opening probability; other packs: short greedy answers
    to the probes) and by KL on harmless prompts, by elimination: every candidate on the first
    2 validation prompts, the better half on twice as many, up to --score-prompts.
    Abliterating with the file pulls the component along the direction to zero; --reverse
    amplifies it on whichever side the model leans to, so the command ends by saying where the
    pack's probes sit and which way each edit moves them.
    """
    from gguf_abliterate.jobs.direction import DirectionRequest, run_direction

    if capability is not None:
        capability_direction(ctx, model_path, output_path, capability, problems, n_heads, finished_only, force, quiet)
        return
    if finished_only:
        raise UserError("--finished-only reads a capability's answers: give it with --capability")
    request = DirectionRequest(model=model_path, output=output_path,
                               pack=choose_pack(behaviour, harmful, harmless, positive, negative, name), layer=layer,
                               max_kl=max_kl, score_prompts=score_prompts, raw=raw, engine=Engine(engine),
                               thinking=thinking, position=None if position is None else Position(position),
                               thought_tokens=thought_tokens, report=report, force=force)
    say = sayer(quiet)
    for line in run_direction(request, cli_ui(quiet)).summary:
        say(line)


def capability_direction(ctx: click.Context, model_path: Path, output_path: Path, capability: str, problems: int,
                         n_heads: int, finished_only: bool, force: bool, quiet: bool) -> None:
    """`direction --capability`: refuse the prompt-set options, run the job, say what it found."""
    from gguf_abliterate.jobs.capability import CapabilityDirectionRequest, run_capability_direction

    given = [f"--{p.replace('_', '-')}" for p in ("behaviour", "positive", "negative", "name", "harmful", "harmless",
                                                  "layer", "max_kl", "score_prompts", "raw", "engine", "thinking",
                                                  "position", "thought_tokens", "report")
             if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise UserError(f"--capability reads the model's own answers to problems: drop {', '.join(given)}")
    result = run_capability_direction(CapabilityDirectionRequest(
        model=model_path, output=output_path, capability=capability, problems=problems, heads=n_heads,
        finished_only=finished_only, force=force),
        cli_ui(quiet))
    say = sayer(quiet)
    say(f"heads (block.head, write along the failure side): {result.measured.describe_heads()}")
    say(f"wrote {result.written}: edit with `gguf-abliterate MODEL OUT.gguf --direction {result.written}` "
        f"(those heads only; --reverse amplifies instead)")
