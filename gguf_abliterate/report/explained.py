"""What a report shows of `explain`: the words a direction speaks for, the prompts that carry
it, where it lives, and how sure it is (`direction/explain.py` says how each is read)."""

from __future__ import annotations

import numpy as np

from gguf_abliterate.direction.explain import WRITERS, Explanation, Lens
from gguf_abliterate.report import charts
from gguf_abliterate.report.page import Html, details, figure, join, para, table

Section = tuple[str, Html]
WRITER_NAMES = {"attn": "attention", "mlp": "MLP", "rest": "rest of the block"}


def _tokens(lens: Lens) -> Html:
    rows = [[i + 1, repr(p.text), p.id, f"{p.logit:+.3f}", repr(s.text), s.id, f"{s.logit:+.3f}"]
            for i, (p, s) in enumerate(zip(lens.promoted, lens.suppressed))]
    return table(["rank", "promoted", "id", "logit", "suppressed", "id", "logit"], rows, class_="tokens")


def explained(x: Explanation) -> list[Section]:
    """The sections of an explanation, in reading order."""
    at = x.blocks[0]
    words: list[object] = [para(
        f"The {x.behaviour} direction read through the model's own final norm and output head: the tokens whose "
        f"logits adding it raises most (promoted) and lowers most (suppressed). Logit: the change per unit of the "
        f"direction, before the norm's scale for the position.")]
    for b, lens in x.lenses.items():
        words += [para(f"Block {b}:"), _tokens(lens)]
        if lens.asked:
            words.append(para(f"Where the tokens asked about rank among all {lens.vocabulary} (1: promoted most)"
                              + (": the refusal openings the layer test scores first, then those given with --token."
                                 if x.behaviour == "refusal" else ".")))
            words.append(table(["token", "id", "logit", f"rank of {lens.vocabulary}"],
                               [[repr(t.text), t.id, f"{t.logit:+.3f}", rank] for t, rank in lens.asked]))
    prompts = [[p.group, f"{p.load:+.2f}", f"{x.share(p.load):.0%}", p.text] for p in x.prompts]
    carried: list[object] = [
        para(f"Each direction prompt's residual at block {at} (its last token), projected on the direction: "
             f"positive mean {x.positive_mean:+.2f}, negative mean {x.negative_mean:+.2f}. Share: of the way from "
             f"the negative mean (0%) to the positive (100%)."),
        details(f"all {len(prompts)} prompts, highest first", table(["set", "load", "share", "prompt"], prompts))]
    if x.yours:
        carried.append(table(["load", "share", "your prompt"],
                             [[f"{p.load:+.2f}", f"{x.share(p.load):.0%}", p.text] for p in x.yours]))
    shares = x.writes.shares()
    lives: list[object] = [
        figure(charts.heat_map(x.neighbours, "block", "block", "cosine", -1.0, 1.0),
               "The cosine between every two blocks' directions: a block of similar colour is a stretch of the "
               "model where the direction stays the same."),
        figure(charts.grouped_bars([str(b) for b in range(len(shares["attn"]))],
                                   {WRITER_NAMES[k]: 100 * shares[k] for k in WRITERS}, "% of all writes"),
               "What each writer of each block adds along the direction at the last token of the positive prompts "
               "(mean size), as a share of all: what an edit removes, so which components it mostly changes. The "
               "rest of a block is its residual change less attention and the MLP (experts, SSM or convolution "
               "layers, scales; near zero in a dense model)."),
        table(["writer", "share of all writes"],
              [[WRITER_NAMES[k], f"{np.nansum(shares[k]):.1%}"] for k in WRITERS])]
    heads = x.writes.head_shares()
    if heads is not None and np.isfinite(heads).any():
        lives.append(figure(charts.heat_map(100 * heads, "head", "block", "% of all writes", square=False),
                            "Each attention head's share (its column block of the output projection)."))
    if x.writes.notes:
        lives.append(para("; ".join(x.writes.notes), class_="note"))
    sure = [figure(charts.blocks_chart([charts.Series("split-half cosine", x.split_half),
                                        charts.Series("measured here vs the file's", x.agreement)],
                                       "cosine", mark=at, mark_label="read at"),
                   "Split-half: the direction measured from alternate prompts of each set, the two halves' "
                   "cosine (near 1: the prompts agree, more would not change it). Measured here vs the file's: the "
                   "same prompts measured on this model again, against the direction the file holds (below 0.9: "
                   "the file came from another model, other prompts or another position)."),
            table(["prompts in each half-set", f"split-half cosine at block {at}"],
                  [[n, f"{c:.3f}"] for n, c in x.growth]),
            para("The same cosine at the block read, from the first 2, 4, 8, ... prompts of each half: where it has "
                 "flattened near 1, the direction did not need more prompts.", class_="note")]
    return [("What it says", join(words)), ("The prompts that carry it", join(carried)),
            ("Where it lives", join(lives)), ("How sure it is", join(sure))]
