"""Capability edits as jobs: a direction from the model's own right and wrong answers
(`direction --capability`), and the accuracy evaluation that judges an edit (`eval
--capability`). The problems come from `evaluate/problems.py`: the direction reads the
`direction` split, the evaluation the `heldout` split, which never share a problem.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.direction.answer_log import AnswerLog
from gguf_abliterate.direction.capability import (DEFAULT_HEADS, MIN_EACH, CapabilityDirection, Findable, label,
    measure)
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.capability import CapabilityReport, evaluate_capability
from gguf_abliterate.evaluate.generate import load_for_eval
from gguf_abliterate.evaluate.problems import INSTRUCTION, is_right, problems_for
from gguf_abliterate.edit.options import format_heads
from gguf_abliterate.formats.direction_file import HEAD_SCORES, SIGN, check_direction_path, load_direction, save_direction
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.gguf_io.model import model_digest
from gguf_abliterate.gguf_io.atomic import claim_outputs, write_text
from gguf_abliterate.jobs.ui import Ui
from gguf_abliterate.optimise.capability import (CapabilityScorer, CapabilitySearch, CapabilityTrial, HeadAdapters,
    Scored, forced, front, heads_map, ranked_heads, run_search)

ANSWER_TOKENS = 256  # room to work: the 0.5B's worked answers run about 200 tokens
KL_PROMPTS = 24  # harmless validation prompts a search trial's KL reads, as the refusal search's


def capability_input(name: str) -> list[Path]:
    """The problem file among a capability's inputs (a family is no file)."""
    return [Path(name)] if name.endswith(".jsonl") else []


@dataclass(frozen=True, kw_only=True)
class CapabilityDirectionRequest:
    model: Path
    output: Path
    capability: str  # a family (arithmetic, percent, code) or a problems .jsonl file
    problems: int = 256
    seed: int = 0
    max_tokens: int = ANSWER_TOKENS
    heads: int = DEFAULT_HEADS
    finished_only: bool = False  # read the direction from the answers that ended within the budget
    force: bool = False


@dataclass
class CapabilityDirectionResult:
    findable: Findable
    measured: CapabilityDirection
    written: Path


def run_capability_direction(request: CapabilityDirectionRequest, ui: Ui = Ui()) -> CapabilityDirectionResult:
    r = request
    check_direction_path(r.output)
    if r.output.suffix.lower() != ".safetensors":
        raise UserError(f"{r.output}: a capability direction keeps its heads in its metadata: write a .safetensors "
                        f"file")
    claim_outputs([r.output], [r.model, *capability_input(r.capability)], r.force)
    problems = problems_for(r.capability, "direction", r.problems, r.seed)
    if len(problems) < r.problems:
        ui.say(f"note: {r.capability} has {len(problems)} problems in the direction split, not {r.problems}")
    weights = Model(r.model)
    log = AnswerLog(model_digest(weights), [p.prompt for p in problems], r.max_tokens)
    with load_for_eval(r.model) as m:
        if m.thinks:
            raise UserError("this model thinks before it answers; capability directions are read from answers that "
                            "open at once (models that think are not covered yet)")
        if kept := len(log.load()):
            ui.say(f"resuming: {kept} of the {len(problems)} answers were given before the run was stopped "
                   f"({log.path})")
        with ui.bar(total=len(problems), desc="answering", unit="problem") as bar:
            labelled = label(m, problems, r.max_tokens, bar.update, log)
        findable = Findable.of(labelled)
        for line in findable.lines():
            ui.say(line)
        if r.finished_only:
            labelled = labelled.only_finished()
            ui.say(f"reading the {len(labelled.answers)} answers that finished within the budget "
                   f"({int(labelled.right.sum())} right)")
            if not labelled.contrasted:  # the log stays: the same answers serve without the flag
                raise UserError(f"{int(labelled.right.sum())} of the {len(labelled.answers)} answers that finished "
                                f"are right: a direction needs at least {MIN_EACH} right and {MIN_EACH} wrong (drop "
                                f"--finished-only, or give more problems)")
        try:
            with ui.bar(total=len(labelled.answers), desc="reading the answers", unit="problem") as bar:
                measured = measure(m, weights, labelled, r.heads, bar.update)
        except UserError:  # about the answers themselves: a rerun would give the same
            log.remove()
            raise
    meta = {"behaviour": f"capability:{Path(r.capability).stem}", "sign": SIGN,
            "positive": "the model's right answers", "negative": "its wrong answers",
            "layer_convention": "l_out-L: residual stream after block L, averaged over each answer's tokens",
            "architecture": weights.arch, "heads": ",".join(f"{b}.{h}" for b, hs in measured.heads.items() for h in hs),
            "problems": str(len(problems)), "right": str(findable.right), "seed": str(r.seed),
            "max_tokens": str(r.max_tokens), "instruction": INSTRUCTION, "findable": json.dumps(asdict(findable))}
    if r.finished_only:
        meta["read_from"] = f"the {len(labelled.answers)} answers that finished within the budget"
    save_direction(r.output, measured.directions, meta,
                   {"diff_norm": measured.diff_norms, HEAD_SCORES: measured.head_scores})
    log.remove()
    return CapabilityDirectionResult(findable, measured, r.output)


