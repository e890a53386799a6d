"""`optimise`: search the edit (directions, per-block strengths) against refusal and KL."""

from __future__ import annotations

from pathlib import Path

import click

from gguf_abliterate.cli.common import (Command, Finite, InputName, InputPath, OutputPath, cli_ui, sayer,
    thinking_options, thought_tokens_option, user_errors)
from gguf_abliterate.errors import Interrupted, UserError
from gguf_abliterate.evaluate.generate import MAX_ANSWER_TOKENS
from gguf_abliterate.optimise.study import SearchSettings
from gguf_abliterate.runtime.thinking import Thinking

D = SearchSettings()  # the defaults, in one place


@click.command("optimise", cls=Command)
@click.argument("model_path", metavar="MODEL", type=InputPath())
@click.option("-o", "--output", type=OutputPath(),
              help="Where the result goes (.safetensors): every trial, and the chosen one ready to bake.")
@click.option("--trials", type=click.IntRange(min=1), default=D.trials, show_default=True,
              help="Finished trials to run, over all workers of the study (--capability: 40 unless given).")
@click.option("--minutes", type=Finite(min=0, min_open=True), default=D.minutes, show_default=True,
              help="Start no trial after this long (the pick's confirmation comes after; --capability: 30 unless "
                   "given, its trials cost minutes).")
@click.option("--resume", is_flag=True, help="Continue the study stored beside OUTPUT (or in --storage).")
@click.option("--storage", metavar="URL",
              help="Optuna storage URL for the study (sqlite:///x.db, postgresql://..., mysql://...). "
                   "Default: sqlite beside OUTPUT (edit.study.db).")
@click.option("--join", metavar="URL", help="Add this process as a worker to the study at URL (no OUTPUT).")
@click.option("--from", "measured", type=InputPath(),
              help="Take every block's direction and harmless mean from this `direction` file instead of "
                   "measuring them (saves the residual capture); the result names the input statistics it names, "
                   "so the bakes round by them.")
@click.option("--startup-trials", type=click.IntRange(min=0), default=D.startup_trials, show_default=True,
              help="Random trials before the TPE sampler takes over.")
@click.option("--score-prompts", type=click.IntRange(min=2), default=D.score_prompts, show_default=True,
              help="Harmful and harmless validation prompts each trial is scored on.")
@click.option("--kl-tokens", type=click.IntRange(min=1), default=D.kl_tokens, show_default=True,
              help="KL over the original's first K greedy tokens (teacher-forced), not only the first.")
@click.option("--opening-tokens", type=click.IntRange(min=0), default=D.opening_tokens, show_default=True,
              help="For a model that thinks: score a trial's refusals by markers in the first N tokens of its own "
                   "greedy answer, its thought's opening (where such a model decides); 0: the refusal-opening "
                   "probability where the final answer opens, after the original's own thought (one forward pass).")
@click.option("--max-refusals", type=Finite(0, 100), default=D.max_refusals, show_default=True,
              help="Pick rule: the lowest-KL trial whose greedy refusals are at most this percent of the original's.")
@click.option("--max-thought-growth", type=Finite(1, None), default=D.max_thought_growth, show_default=True,
              help="Pick rule for a model that thinks: the pick's thoughts on the harmless scoring prompts are at "
                   "most this many times as long as the original's, on average.")
@click.option("--confirm", type=click.IntRange(min=1), default=D.confirm, show_default=True,
              help="With --bake-checks 0: front trials confirmed through their adapters by generation, at most "
                   "(bisection by KL: the lowest-KL one that passes is the pick).")
@click.option("--confirm-tokens", type=click.IntRange(1, MAX_ANSWER_TOKENS), default=D.confirm_tokens, show_default=True,
              help="Greedy tokens per confirmation answer (refusals show in the opening).")
@click.option("--confirm-prompts", type=click.IntRange(min=1), default=None,
              help="Confirm on the first N harmful validation prompts (default: all of them); fewer is quicker, "
                   "and a pick that still refuses one of the others goes unseen.")
@click.option("--bake-checks", type=click.IntRange(min=0), default=D.bake_checks, show_default=True,
              help="Confirm the front on bakes: each trial the bisection by KL tries is baked into the model's own "
                   "types and answers there (requantizing can bring a refusal back); the lowest-KL one that passes "
                   "baked is the pick; at most this many bakes (0: confirm through adapters, --confirm).")
@click.option("--bake", type=OutputPath(), metavar="OUT.gguf",
              help="Keep the final pick's bake as OUT.gguf (what `gguf-abliterate MODEL OUT.gguf --direction "
                   "OUTPUT` would write, as one file even for a split model), saving a second pass.")
@click.option("--patience", type=click.IntRange(min=1), default=D.patience, show_default=True,
              help="Stop when the front of candidate edits (refusal ratio <= 0.3) has not moved for this many trials.")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--judge", type=InputPath(),
              help="Confirm the front with this local instruct GGUF as a judge instead of refusal markers "
                   "(slower: one more model and a pass per answer).")
@click.option("--fix", multiple=True, metavar="NAME=VALUE",
              help="Fix a parameter instead of searching it (repeatable): direction_index=12.5 or per-block, "
                   "orthogonal=true, attn.peak=1, attn.position, attn.edge, attn.width, mlp.* (mlp.peak=0 "
                   "switches the MLP edit off), experts.* on mixture-of-experts models.")
@click.option("--capability", metavar="FAMILY|FILE.jsonl", type=InputName(),
              help="Search a capability edit instead (--from a `direction --capability` file of this family): how "
                   "many of its heads and how strongly, either sign, against the right answer's likelihood after "
                   "the model's own working on the search split, with KL on harmless prompts as the second "
                   "objective; the likeliest front trials are confirmed by greedy accuracy (docs/capability.md).")
