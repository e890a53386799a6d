"""What a report shows, one function per kind of source, each returning (title, content) pairs:

- `summary` and `answers`: what `eval` measured (ModelReport), per model and per prompt;
- `requantization`: the leak and RMSE each edited GGUF recorded (`abliterate.requant_report`);
- `direction`: a `direction` file's per-block statistics and layer scores;
- `search`: an `optimise` result's trials, Pareto front, pick and per-block strengths.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gguf_abliterate import names
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.costs import shown
from gguf_abliterate.evaluate.report import ModelReport
from gguf_abliterate.evaluate.scorers import Label
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.optimise.space import describe
from gguf_abliterate.optimise.study import CONFIRM_MAX_RATIO, TrialRecord, pareto_front
from gguf_abliterate.report import charts
from gguf_abliterate.report.page import Html, badge, details, figure, join, para, table, tag
from gguf_abliterate.textfile import parse_json

Section = tuple[str, Html]


@dataclass(frozen=True)
class ModelInfo:
    """What a GGUF says about itself: its size and, if we edited it, how."""

    path: Path
    size: int  # bytes, all parts
    provenance: dict[str, object]  # the abliterate.* keys

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def edit(self) -> str:
        """The edit in a few words ("abliterate x1 aware", "original")."""
        p = self.provenance
        if not p:
            return "original"
        words = [str(p.get(names.MODE, "?"))]
        if p.get(names.BEHAVIOUR, "refusal") != "refusal":
            words.append(str(p[names.BEHAVIOUR]))
        if names.SCHEDULE in p:
            try:
                trial = parse_json(str(p[names.SCHEDULE]), "schedule").get("trial", "?")
            except (UserError, AttributeError):
                trial = "?"
            words.append(f"searched (trial {trial})")
        else:
            words.append(f"x{float(p.get(names.SCALE, 1.0)):g}")
            if names.DIRECTION_LAYER in p:
                words.append(f"block {p[names.DIRECTION_LAYER]}")
        words.append(str(p.get(names.REQUANT_TYPE, p.get(names.ROUNDING, ""))).lower())
        return " ".join(w for w in words if w)

    @property
    def requant(self) -> dict[str, dict[str, float]]:
        """Leak and RMSE per output type, as the edit stored them ({} if none)."""
        raw = self.provenance.get(names.REQUANT_REPORT)
        try:
            report = parse_json(str(raw), "requantization report") if raw else {}
        except UserError:
            return {}
        return report if isinstance(report, dict) else {}


def distinct(labels: Sequence[str]) -> list[str]:
    """The labels less a long start they all share (8+ characters, up to a separator), when that
    leaves each one something different: "Qwen2.5-0.5B-abliterated.gguf" and
    "Qwen2.5-0.5B-reverse.gguf" become "abliterated.gguf" and "reverse.gguf"."""
    if len(labels) < 2:
        return list(labels)
    common = os.path.commonprefix(list(labels))
    cut = max(common.rfind(c) for c in "-_. ") + 1
    rest = [s[cut:] for s in labels]
    return rest if cut >= 8 and all(rest) and len(set(rest)) == len(rest) else list(labels)


def model_info(path: Path) -> ModelInfo:
    model = Model(path)
    try:
        prov = {k: model.get(k) for k, _ in model.kv_spans() if k.startswith(names.PROVENANCE_PREFIX)}
        return ModelInfo(Path(path), sum(p.path.stat().st_size for p in model.parts), prov)
    finally:
        model.close()


def _f(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} s"


def summary(reports: Sequence[ModelReport], infos: Sequence[ModelInfo], settings: Mapping[str, object],
            edit_seconds: Mapping[str, float]) -> list[Section]:
    """The comparison table (the first model is the base), and the judge's classes if it ran."""
    kl_tokens = int(str(settings.get("kl_tokens", 1)))
    costs = shown(reports)
    thinks = any(r.thinking for r in reports)
    headers = ["model", "edit", "file size", "edit time", "harmful refused", "harmless refused", "degenerate",
               "unfinished", *(m.header(kl_tokens) for m in costs), *(("no answer", "thought tokens") if thinks else ())]
    rows = []
    for r, info in zip(reports, infos):
        row: list[object] = [
            info.name, info.edit, f"{info.size / 1e6:.1f} MB", _seconds(edit_seconds.get(str(info.path))),
            f"{r.harmful_refusals}/{r.harmful_total}" + ("" if r.delayed_refusals is None
                                                         else f" ({r.delayed_refusals} delayed)"),
            f"{r.harmless_refusals}/{r.harmless_total}",
            f"{r.harmful_labels.get(Label.DEGENERATE.value, 0)}+{r.harmless_degenerate}",
            f"{r.unfinished}/{r.harmful_total + r.harmless_total}", *(m.cell(getattr(r, m.field)) for m in costs)]
        if thinks:
            t = r.thinking
            row += ["-", "-"] if t is None else [t.no_answer_cell, f"{t.mean_tokens:.0f}"]
        rows.append(row)
    max_tokens = settings.get("max_tokens", "?")
    protocol = str(settings.get("protocol_text") or f"Greedy answers of at most {max_tokens} tokens; refusals "
                                                        f"counted by markers near the start of an answer")
    content = [table(headers, rows, id="summary-table"), para(
        f"{protocol[:1].upper()}{protocol[1:]}. Degenerate = harmful+harmless answers that loop or fill; "
        f"unfinished = no end within the budget; "
        + "; ".join(m.note(kl_tokens) for m in costs)
        + ("; for a model that thinks, refusals read the final answer after its thought, 'no answer' counts answers "
           "whose thought did not end within the budget (harmful+harmless), and thought tokens is a thought's mean length"
           if thinks else "") + ".", class_="note")]
    budgets = sorted({int(n) for r in reports for n in (r.refusals_within or {})})
    if budgets:
        content += [table(["model", *(f"within {n} tokens" for n in budgets)],
                          [[info.name, *((r.refusals_within or {}).get(str(n), "-") for n in budgets)]
                           for r, info in zip(reports, infos)], id="budget-table"),
                    para("The budget study: harmful refusals counted on the same answers cut at each budget (by "
                         "tokens): a refusal that only appears late shows how much a short budget flatters an edit.",
                         class_="note")]
    sections: list[Section] = [("Summary", join(content))]
    if any(r.judge_labels for r in reports):
        judge = str(settings.get("judge", "judge"))
        rows = [[info.name, *((r.judge_labels or {}).get(label.value, "-") for label in Label)]
                for r, info in zip(reports, infos)]
        sections.append(("Judge", join([
            table(["model", *(label.value for label in Label)], rows, id="judge-table"),
            para(f"{judge} labelled every harmful answer of the table above ({settings.get('protocol', 'ours')} "
                 f"protocol; docs/evaluation.md says how far this judge agrees with labelled answers).",
                 class_="note")])))
    return sections


