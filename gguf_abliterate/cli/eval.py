"""`eval`: compare models on refusals, over-refusal and first-token KL."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import click

from gguf_abliterate.cli.common import progress, user_errors
from gguf_abliterate.errors import UserError


def evaluate_models(models: Sequence[Path], *, harmful: Path | None = None, harmless: Path | None = None,
                    limit: int | None = None, max_tokens: int = 64, markers: Path | None = None,
                    json_path: Path | None = None, ppl_path: Path | None = None, samples: int = 2,
                    quiet: bool = False) -> None:
    """Print the comparison table (the first model is the base) and optionally the JSON."""
    from gguf_abliterate.direction import prompts as P
    from gguf_abliterate.evaluate.markers import DEFAULT_MARKERS
    from gguf_abliterate.evaluate.report import evaluate, to_json

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
    with progress(len(models) * (len(bad) + len(good)), "responses", "prompt", quiet) as bar:
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


@click.command("eval")
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
@user_errors
def command(models: tuple[Path, ...], harmful: Path | None, harmless: Path | None, limit: int | None,
            max_tokens: int, markers: Path | None, json_path: Path | None, ppl_path: Path | None, samples: int,
            quiet: bool) -> None:
    """Compare models: refusals on harmful prompts, over-refusal on harmless ones, and the
    first-token KL divergence KL(BASE || model) on harmless prompts."""
    evaluate_models(models, harmful=harmful, harmless=harmless, limit=limit, max_tokens=max_tokens,
                    markers=markers, json_path=json_path, ppl_path=ppl_path, samples=samples, quiet=quiet)