@click.option("--problems", type=click.IntRange(min=8), default=48, show_default=True,
              help="With --capability: search-split problems each trial reads (never those eval judges on).")
@click.option("--max-kl", type=Finite(min=0), default=0.05, show_default=True,
              help="With --capability: largest first-token KL on harmless prompts a pick may cause.")
@click.option("--max-heads", type=click.IntRange(min=1), default=64, show_default=True,
              help="With --capability: the trials choose among this many of the direction's highest-ranked heads.")
@thinking_options
@thought_tokens_option
@click.option("--report", type=OutputPath(), metavar="FILE.html",
              help="Also write an HTML report: every trial, the Pareto front with the pick, its strengths per block.")
@click.option("--force", is_flag=True, help="Replace OUTPUT, the --bake file and the report if they exist.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.pass_context
@user_errors
def command(ctx: click.Context, model_path: Path, output: Path | None, trials: int, minutes: float, resume: bool, storage: str | None,
            join: str | None, measured: Path | None, startup_trials: int, score_prompts: int, kl_tokens: int,
            opening_tokens: int, max_refusals: float, max_thought_growth: float, confirm: int, confirm_tokens: int,
            confirm_prompts: int | None, bake_checks: int,
            bake: Path | None, patience: int, seed: int, judge: Path | None, fix: tuple[str, ...],
            capability: str | None, problems: int, max_kl: float, max_heads: int, thinking: Thinking,
            thought_tokens: int, report: Path | None, force: bool, quiet: bool) -> None:
    """Search the edit for MODEL on CPU: per-block directions (blended between neighbouring
    blocks, or each block its own, optionally orthogonal to the harmless mean) and per-block
    strengths of the attention and MLP edits (and of the experts on a mixture-of-experts model),
    against two objectives, refusal on harmful prompts and KL on harmless ones. Each trial runs
    inside llama.cpp exactly as the bake would edit: a rank-1 adapter, or for expert stacks and
    biases a projection of the writer's output in the graph.
    The result bakes with `gguf-abliterate MODEL OUT.gguf --direction OUTPUT`."""
    from gguf_abliterate.jobs.optimise import OptimiseRequest, front_table, run_optimise
    from gguf_abliterate.optimise.space import parse_fixed

    capability_only = ("problems", "max_kl", "max_heads")
    given = {p for p in ctx.params if ctx.get_parameter_source(p) is not click.core.ParameterSource.DEFAULT}
    if capability is not None:
        search_capability(model_path, output, capability, measured, problems, max_kl, max_heads, trials, minutes,
                          confirm, seed, force, quiet, given)
        return
    if misplaced := sorted(given & set(capability_only)):
        raise UserError(f"{', '.join('--' + p.replace('_', '-') for p in misplaced)}: only with --capability")

    settings = SearchSettings(trials=trials, minutes=minutes, startup_trials=startup_trials,
                              score_prompts=score_prompts, kl_tokens=kl_tokens, max_refusals=max_refusals,
                              max_thought_growth=max_thought_growth, confirm=confirm,
                              confirm_tokens=confirm_tokens, confirm_prompts=confirm_prompts,
                              bake_checks=bake_checks, patience=patience, seed=seed,
                              fixed=parse_fixed(fix), judge=judge, thinking=thinking, thought_tokens=thought_tokens,
                              opening_tokens=opening_tokens)
    request = OptimiseRequest(model=model_path, output=output, settings=settings, storage=storage, resume=resume,
                              join=join, measured=measured, bake=bake, report=report, force=force)
    result = run_optimise(request, cli_ui(quiet))
    say = sayer(quiet)
    for line in (front_table(result) if result.chosen is not None else []) + result.summary:
        say(line)
    if result.interrupted:  # the best so far is written, but the search did not finish: say so by the exit code
        raise Interrupted("interrupted after {} trials: {} holds the best so far, unconfirmed (--resume continues "
                          "the study)".format(len(result.records), output) if result.chosen is not None else
                          "interrupted; the finished trials are in the study")


def search_capability(model_path: Path, output: Path | None, capability: str, measured: Path | None, problems: int,
                      max_kl: float, max_heads: int, trials: int, minutes: float, confirm: int, seed: int,
                      force: bool, quiet: bool, given: set[str]) -> None:
    """`optimise --capability`: refuse the refusal search's options, run the job, say what it found."""
    from gguf_abliterate.jobs.capability import CapabilitySearchRequest, run_capability_search
    from gguf_abliterate.optimise.capability import CapabilitySearch

    shared = {"model_path", "output", "capability", "measured", "problems", "max_kl", "max_heads", "trials",
              "minutes", "confirm", "seed", "force", "quiet"}
    if others := sorted(given - shared):
        raise UserError(f"--capability searches heads and strength: drop "
                        f"{', '.join('--' + p.replace('_', '-') for p in others)}")
    if measured is None or output is None:
        raise UserError("--capability needs --from (a `direction --capability` file) and -o OUTPUT.safetensors")
    request = CapabilitySearchRequest(model=model_path, capability=capability, direction=measured, output=output,
                                      problems=problems, seed=seed, max_kl=max_kl, force=force,
                                      # the refusal search's default --confirm (6) is not this search's (2)
                                      **({"confirm": confirm} if "confirm" in given else {}),
                                      # nor are its --trials and --minutes: a capability trial costs minutes
                                      search=CapabilitySearch(max_heads=max_heads, seed=seed,
                                                              **({"trials": trials} if "trials" in given else {}),
                                                              **({"minutes": minutes} if "minutes" in given else {})))
    say = sayer(quiet)
    for line in run_capability_search(request, cli_ui(quiet)).summary:
        say(line)
