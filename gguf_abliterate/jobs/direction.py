"""Measuring a direction as one job: a `DirectionRequest` in, a `DirectionResult` out.

The residual stream after every block at the last prompt token, the pack's positive prompts
minus its negative ones (difference of means); the layer chosen by the pack's measure (or
given); the probes' lean measured there; the file written with every block's direction, the
per-block statistics and, beside a .safetensors file, the writers' input statistics the edit
rounds by.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gguf_abliterate import names
from gguf_abliterate.arch import steerable_blocks
from gguf_abliterate.direction import prompts as P
from gguf_abliterate.direction.explain import TOP_TOKENS, Captured, asked_tokens, explain
from gguf_abliterate.formats.direction_file import Direction, check_direction_path, save_measured
from gguf_abliterate.direction.lean import LEAN_PROBES, lean_at
from gguf_abliterate.direction.measure import (
    DEFAULT_POSITION,
    Position,
    at_position,
    CAPTURE_STEP,
    CONVERGED,
    DEFAULT_MAX_KL,
    MIN_PAIRS,
    Engine,
    LayerStats,
    candidate_layers,
    planned_prompts,
    agreement as split_half_agreement,
    choose_layer,
    difference_of_means,
)
from gguf_abliterate.direction.packs import SCORE_PROBES, STEER_BELOW, Pack, load_pack
from gguf_abliterate.formats.statistics_file import StoredMoments, encode_statistics, statistics_path, write_statistics
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.gguf_io.atomic import claim_outputs
from gguf_abliterate.jobs.ui import Ui
from gguf_abliterate.quants.rounding import column_block
from gguf_abliterate.report import claim_report
from gguf_abliterate.runtime.llama import LlamaModel, Prompt
from gguf_abliterate.runtime.stages import Stage, Stages
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET, Thinking


@dataclass(frozen=True, kw_only=True)
class DirectionRequest:
    model: Path
    output: Path  # .safetensors (everything) or .npy (the chosen block's vector)
    pack: Pack | None = None  # None: refusal
    layer: str = "auto"  # or a block number
    max_kl: float | None = None  # None: the pack's default
    score_prompts: int | None = None  # None: the pack's default
    raw: bool = False  # prompts as raw text, not through the chat template
    engine: Engine = Engine.LLAMA
    thinking: Thinking = field(default_factory=Thinking)
    position: Position | None = None  # None: DEFAULT_POSITION (the same for a model that does not think)
    thought_tokens: int = THOUGHT_BUDGET  # at Position.THOUGHT: the budget of each generated thought
    report: Path | None = None
    force: bool = False


@dataclass
class DirectionResult:
    chosen: int  # the block whose direction the file's edit uses
    written: list[Path] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    stages: list[Stage] = field(default_factory=list)  # where the time went


def run_direction(request: DirectionRequest, ui: Ui = Ui()) -> DirectionResult:
    r = request
    pack = r.pack or load_pack("refusal")
    check_direction_path(r.output)
    keeps_statistics = r.output.suffix.lower() == ".safetensors" and r.engine is Engine.LLAMA
    stats_path = statistics_path(r.output) if keeps_statistics else None
    claim_outputs([r.output, *([stats_path] if stats_path else [])], [r.model], r.force)
    if r.report is not None:
        if r.output.suffix.lower() != ".safetensors":
            raise UserError("--report charts the per-block statistics, which only a .safetensors output keeps")
        claim_report(r.report, [r.model, r.output], r.force)
    meta = Model(r.model)
    with LlamaModel(r.model, chat=not r.raw, thinking=r.thinking, room_for_thoughts=True) as model:
        if model.template is None and not r.raw:
            ui.say("note: the model has no chat template; prompts are fed as raw text")
        if r.layer != "auto" and not (r.layer.isdigit() and int(r.layer) < model.n_layer):
            raise UserError(f"--layer must be 'auto' or a block number 0-{model.n_layer - 1}")
        position = r.position or DEFAULT_POSITION
        if model.thinks:
            ui.say(f"the model thinks ({model.reasoning.format.name}): prompts are read at {position.value}, "
                   f"layers scored where the final answer opens")
        read_at = {"reasoning": model.reasoning.format.name, "position": position.value} if model.thinks else {}
        if model.thinks and position is Position.THOUGHT:
            read_at["thought_tokens"] = str(r.thought_tokens)
        stages = Stages()
        with stages.stage("residuals"):
            stats, mlp_means, stored, seen, (n_pos, n_neg, agreement) = _measure(
                r, pack, meta, model, stats_path is not None, ui)
        if not stats.diff_norm.any():
            raise UserError("the two prompt sets give the same residual stream at every block: there is no direction "
                            "between them (a model whose last token does not read its prompt?)")
        ui.say(f"direction from {n_pos} + {n_neg} prompts; split-half agreement {agreement:.3f} (the two halves of "
               f"the prompts give the same direction at 1; reading stops early at {CONVERGED})")
        scores = np.full(model.n_layer, np.nan, np.float32)
        kl = np.full(model.n_layer, np.nan, np.float32)
        read = pack.probes[: max(LEAN_PROBES, _score_count(r, pack))]
        with stages.stage("probes"), ui.bar(total=len(read), desc="probes", unit="prompt") as bar:
            # one pass: every block's residual (for the lean at the block chosen) and the first
            # token (the layer test's baseline, where it reads the probes so)
            probes = at_position(model, [p.prompt for p in read], position, ui.bar, r.thought_tokens)
            probe_residuals, probe_logprobs = model.residuals_and_logprobs(probes, bar.update)
        same = pack.first_token and (position is Position.ANSWER or not model.thinks)
        with stages.stage("layers"):
            chosen, info = _choose(r, pack, meta, model, stats, scores, kl, ui, probe_logprobs if same else None)
        lean = lean_at(probe_residuals[:, chosen], stats.directions[chosen], stats.harmless_mean[chosen],
                       float(stats.diff_norm[chosen]))
        ui.say(f"{pack.name} at block {chosen}: {lean.describe(pack.name)}")
        # what the file will hold, read as `explain` reads it, for the report
        explained = None if seen is None else explain(
            meta, model.piece, Direction(stats.directions[chosen], "", {}, stats.directions), [chosen], seen,
            TOP_TOKENS, ui.bar, pack.name, asked_tokens(model, (), pack.name))
        if mlp_means is not None:
            ui.say(f"--steer S adds S mean differences at block {chosen} instead, towards more {pack.name} whatever "
                   f"the lean (negative S: less)")
    metadata = {
        "chosen_by": "auto" if r.layer == "auto" else "user",
        "model": meta.get_str(names.NAME) or r.model.name, "architecture": meta.arch,
        "n_embd": str(stats.directions.shape[1]), "n_layer": str(meta.n_layer), **pack.metadata(),
        "chat_template": "raw" if r.raw else "model", "engine": r.engine.value, **info, **lean.metadata(),
        "direction_prompts": f"{n_pos}+{n_neg}", "split_half": f"{agreement:.4f}",
        **read_at,
    }
    statistics = {"harmful_mean_norm": stats.harmful_norm, "harmless_mean_norm": stats.harmless_norm,
                  "diff_norm": stats.diff_norm, "separation": stats.separation, "layer_score": scores, "kl": kl}
    result = DirectionResult(chosen, stages=stages.done)
    if stats_path is not None and stored is not None:
        metadata |= {"statistics": stats_path.name, "statistics_sha256": stored.sha256}
        write_statistics(stats_path, stored)
    try:
        save_measured(r.output, stats.directions, stats.harmless_mean, chosen, statistics, metadata, mlp_means)
    except BaseException:
        if stats_path is not None:
            stats_path.unlink(missing_ok=True)
        raise
    result.written.append(r.output)
    result.summary.append(f"wrote {r.output} ({pack.name} direction, layer {chosen})")
    if stats_path is not None and stored is not None:
        result.written.append(stats_path)
        result.summary.append(f"wrote {stats_path}: the writers' input statistics ({stored.tokens} tokens), which the "
                              f"edit finds through the direction file and rounds by (gptq)")
    elif r.engine is Engine.LLAMA:
        result.summary.append("note: a .npy direction carries no input statistics, so the edit rounds aware (write "
                              ".safetensors to keep them, or edit with --rounding gptq to measure them)")
    result.summary.append(stages.describe())
    if r.report is not None:
        from gguf_abliterate.report import write_report

        write_report(r.report, f"gguf-abliterate direction: {r.model.name}", direction_files=[r.output],
                     explained=explained)
        result.written.append(r.report)
        result.summary.append(f"wrote {r.report}")
    return result


def _measure(r: DirectionRequest, pack: Pack, meta: Model, model: LlamaModel, keep_statistics: bool,
             ui: Ui) -> tuple[LayerStats, np.ndarray | None, StoredMoments | None, Captured | None,
                              tuple[int, int, float]]:
    """Every block's difference of means; with llama.cpp also the MLP input means (for --steer)
    and, from the same passes, the writers' input statistics (for gptq rounding) and, for the
    report, what `explain` reads; and the direction's split-half agreement. llama.cpp's
    capture stops once that agreement says more prompts would not move the direction."""
    texts = pack.direction_sets()

    def placed(prompts: list[str]) -> list[Prompt]:
        """As read at the position; at `thought`, each step's thoughts generated only when it is
        read, so a capture that converges early generates no thought it does not read."""
        return at_position(model, prompts, r.position or DEFAULT_POSITION, ui.bar, r.thought_tokens)

    if r.engine is Engine.TORCH:
        from gguf_abliterate.runtime.torch_pass import TorchModel

        tm = TorchModel(meta)
        ui.say("computing residuals with the torch engine")
        pos_t, neg_t = (tm.last_token_residuals(model.encode(placed(s))) for s in texts)
        return (difference_of_means(pos_t, neg_t), None, None, None,
                (len(pos_t), len(neg_t), split_half_agreement(pos_t, neg_t, candidate_layers(model.n_layer))))
    pos, neg, order = [], [], []  # captured in steps; `order`: which rows the report's inputs keep
    candidates = candidate_layers(model.n_layer)
    d_pos, d_neg = texts
    with (ui.bar(total=len(d_pos) + len(d_neg), desc="residuals", unit="prompt") as bar, model.mlp_inputs() as mlp,
          model.input_moments(column_block) as moments,
          model.last_inputs() if r.report else nullcontext() as inputs):  # for the report's reading (explain)
        while len(pos) < len(d_pos) or len(neg) < len(d_neg):
            for have, prompts in ((pos, d_pos), (neg, d_neg)):
                step = prompts[len(have) : len(have) + CAPTURE_STEP]
                if step:
                    have.extend(model.residuals(placed(step), bar.update, share_prefix=True))
                    order.extend([have is pos] * len(step))
            if min(len(pos), len(neg)) >= MIN_PAIRS and (len(pos) < len(d_pos) or len(neg) < len(d_neg)):
                agreement = split_half_agreement(np.stack(pos), np.stack(neg), candidates)
                if agreement >= CONVERGED:
                    ui.say(f"the direction converged at {len(pos)} + {len(neg)} prompts (split-half agreement "
                           f"{agreement:.3f}); the other {len(d_pos) + len(d_neg) - len(pos) - len(neg)} were not read")
                    break
    pos_a, neg_a = np.stack(pos), np.stack(neg)
    stored = (encode_statistics(meta, moments.means(), moments.tokens,
                                f"direction ({pack.name}, {len(pos) + len(neg)} prompts)") if keep_statistics else None)
    positive_rows = np.flatnonzero(order)

    def positive_inputs(kind: str, block: int) -> np.ndarray | None:
        rows = inputs.get(kind, block)
        return None if rows is None else rows[positive_rows]
    seen = (Captured(texts[0][: len(pos)], texts[1][: len(neg)],
                     pos_a, neg_a, positive_inputs) if inputs else None)
    read = (len(pos), len(neg), split_half_agreement(pos_a, neg_a, candidates))
    return difference_of_means(pos_a, neg_a), mlp.means(), stored, seen, read


def _score_prompts(r: DirectionRequest, pack: Pack) -> int:
    """Validation prompts of each kind the layer test scores on, at most (--score-prompts)."""
    return r.score_prompts or (32 if pack.first_token else SCORE_PROBES)


def _score_count(r: DirectionRequest, pack: Pack) -> int:
    """The pack's probes the layer test scores candidates on."""
    return min(_score_prompts(r, pack), len(pack.probes))