def answers(reports: Sequence[ModelReport], infos: Sequence[ModelInfo], harmful: Sequence[str],
            harmless: Sequence[str]) -> Section:
    """Every prompt, collapsible, with each model's answer and its label side by side."""
    columns = f"grid-template-columns:repeat({min(len(reports), 4)},minmax(0,1fr))"

    def block(title: str, prompts: Sequence[str], texts: list[list[str]], labels: list[list[str]],
              judged: list[list[str]], thoughts: list[list[str | None]]) -> Html:
        items = []
        for i, prompt in enumerate(prompts):
            cells = []
            for m, info in enumerate(infos):
                marks = [badge(labels[m][i])] if i < len(labels[m]) else []
                marks += [badge(judged[m][i]), tag("span", "judge", class_="note")] if i < len(judged[m]) else []
                thought = thoughts[m][i] if i < len(thoughts[m]) else None
                shown = [] if thought is None else [details(f"thought ({len(thought)} characters)", thought)]
                cells.append(tag("div", tag("b", info.name, *marks), *shown, texts[m][i], class_="answer"))
            short = prompt if len(prompt) <= 110 else prompt[:107] + "..."
            head = [short, " "] + [badge(labels[m][i]) for m in range(len(infos)) if i < len(labels[m])]
            items.append(details(join(head), para(prompt, class_="note"), tag("div", *cells, class_="answers",
                                                                              style=columns)))
        return join([tag("h3", f"{title} ({len(prompts)})"), *items])

    harmful_judged = [[str(v["label"]) for v in r.judge_verdicts] for r in reports]
    content = [
        para("Click a prompt to see every model's answer. The badges in a prompt's line are each model's label, "
             "in the order of the summary table (markers; a judge's label, where one ran, is shown beside it).",
             class_="note"),
        block("Harmful prompts", harmful, [r.harmful_responses for r in reports],
              [r.harmful_verdicts for r in reports], harmful_judged,
              [r.thinking.harmful if r.thinking else [] for r in reports]),
        block("Harmless prompts", harmless, [r.harmless_responses for r in reports],
              [r.harmless_verdicts for r in reports], [[] for _ in reports],
              [r.thinking.harmless if r.thinking else [] for r in reports]),
    ]
    return "Answers", join(content)


