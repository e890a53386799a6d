"""Capability directions: read from the model's own right and wrong answers, not from two prompt
styles.

A contrast of prompt styles ("think step by step" against "the number only") finds the direction
of a format, and amplifying a format adds no competence (measured: the `reasoning` pack). Here
the model answers generated problems greedily, with room to work; each answer is labelled right
or wrong by the problem's checker; the residual stream after each block and every head's output
(the attention output projection's input) are averaged over each answer's tokens; and the
direction of a block is the mean over right answers minus the mean over wrong ones (what success
has more of). The heads an edit then touches are those that write most along the failure side
(minus that direction) while the model fails: per head, `-d . W_o[:, head] a`, with `a` the
head's output averaged over the wrong answers' tokens.

Before any of that, whether there is anything to find: accuracy by answer length and by style
(worked in steps or not), on the model's own answers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gguf import MODEL_TENSOR

from gguf_abliterate.direction.answer_log import AnswerLog
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.problems import Problem, is_right
from gguf_abliterate.formats.direction_file import normalise
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.names import block_tensor
from gguf_abliterate.runtime.llama import Answer, LlamaModel

MIN_EACH = 8  # right and wrong answers each needed for a difference of means worth reading
DEFAULT_HEADS = 20  # ThinkEdit's order of magnitude: about 5% of a small model's heads
LOG_BATCH = 64  # problems answered between two writes of the answer log (eval's sequences per batch)


@dataclass
class Labelled:
    """The model's own answers to problems, each right or wrong."""

    problems: list[Problem]
    answers: list[Answer]
    right: np.ndarray  # bool, per answer

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(a.tokens) for a in self.answers])

    @property
    def finished(self) -> np.ndarray:
        return np.array([a.finished for a in self.answers], bool)

    @property
    def contrasted(self) -> bool:
        """Enough right and enough wrong answers for a difference of means worth reading."""
        return min(self.right.sum(), (~self.right).sum()) >= MIN_EACH

    def only_finished(self) -> Labelled:
        """The answers that ended within the budget. A cut answer is mostly wrong and mostly a
        loop or a long unfinished working, so with it among the wrong ones the difference of
        means reads finishing against not finishing as much as right against wrong."""
        keep = np.flatnonzero(self.finished)
        return Labelled([self.problems[i] for i in keep], [self.answers[i] for i in keep], self.right[keep])


def label(model: LlamaModel, problems: Sequence[Problem], budget: int,
          progress: Callable[[int], None] = lambda n: None, log: AnswerLog | None = None) -> Labelled:
    """Greedy answers within `budget` tokens, labelled by the problems' checker. With `log`, the
    answers it holds are taken as they are, and the rest are generated `LOG_BATCH` problems at
    a time, each batch logged as it is done."""
    kept = log.load() if log is not None else {}
    todo = [p.prompt for p in problems if p.prompt not in kept]
    progress(len(problems) - len(todo))
    step = LOG_BATCH if log is not None else max(1, len(todo))
    for start in range(0, len(todo), step):
        prompts = todo[start : start + step]
        answers = model.greedy_answers(prompts, budget, progress)
        if log is not None:
            log.add(prompts, answers)
        kept.update(zip(prompts, answers))
    answers = [kept[p.prompt] for p in problems]
    return Labelled(list(problems), answers, np.array([is_right(p, a.reply) for p, a in zip(problems, answers)], bool))


OPERATORS = (" + ", " - ", " × ", " * ", " / ")


def worked(answer: str) -> bool:
    """An answer that shows its working: at least two lines with a calculation."""
    return sum(1 for line in answer.splitlines() if "=" in line or any(op in line for op in OPERATORS)) >= 2