@dataclass(frozen=True, kw_only=True)
class CapabilityEvalRequest:
    models: Sequence[Path]  # the first is the base
    capability: str
    problems: int = 500
    seed: int = 0
    max_tokens: int = ANSWER_TOKENS
    json: Path | None = None
    force: bool = False


def run_capability_eval(request: CapabilityEvalRequest, ui: Ui = Ui()) -> list[CapabilityReport]:
    r = request
    for m in r.models:
        if not m.is_file():
            raise UserError(f"{m}: no such file")
    claim_outputs([r.json] if r.json else [], [*r.models, *capability_input(r.capability)], r.force)
    problems = problems_for(r.capability, "heldout", r.problems, r.seed)
    if len(problems) < r.problems:
        ui.say(f"note: {r.capability} has {len(problems)} problems in the held-out split, not {r.problems}")
    harmless = P.default_prompts("validation")[1]
    with ui.bar(total=len(r.models) * len(problems), desc="answers", unit="problem") as bar:
        reports = evaluate_capability(r.models, problems, r.max_tokens, harmless, bar.update)
    if r.json:
        write_text(r.json, json.dumps({
            "settings": {"capability": r.capability, "split": "heldout", "seed": r.seed, "max_tokens": r.max_tokens,
                         "greedy": True, "instruction": INSTRUCTION, "kl_prompts": len(harmless)},
            "problems": [{"family": p.family, "question": p.question, "answer": p.answer} for p in problems],
            "models": [asdict(m) for m in reports]}, indent=1))
    return reports


def table(reports: Sequence[CapabilityReport]) -> list[str]:
    """The accuracy table: interval, paired counts and p against the base, length, KL."""
    out = [f"{'model':<40} {'right':>9} {'accuracy (95% CI)':>22} {'+/- vs base':>12} {'p (McNemar)':>12} "
           f"{'tokens':>7} {'cut':>5} {'KL vs base':>11}"]
    for r in reports:
        lo, hi = r.interval
        paired = "-" if r.paired is None else f"+{r.paired.gained}/-{r.paired.lost}"
        p = "-" if r.paired is None else f"{r.paired.p_value:.3g}"
        kl = "-" if r.kl_vs_base is None else f"{r.kl_vs_base:.4f}"
        out.append(f"{Path(r.path).name[:40]:<40} {r.right:>4}/{r.total:<4} {r.accuracy:>7.1%} "
                   f"[{lo:.1%}, {hi:.1%}] {paired:>12} {p:>12} {r.mean_tokens:7.0f} {r.unfinished:>5} {kl:>11}")
    out.append("(paired: held-out problems this model solves and the base does not / the reverse; p: exact "
               "two-sided McNemar test on them; KL: first-token KL(base || model) on the harmless validation "
               "prompts)")
    return out



@dataclass(frozen=True, kw_only=True)
class CapabilitySearchRequest:
    model: Path
    capability: str  # the family (or problems file) the direction was read from
    direction: Path  # from `direction --capability`: its per-block directions and head ranking
    output: Path  # .safetensors: the direction file, with the pick's heads and strength
    problems: int = 48  # of the search split, which neither the direction nor `eval` reads
    seed: int = 0
    max_tokens: int = ANSWER_TOKENS
    search: CapabilitySearch = CapabilitySearch()
    max_kl: float = 0.05  # a trial whose first-token KL on harmless prompts exceeds this is no pick
    confirm: int = 2  # front trials confirmed by greedy accuracy on the search problems, at most
    force: bool = False


@dataclass
class CapabilitySearchResult:
    trials: list[CapabilityTrial]
    base: Scored
    base_right: int  # the original's greedy right answers to the search problems
    chosen: CapabilityTrial | None  # None: no confirmed trial beat the original
    written: Path
    summary: list[str]


