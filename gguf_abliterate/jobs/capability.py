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
from gguf_abliterate.direction.capability import DEFAULT_HEADS, CapabilityDirection, Findable, label, measure
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.capability import CapabilityReport, evaluate_capability
from gguf_abliterate.evaluate.generate import load_for_eval
from gguf_abliterate.evaluate.problems import INSTRUCTION, problems_for
from gguf_abliterate.formats.direction_file import SIGN, check_direction_path, save_direction
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.gguf_io.atomic import claim_outputs, write_text
from gguf_abliterate.jobs.ui import Ui

ANSWER_TOKENS = 256  # room to work: the 0.5B's worked answers run about 200 tokens
HEAD_SCORES = "head_scores"  # the file's (n_layer, n_head) tensor: each head's write along failure


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
    with load_for_eval(r.model) as m:
        if m.thinks:
            raise UserError("this model thinks before it answers; capability directions are read from answers that "
                            "open at once (models that think are not covered yet)")
        with ui.bar(total=len(problems), desc="answering", unit="problem") as bar:
            labelled = label(m, problems, r.max_tokens, bar.update)
        findable = Findable.of(labelled)
        for line in findable.lines():
            ui.say(line)
        with ui.bar(total=len(problems), desc="reading the answers", unit="problem") as bar:
            measured = measure(m, weights, labelled, r.heads, bar.update)
    meta = {"behaviour": f"capability:{Path(r.capability).stem}", "sign": SIGN,
            "positive": "the model's right answers", "negative": "its wrong answers",
            "layer_convention": "l_out-L: residual stream after block L, averaged over each answer's tokens",
            "architecture": weights.arch, "heads": ",".join(f"{b}.{h}" for b, hs in measured.heads.items() for h in hs),
            "problems": str(len(problems)), "right": str(findable.right), "seed": str(r.seed),
            "max_tokens": str(r.max_tokens), "instruction": INSTRUCTION, "findable": json.dumps(asdict(findable))}
    save_direction(r.output, measured.directions, meta,
                   {"diff_norm": measured.diff_norms, HEAD_SCORES: measured.head_scores})
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