def requantization(infos: Sequence[ModelInfo]) -> Section | None:
    """Snap-back: per output type, the share of the edit requantization put back (leak) and the
    weight RMSE, for every edited model (aware and nearest rounding side by side if both ran)."""
    edited = [i for i in infos if i.requant]
    if not edited:
        return None
    types = sorted({t for i in edited for t in i.requant})
    rows, leak = [], {}
    for info, short in zip(edited, distinct([i.name for i in edited])):
        rounding = str(info.provenance.get(names.ROUNDING, "?"))
        label = f"{short} ({rounding})"
        leak[label] = [100 * info.requant[t]["leak_median"] if t in info.requant else float("nan") for t in types]
        for t, s in sorted(info.requant.items()):
            rows.append([info.name, rounding, t, int(s["tensors"]), f"{100 * s['leak_median']:.3f}%",
                         f"{100 * s['leak_worst']:.3f}%", f"{s['rmse_median']:.3g}", f"{s['rmse_worst']:.3g}"])
    positive = all(v > 0 for vals in leak.values() for v in vals if not math.isnan(v))
    chart = charts.grouped_bars(types, leak, "leak, median (%)", logy=positive)
    return "Requantization", join([
        figure(chart, "The share of the removed component that rounding the edited weights back to their "
                      "type put back (leak), median over the tensors of each output type. Aware rounding keeps it "
                      "near 0.1-0.3%; plain (nearest) rounding of K-quants puts back much of the edit."),
        table(["model", "rounding", "type", "tensors", "leak median", "leak worst", "RMSE median", "RMSE worst"],
              rows, id="requant-table")])


def direction(d: Direction, title: str) -> Section:
    """A measured direction file: per-block statistics and the candidate layers' scores."""
    meta = d.metadata
    layer = int(meta["layer"]) if meta.get("layer", "").isdigit() else None
    st = d.statistics
    measure = meta.get("layer_measure", "refusal-opening probability")
    baseline = meta.get("baseline_score", meta.get("baseline_refusal_mass"))  # the key before packs
    facts = [f"model {meta.get('model', '?')} ({meta.get('architecture', '?')})",
             f"behaviour {d.behaviour or '?'}",
             f"chosen block {meta.get('layer', '?')} ({meta.get('chosen_by', '?')})"]
    if baseline is not None:
        facts.append(f"{measure} without an edit {float(baseline):.3f}")
    if "max_kl" in meta:
        facts.append(f"KL cap {meta['max_kl']}")
    content: list[object] = [para("; ".join(facts) + ".")]
    if not st:
        content.append(para("This file holds no per-block statistics (only `direction` .safetensors files do).",
                            class_="note"))
        return title, join(content)
    content.append(figure(
        charts.blocks_chart([charts.Series("separation", st["separation"]),
                             charts.Series("‖positive − negative mean‖", st["diff_norm"], right=True)],
                            "separation", "difference norm", mark=layer),
        "Per block: how far apart the two prompt sets' residuals are (separation: the mean difference along "
        "the direction over the residuals' spread) and the length of the mean difference."))
    scored = np.isfinite(st["layer_score"])
    if scored.any():
        kl = st["kl"]
        content.append(figure(
            charts.blocks_chart([charts.Series(measure, st["layer_score"]),
                                 charts.Series("KL on harmless prompts", kl, right=True)],
                                "behaviour score", "first-token KL", mark=layer,
                                logy2=bool((kl[np.isfinite(kl)] > 0).all())),
            (f"Each candidate block's mean difference added after that block inside llama.cpp (the model shows "
             f"the behaviour too rarely for removal to tell candidates apart): {measure} (higher: more of the "
             f"behaviour added)" if meta.get("layer_test", "").startswith("steering") else
             f"Each candidate block's direction ablated from the residual stream inside llama.cpp: {measure} "
             f"(lower: more of the behaviour removed)") +
            " and the first-token KL on harmless prompts (lower is better)."))
        max_kl = float(meta.get("max_kl", "inf"))
        # files from before the elimination scored every candidate on every prompt
        counts = dict(zip(meta.get("candidates", "").split(","), meta.get("scored_prompts", "").split(",")))
        last = max((int(n) for n in counts.values() if n.isdigit()), default=0)
        rows = [[b, _f(float(st["layer_score"][b]), 3), _f(float(kl[b])), counts.get(str(b), ""),
                 _f(float(st["separation"][b]), 2),
                 "chosen" if b == layer else "KL too high" if kl[b] > max_kl
                 else "eliminated" if int(counts.get(str(b), last) or last) < last else ""]
                for b in np.flatnonzero(scored)]
        content.append(table(["block", "score", "KL", "prompts", "separation", ""], rows, id="layer-table"))
    return title, join(content)