def run_capability_search(request: CapabilitySearchRequest, ui: Ui = Ui()) -> CapabilitySearchResult:
    """`optimise --capability`: the original answers the search problems once; each trial reads
    the right numbers' likelihood after that working, teacher-forced, and first-token KL; the
    front's likeliest are confirmed by greedy accuracy; the file written is the direction file
    with the pick's heads and signed strength (`edit_strength`), which the edit then takes."""
    r = request
    check_direction_path(r.output)
    if r.output.suffix.lower() != ".safetensors":
        raise UserError(f"{r.output}: the search's pick keeps its heads in its metadata: write a .safetensors file")
    claim_outputs([r.output], [r.model, r.direction, *capability_input(r.capability)], r.force)
    direction = load_direction(r.direction)
    weights = Model(r.model)
    direction.check_fits(weights.n_layer, weights.n_embd, weights.arch)
    if direction.head_scores is None or not direction.per_layer:
        raise UserError(f"{r.direction}: not a capability direction (make one with `direction --capability`)")
    if direction.behaviour != f"capability:{Path(r.capability).stem}":
        raise UserError(f"{r.direction} was read from {direction.behaviour}, not capability:{Path(r.capability).stem}")
    problems = problems_for(r.capability, "search", r.problems, r.seed)
    if len(problems) < 8:
        raise UserError(f"{r.capability}: {len(problems)} problems in the search split; the search needs 8 or more")
    candidates = ranked_heads(direction.head_scores, r.search.max_heads)
    adapters = HeadAdapters(weights, direction, candidates)
    prompts = [p.prompt for p in problems]
    with load_for_eval(r.model) as m:
        if m.thinks:
            raise UserError("this model thinks before it answers; capability searches read answers that open at once")
        with ui.bar(total=len(problems), desc="the original's answers", unit="problem") as bar:
            original = m.greedy_answers(prompts, r.max_tokens, bar.update)
        base_right = sum(is_right(p, a.reply) for p, a in zip(problems, original))
        scorer = CapabilityScorer(m, forced(m, problems, original), P.default_prompts("validation")[1][:KL_PROMPTS])
        ui.say(f"the original: {base_right}/{len(problems)} search problems right; the right number's mean "
               f"log-likelihood after its own working {scorer.base.answer_ll:.3f} (the likeliest continuation on "
               f"{scorer.base.forced_right})")
        with ui.bar(total=r.search.trials, desc="trials", unit="trial") as bar:
            def shown(t: CapabilityTrial) -> None:
                bar.update(1)
                bar.set_postfix(heads=t.heads, strength=f"{t.strength:+.2f}", ll=f"{t.scored.answer_ll:.3f}",
                                kl=f"{t.scored.kl:.4f}")
            trials = run_search(scorer, adapters, r.search, shown)
        better = [t for t in front(trials, r.max_kl) if t.scored.answer_ll > scorer.base.answer_ll][: r.confirm]
        with ui.bar(total=len(better), desc="confirming by greedy answers", unit="trial") as bar:
            for t in better:
                m.set_adapter(adapters.edit(t.heads, t.strength))
                try:
                    answers = m.greedy_answers(prompts, r.max_tokens)
                finally:
                    m.set_adapter(None)
                t.confirmed = sum(is_right(p, a.reply) for p, a in zip(problems, answers))
                bar.update(1)
    passing = [t for t in better if (t.confirmed or 0) > base_right]
    chosen = max(passing, key=lambda t: (t.confirmed or 0, t.scored.answer_ll), default=None)
    summary = [f"{len(trials)} trials; {len(better)} confirmed (front trials within KL {r.max_kl:g} whose right "
               f"numbers are likelier than the original's): "
               + (", ".join(f"trial {t.number} ({t.heads} heads, strength {t.strength:+.2f}) {t.confirmed}/"
                            f"{len(problems)}" for t in better) or "none")]
    meta = {**direction.metadata,
            "search": json.dumps({"problems": len(problems), "seed": r.seed, "original_right": base_right,
                                  "original_answer_ll": scorer.base.answer_ll, "max_kl": r.max_kl,
                                  "trials": [t.to_json() for t in trials]})}
    if chosen is not None:
        meta.update(heads=format_heads(heads_map(candidates[: chosen.heads])), edit_strength=f"{chosen.strength:.6g}",
                    chosen_trial=str(chosen.number))
        summary.append(f"wrote {r.output}: trial {chosen.number}, the top {chosen.heads} heads at strength "
                       f"{chosen.strength:+.3g}, {chosen.confirmed}/{len(problems)} right against the original's "
                       f"{base_right} on the search split (judge it on held-out problems: `eval --capability`)")
    else:
        summary.append(f"no confirmed trial answered more search problems right than the original ({base_right}/"
                       f"{len(problems)}): wrote {r.output} with the direction's own heads and no strength of its own")
    extra = {HEAD_SCORES: direction.head_scores, **direction.statistics}
    save_direction(r.output, direction.vectors, meta, extra)
    return CapabilitySearchResult(trials, scorer.base, base_right, chosen, r.output, summary)
