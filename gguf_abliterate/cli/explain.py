"""`explain`: what a direction means, read on its model before it is baked."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from gguf_abliterate.cli.common import Command, InputName, InputPath, OutputPath, cli_ui, echo, sayer, thinking_options, \
    user_errors
from gguf_abliterate.cli.direction import choose_pack
from gguf_abliterate.direction.explain import TOP_TOKENS

if TYPE_CHECKING:
    from gguf_abliterate.runtime.thinking import Thinking


@click.command("explain", cls=Command)
@click.argument("direction_path", metavar="DIRECTION", type=InputPath())
@click.option("--model", "model_path", required=True, type=InputPath(),
              help="The GGUF the direction was measured on (its output head and prompts are read).")
@click.option("--block", "blocks", type=click.IntRange(min=0), multiple=True,
              help="Read the direction at this block (repeat for several). Default: the block the file was "
                   "measured at (a searched file: its strongest block; a bare vector: the middle block).")
@click.option("--top", type=click.IntRange(1, 200), default=TOP_TOKENS, show_default=True,
              help="Tokens shown on each side (promoted, suppressed).")
@click.option("--token", "tokens", multiple=True,
              help="Show where this text's first token ranks among all the direction promotes (repeat; a refusal "
                   "direction always shows the refusal openings its layer test scores).")
@click.option("--prompts", "prompts_path", type=InputPath(),
              help="Your own prompts (.txt one per line, .json or .jsonl), projected on the direction too.")
@click.option("--behaviour", metavar="NAME|PACK.json", type=InputName(),
              help="The pack whose prompts are read (default: the one the file names; refusal for a bare .npy).")
@click.option("--positive", type=InputPath(), help="Prompts that show the behaviour, instead of a pack's.")
@click.option("--negative", type=InputPath(), help="The same topics without it (with --positive).")
@thinking_options
@click.option("--report", type=OutputPath(), metavar="FILE.html",
              help="Also write an HTML report: every token and prompt, the blocks' cosine heat map, the writers' "
                   "and heads' shares, the split-half cosine per block.")
@click.option("--force", is_flag=True, help="Replace the report if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="Print only the summary (no progress).")
@user_errors
def command(direction_path: Path, model_path: Path, blocks: tuple[int, ...], top: int, tokens: tuple[str, ...],
            prompts_path: Path | None,
            behaviour: str | None, positive: Path | None, negative: Path | None, thinking: Thinking,
            report: Path | None, force: bool, quiet: bool) -> None:
    """Show what DIRECTION means on the model it came from, before you bake it.

    The tokens it promotes and suppresses, read through the model's own final norm and output
    head (a logit lens of the direction); the prompts that load on it most and least; how much
    each writer (attention and its heads, the MLP, the rest of each block) writes along it on
    the positive prompts, which is what an edit changes; and the cosine between directions
    measured from two halves of the prompts, which says whether they were enough. The summary
    goes to stdout; --report keeps everything.
    """
    from gguf_abliterate.jobs.explain import ExplainRequest, run_explain

    pack = None if behaviour is None and positive is None and negative is None else \
        choose_pack(behaviour, positive=positive, negative=negative)
    request = ExplainRequest(direction=direction_path, model=model_path, blocks=blocks, pack=pack,
                             prompts=prompts_path, tokens=tokens, top=top, thinking=thinking, report=report, force=force)
    result = run_explain(request, cli_ui(quiet))
    for line in result.summary:
        (sayer(quiet) if line.startswith("wrote ") else echo)(line)