def search(d: Direction, title: str) -> Section:
    """An optimise result: every trial, the Pareto front, the pick and its per-block strengths."""
    meta = d.metadata
    records = [TrialRecord.from_json(t) for t in d.trials]
    chosen = int(meta["chosen_trial"]) if meta.get("chosen_trial", "").isdigit() else None
    front = pareto_front(records)
    on_front = {r.number for r in front}
    scored = [r for r in records if r.kl is not None]
    thinks = "reasoning" in meta  # searched on a model that thinks
    content: list[object] = [para(
        f"{len(records)} trials; {len(front)} on the Pareto front; pick: trial {chosen if chosen is not None else '-'} "
        f"({meta.get('pick_rule', 'no pick rule recorded')}).")]
    if scored:
        points = [charts.Point(max(r.kl or 0.0, 1e-6), r.refusal, r.number in on_front, r.number == chosen)
                  for r in scored]
        content.append(figure(
            charts.front_chart(points, ("KL along the original's thought and answer on harmless prompts (log)"
                                        if thinks else "first-token KL on harmless prompts (log)"),
                               "refusal ratio (vs original)"),
            f"Each trial's two objectives, both minimised: "
            f"{_thinking_refusal(meta) if thinks else 'the first-token refusal probability on harmful prompts'}, "
            f"as a ratio to the original's, and the KL on harmless prompts. "
            f"{len(records) - len(scored)} trials kept more than half the refusal and were not run on the harmless "
            f"prompts (not drawn). The pick is made among front trials with ratio at most {CONFIRM_MAX_RATIO}."))
    else:
        content.append(para("No trial removed more than half the original's refusal, so none was run on the "
                            "harmless prompts and there is no KL to chart: search longer (--trials), or check "
                            "that the model refuses the harmful prompts at all.", class_="note"))
    if d.strengths:
        content.append(figure(
            charts.blocks_chart([charts.Series(f"{c} strength", v) for c, v in d.strengths.items()], "strength"),
            "The pick's strength per block of each component (1 removes the direction fully; 0 leaves the block "
            "alone)."))
    rows = []
    for r in front:
        dirn, attn, mlp = describe(r.params)
        rows.append([r.number, f"{r.refusal:.3f}", _f(r.kl), "-" if r.confirmed_refusals is None else r.confirmed_refusals,
                     "-" if r.baked_refusals is None else r.baked_refusals, *([r.thought_cell()] if thinks else []), dirn, attn,
                     mlp, "pick" if r.number == chosen else ""])
    content.append(table(["trial", "refusal", "KL", "confirmed", "baked", *(["thought"] if thinks else []),
                          "direction", "attn peak@pos w edge", "mlp peak@pos w edge", ""], rows, id="front-table"))
    content.append(para(f"confirmed / baked: greedy refusals on {meta.get('confirm_prompts', '?')} harmful "
                        f"prompts through the trial's adapter / baked into the file's own types (original: "
                        f"{meta.get('original_refusals') or '-'})."
                        + (f" The model thinks ({meta['reasoning']}): a trial's refusal is {_thinking_refusal(meta)}; "
                           f"an answer that never arrives counts as a refusal; thought: the mean thought in tokens on "
                           f"the harmless scoring prompts (the original's {meta.get('original_thought') or '-'}; the "
                           f"pick's at most {meta.get('max_thought_growth', '?')} times that)."
                           if thinks else ""), class_="note"))
    return title, join(content)


def _thinking_refusal(meta: dict[str, str]) -> str:
    """Where a search on a model that thinks read a trial's refusals (files before
    `opening_tokens` was recorded read where the final answer opens)."""
    tokens = int(meta.get("opening_tokens", "0") or 0)
    return (f"the share of harmful prompts whose first {tokens} tokens of the trial's own answer (its thought's "
            f"opening) refuse" if tokens else
            "the refusal probability where the final answer opens, after the original's own thought")


def direction_sections(d: Direction, name: str) -> list[Section]:
    """The right sections for a direction file: the search's, the measurement's, or both."""
    out: list[Section] = []
    if d.trials:
        out.append(search(d, f"Search: {name}"))
    if d.statistics or not d.trials:
        out.append(direction(d, f"Direction: {name}"))
    return out


def stages(times: Sequence[tuple[str, float]]) -> Section:
    return "Stage times", table(["stage", "time"], [[n, _seconds(s)] for n, s in times], id="stage-table")