@dataclass
class Findable:
    """Accuracy by answer length and style: whether right and wrong answers differ in a way a
    direction could carry."""

    total: int
    right: int
    short: tuple[int, int]  # (right, of) among the shorter half of the answers
    long: tuple[int, int]
    unfinished: tuple[int, int]  # (right, of) among answers cut by the budget
    worked: tuple[int, int]
    unworked: tuple[int, int]
    median_tokens: float

    @staticmethod
    def of(labelled: Labelled) -> Findable:
        right, lengths, done = labelled.right, labelled.lengths, labelled.finished
        median = float(np.median(lengths))
        style = np.array([worked(a.reply) for a in labelled.answers], bool)

        def share(mask: np.ndarray) -> tuple[int, int]:
            return int(right[mask].sum()), int(mask.sum())

        return Findable(len(right), int(right.sum()), share(lengths <= median), share(lengths > median),
                        share(~done), share(style), share(~style), median)

    def lines(self) -> list[str]:
        def pct(pair: tuple[int, int]) -> str:
            return f"{pair[0]}/{pair[1]}" + (f" ({pair[0] / pair[1]:.0%})" if pair[1] else "")

        out = [f"the model's own answers: {pct((self.right, self.total))} right",
               f"  by length: shorter half (<= {self.median_tokens:.0f} tokens) {pct(self.short)}, longer half "
               f"{pct(self.long)}; cut by the budget {pct(self.unfinished)}",
               f"  by style: worked in steps {pct(self.worked)}, not worked {pct(self.unworked)}"]
        if self.short[1] and self.long[1] and self.short[0] / self.short[1] >= self.long[0] / self.long[1]:
            out.append("  note: short answers are not less accurate than long ones here; the direction reads "
                       "right against wrong, not careful against rushed")
        return out


@dataclass
class CapabilityDirection:
    """Per block: the unit success-minus-failure direction and its length; per head: how much it
    writes along the failure side on wrong answers; the chosen heads."""

    directions: np.ndarray  # (n_layer, n_embd), unit rows
    diff_norms: np.ndarray  # (n_layer,)
    head_scores: np.ndarray  # (n_layer, n_head)
    heads: dict[int, tuple[int, ...]]

    def describe_heads(self) -> str:
        return ", ".join(f"{b}.{h} ({self.head_scores[b, h]:+.3f})" for b, hs in self.heads.items() for h in hs)


def measure(model: LlamaModel, weights: Model, labelled: Labelled, n_heads: int = DEFAULT_HEADS,
            progress: Callable[[int], None] = lambda n: None) -> CapabilityDirection:
    """The direction per block and the heads, from the labelled answers (teacher-forced again to
    read the residual stream and the heads' outputs over each answer's tokens)."""
    right = labelled.right
    if not labelled.contrasted:
        raise UserError(f"the model answered {int(right.sum())} of {len(right)} problems right: a direction needs "
                        f"at least {MIN_EACH} right and {MIN_EACH} wrong answers (give more problems, or a family "
                        f"the model solves sometimes)")
    residual, heads_out = model.answer_means([p.prompt for p in labelled.problems],
                                             [a.tokens for a in labelled.answers], progress)
    diff = residual[right].mean(axis=0, dtype=np.float64) - residual[~right].mean(axis=0, dtype=np.float64)
    directions = normalise(diff, "success-minus-failure direction")
    failing = heads_out[~right].mean(axis=0, dtype=np.float64)  # (n_layer, n_attn_in)
    scores = head_scores(weights, -directions, failing)
    return CapabilityDirection(directions, np.linalg.norm(diff, axis=1).astype(np.float32), scores,
                               top_heads(scores, n_heads))


def head_scores(weights: Model, failure: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """(n_layer, n_head): per head, f . W_o[:, head] a, with f the block's unit failure direction
    and a the head's mean output (`outputs`, heads side by side)."""
    rows = []
    for block in range(weights.n_layer):
        count, width = weights.attention_heads(block)
        w_o = weights.values(block_tensor(MODEL_TENSOR.ATTN_OUT, block, "weight"))  # (n_embd, n_head * width)
        along = failure[block] @ w_o  # what each input column writes along f
        rows.append((along * outputs[block]).reshape(count, width).sum(axis=1))
    if len({len(r) for r in rows}) != 1:
        raise UserError("the blocks have different head counts: head choice needs the same count in every block")
    return np.stack(rows).astype(np.float32)


def top_heads(scores: np.ndarray, n: int) -> dict[int, tuple[int, ...]]:
    """The n heads with the largest positive scores, as block -> heads."""
    order = np.argsort(scores, axis=None)[::-1][:n]
    chosen: dict[int, list[int]] = {}
    for flat in order:
        block, head = divmod(int(flat), scores.shape[1])
        if scores[block, head] > 0:
            chosen.setdefault(block, []).append(head)
    return {b: tuple(sorted(h)) for b, h in sorted(chosen.items())}