def _choose(r: DirectionRequest, pack: Pack, meta: Model, model: LlamaModel, stats: LayerStats,
            scores: np.ndarray, kl: np.ndarray, ui: Ui, probe_logprobs: np.ndarray | None) -> tuple[int, dict[str, str]]:
    """The block whose direction the file's edit uses (filling each candidate's score and KL),
    and what the file records of the choice. `probe_logprobs`: the unedited model's first
    tokens on the probes, read as the layer test reads them, where a pass already has them."""
    candidates = candidate_layers(model.n_layer)
    if r.layer != "auto":
        return int(r.layer), {}
    if pack.measure is None:
        chosen = max(candidates, key=lambda c: stats.separation[c])
        ui.say(f"note: pack {pack.name!r} has no measure, so block {chosen} was chosen by separation alone "
               f"(a pack file with a measure, or --layer N, chooses better)")
        return chosen, {"candidates": ",".join(map(str, candidates))}
    max_kl = r.max_kl if r.max_kl is not None else (DEFAULT_MAX_KL if pack.first_token else float("inf"))
    harmless = pack.negative if pack.name == "refusal" else load_pack("refusal").negative
    v_good = P.split(list(harmless), "validation")[: _score_prompts(r, pack)]
    measure = pack.layer_measure()
    count = _score_count(r, pack)
    with ui.bar(total=planned_prompts(len(candidates), count, len(v_good)), desc="scoring layers",
                unit="prompt") as bar:
        choice = choose_layer(model, stats, pack.layer_scorer(model, count), count, v_good, candidates,
                              max_kl, bar.update, None if pack.first_token else STEER_BELOW,
                              steerable_blocks(meta.arch, model.n_layer, meta.tensors),
                              None if probe_logprobs is None else pack.first_token_scores(model, probe_logprobs[:count]))
        bar.total = bar.n  # an elimination that stopped early
    chosen, candidates = choice.layer, choice.candidates
    for c in candidates:
        scores[c], kl[c] = choice.score[c], choice.kl[c]
    test = "steering (+ the mean difference after the block)" if choice.steered else "ablation"
    ui.say(f"{pack.name}: {measure} without an edit: {choice.baseline:.3f}; candidates tested by {test}")
    finalists = max(choice.prompts.values())
    if min(choice.prompts.values()) < finalists:
        ui.say(f"by elimination: every candidate scored on the first {min(choice.prompts.values())} prompts, the "
               f"better half on twice as many, up to {finalists}")
    ui.say(f"{'layer':>5} {'score':>8} {'KL':>8} {'prompts':>7} {'separation':>10}")
    for c in candidates:
        mark = ("  <- chosen" if c == chosen else "  (KL too high)" if kl[c] > max_kl
                else "  (eliminated)" if choice.prompts[c] < finalists else "")
        ui.say(f"{c:5d} {scores[c]:8.3f} {kl[c]:8.4f} {choice.prompts[c]:7d} {stats.separation[c]:10.2f}{mark}")
    if kl[chosen] > max_kl:
        ui.say(f"note: no candidate kept the KL within --max-kl {max_kl:g}; took the lowest-KL one. "
               f"Check the prompts (a base model without a chat template often has no refusal to find).")
    return chosen, {"candidates": ",".join(map(str, candidates)), "max_kl": str(max_kl), "layer_measure": measure,
                    "baseline_score": f"{choice.baseline:.6f}", "layer_test": test,
                    "score_prompts": str(count), "scored_prompts": ",".join(str(choice.prompts[c]) for c in candidates)}
