"""Reading a direction before it is baked, as one job: an `ExplainRequest` in, an
`ExplainResult` out (what the terminal shows, and the report where asked).

The direction is read on the model it was measured on: the words it promotes and suppresses
through the model's own output head, the pack's prompts (from the file's `behaviour`, or given)
projected on it, which writers write along it, and how far two halves of the prompts agree
(`direction/explain.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.direction.explain import (TOP_TOKENS, Explanation, asked_tokens, capture, explain, head_norm,
    head_tensor)
from gguf_abliterate.direction.measure import DEFAULT_POSITION, Position, at_position, candidate_layers
from gguf_abliterate.direction.packs import PACKS, Pack, load_pack
from gguf_abliterate.errors import UserError
from gguf_abliterate.formats.direction_file import Direction, load_direction
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.jobs.ui import Ui
from gguf_abliterate.report import claim_report
from gguf_abliterate.runtime.llama import LlamaModel
from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET, Thinking

AGREES = 0.9  # below this, the direction measured here is not the file's (other model, prompts or position)


@dataclass(frozen=True, kw_only=True)
class ExplainRequest:
    direction: Path
    model: Path
    blocks: tuple[int, ...] = ()  # () : the block the file was measured at (or its strongest)
    pack: Pack | None = None  # None: the pack the file names
    prompts: Path | None = None  # the user's own prompts, projected too
    tokens: tuple[str, ...] = ()  # texts whose first token's rank is shown (refusal adds its openings)
    top: int = TOP_TOKENS
    thinking: Thinking = field(default_factory=Thinking)
    report: Path | None = None
    force: bool = False


@dataclass
class ExplainResult:
    explanation: Explanation
    summary: list[str] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)


def run_explain(request: ExplainRequest, ui: Ui = Ui()) -> ExplainResult:
    r = request
    d = load_direction(r.direction)
    meta = Model(r.model)
    d.check_fits(meta.n_layer, meta.n_embd, meta.arch)
    head_tensor(meta)  # a model without an output head or final norm fails here, before any work
    head_norm(meta)
    blocks = _blocks(r, d, meta.n_layer)
    pack = r.pack or _pack_of(d, ui)
    yours = P.load_prompts(r.prompts) if r.prompts else []
    if r.report is not None:
        claim_report(r.report, [r.model, r.direction], r.force)
    ours = pack.metadata()["positive_sha256"]
    if d.metadata.get("positive_sha256", ours) != ours:
        ui.say(f"note: {r.direction.name} was measured from other prompts than the {pack.name} pack's: the prompts "
               f"below are the pack's")
    with LlamaModel(r.model, thinking=r.thinking, room_for_thoughts=True) as model:
        asked = asked_tokens(model, r.tokens, pack.name)  # a --token that is no token fails before the passes
        position = Position(d.metadata.get("position", DEFAULT_POSITION.value))
        # the thoughts' budget the direction was read with, so the readings here are its own
        budget = int(d.metadata.get("thought_tokens", THOUGHT_BUDGET))
        sets = [at_position(model, s, position, ui.bar, budget) for s in pack.direction_sets()]
        mine = list(zip(yours, at_position(model, yours, position, ui.bar, budget)))
        seen = capture(model, sets[0], sets[1], mine, ui.bar)
        x = explain(meta, model.piece, d, blocks, seen, r.top, ui.bar, pack.name, asked)
    result = ExplainResult(x, _summary(x, d, r.direction.name))
    if r.report is not None:
        from gguf_abliterate.report import write_report

        write_report(r.report, f"gguf-abliterate explain: {r.direction.name} on {r.model.name}", explained=x,
                     direction_files=[r.direction])
        result.written.append(r.report)
        result.summary.append(f"wrote {r.report}")
    return result


def _blocks(r: ExplainRequest, d: Direction, n_layer: int) -> list[int]:
    """The blocks asked for; else the block the file's direction was measured at; else, for a
    searched schedule, its strongest block; else the middle block."""
    for b in r.blocks:
        if not 0 <= b < n_layer:
            raise UserError(f"--block {b}: the model has blocks 0-{n_layer - 1}")
    if r.blocks:
        return list(dict.fromkeys(r.blocks))
    layer = d.metadata.get("layer", "")
    if layer.isdigit() and int(layer) < n_layer:
        return [int(layer)]
    if d.strengths:
        return [int(np.argmax(sum(d.strengths.values())))]
    return [n_layer // 2]


def _pack_of(d: Direction, ui: Ui) -> Pack:
    """The shipped pack the file says it came from; else refusal, said so."""
    name = d.behaviour
    if name in PACKS:
        return load_pack(name)
    ui.say(f"note: the direction file names {'no pack' if name is None else f'pack {name!r}, not a shipped one'}; "
           f"reading it on the refusal pack's prompts (give --behaviour, or --positive and --negative)")
    return load_pack("refusal")


def _quote(text: str, width: int = 60) -> str:
    one = " ".join(text.split())
    return (one[: width - 1] + "…") if len(one) > width else one


def _summary(x: Explanation, d: Direction, name: str) -> list[str]:
    """The few lines that matter, for the terminal."""
    lines = []
    for b, lens in x.lenses.items():
        lines.append(f"{x.behaviour} direction at block {b}, through the output head:")
        lines.append("  promotes:   " + ", ".join(f"{t.text!r}" for t in lens.promoted))
        lines.append("  suppresses: " + ", ".join(f"{t.text!r}" for t in lens.suppressed))
        if lens.asked:
            lines.append(f"  ranks (of {lens.vocabulary}): " + ", ".join(f"{t.text!r} {rank}" for t, rank in lens.asked))
    at = x.blocks[0]
    candidates = candidate_layers(len(x.split_half))
    halves = x.split_half[candidates]
    lines.append(f"split-half cosine at block {at}: {x.split_half[at]:.3f} (blocks {candidates[0]}-{candidates[-1]}, "
                 f"where `direction` chooses: {np.nanmin(halves):.3f} to {np.nanmax(halves):.3f}); measured again "
                 f"here: {x.agreement[at]:.3f} with the file's")
    lines.append("  as the prompts grow (a half-set's prompts: cosine): "
                 + ", ".join(f"{n}: {c:.3f}" for n, c in x.growth))
    if x.agreement[at] < AGREES:
        lines.append(f"note: the direction measured here differs from {name}'s at block {at}: it was made on another "
                     f"model, from other prompts or at another position, and what follows reads this model")
    top, bottom = x.prompts[0], x.prompts[-1]
    lines.append(f"prompts at block {at}: positive mean {x.positive_mean:+.2f}, negative {x.negative_mean:+.2f}; "
                 f"most: {top.group} {_quote(top.text)!r} {top.load:+.2f}; least: {bottom.group} "
                 f"{_quote(bottom.text)!r} {bottom.load:+.2f}")
    if "probe_projection" in d.metadata:
        lines.append(f"the pack's probes sit at {float(d.metadata['probe_projection']):+.2f} (as the file records)")
    for p in x.yours[:3] + (x.yours[3:][-2:] if len(x.yours) > 3 else []):
        lines.append(f"  yours: {p.load:+.2f} ({x.share(p.load):.0%} of the way to positive) {_quote(p.text)!r}")
    shares = x.writes.shares()
    parts = [f"{k} {np.nansum(v):.0%}" for k, v in shares.items() if np.isfinite(v).any()]
    ranked = sorted(((float(v[b]), k, b) for k, v in shares.items() for b in range(len(v)) if np.isfinite(v[b])),
                    reverse=True)[:4]
    lines.append(f"writes along it (positive prompts, last token): {', '.join(parts)}; most: "
                 + ", ".join(f"block {b} {k} {s:.0%}" for s, k, b in ranked))
    heads = x.writes.head_shares()
    if heads is not None and np.isfinite(heads).any():
        flat = np.argsort(np.nan_to_num(heads, nan=-1).ravel())[::-1][:4]
        lines.append("  heads (block.head): " + ", ".join(f"{i // heads.shape[1]}.{i % heads.shape[1]} "
                                                          f"{heads.flat[i]:.1%}" for i in flat))
    return lines
