"""Behaviour packs: what a direction means, as data.

A pack is two prompt sets that differ in one behaviour (`positive` shows it, `negative` does
not, on the same topics), the probe prompts its effect is measured on (asked plainly) and the
measure that reads the answers (`evaluate/answer_rules.py`). The direction is the difference of
means positive minus negative, measured on the even lines of each set; the odd lines are the
validation split. Abliterating removes the component along the direction; `--reverse`
amplifies it, whichever side of the axis the model leans to (`W + s u u^T W` is the same for
`-u`), so it strengthens the behaviour only where the model already leans towards it
(`direction/lean.py` says which way); `--steer` adds the mean difference whatever the lean
(`edit/steer.py`).

Shipped (`PACKS`), all written for this project:

- `refusal`: harmful vs harmless requests; probes: the harmful validation prompts; measure:
  refusal markers.
- `reasoning`: generated exact-answer questions (`evaluate/tasks.py`, seed `REASONING_SEED`)
  wrapped as "think step by step, then answer" vs "answer with the number only"; probes: the
  validation questions asked plainly; measure: answers that show their working, and accuracy.
- `concise`: everyday questions (`data/questions.txt`) wrapped as "answer in one short
  sentence" vs "answer in detail"; probes: the validation questions asked plainly; measure:
  answers that end in at most 30 words.
- `markdown`: the same questions wrapped as "format it in Markdown" vs "plain prose";
  measure: answers with a Markdown list item, heading or bold span.

A user pack is a JSON file (`load_pack`): `name`, `positive` and `negative` (prompt files,
relative to the pack, or lists), optionally `probes` (a file or list, entries may carry an
integer `answer`; default: the positive set's validation split), `measure` (a name, or an
object with `name` and its settings) and `max_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import numpy as np

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.direction.measure import LayerScorer
from gguf_abliterate.formats.direction_file import SIGN
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.generate import MAX_ANSWER_TOKENS
from gguf_abliterate.evaluate.answer_rules import Markers, Measure, Probe, Reply, get_measure
from gguf_abliterate.evaluate.first_token import refusal_masses, refusal_token_ids
from gguf_abliterate.evaluate.tasks import generate_tasks
from gguf_abliterate.runtime.llama import LlamaModel, Prompt
from gguf_abliterate.textfile import read_json

REASONING_SEED = 17  # not eval's --task-seed default 0: the pack's questions are not eval's tasks
STEP_BY_STEP = "Think step by step, showing your working, then give the final answer."
RESULT_ONLY = "Answer with the number only."
SHORT = "Answer in one short sentence."
DETAILED = "Answer in detail: explain step by step and give an example."
MARKDOWN = "Format your answer in Markdown, with a short heading and a bulleted list."
PROSE = "Answer in plain prose: no lists, no headings, no bold or other formatting."
# a Markdown list item, heading or bold span anywhere in the answer
MARKDOWN_PATTERN = r"(?m)^\s*(?:[-*+]|\d+\.|#{1,6})\s+\S|\*\*[^*\n]+\*\*"
# `direction --layer auto` on a pack measured by generation: answer length and default probe count
# (each candidate costs a batch of greedy answers: on 2 cores, 16 x 32 tokens of Qwen2.5-0.5B ~ 10 s)
SCORE_TOKENS = 32
SCORE_PROBES = 16
# below this share without an edit, a pack's layers are tested by steering, not ablation
STEER_BELOW = 0.5


@dataclass(frozen=True)
class Pack:
    name: str
    positive: tuple[str, ...]  # prompts that show the behaviour
    negative: tuple[str, ...]  # the same topics without it
    probes: tuple[Probe, ...]  # asked plainly, to measure the behaviour on
    measure: Measure | None  # None: a pack from two prompt files, with nothing to measure it by
    max_tokens: int = 64  # answer length when measuring
    about: str = ""  # one line for --help and reports
    source: str = "shipped"  # or the pack file's path

    def __post_init__(self) -> None:
        for what, prompts in (("positive", self.positive), ("negative", self.negative)):
            if len(prompts) < 2:
                raise UserError(f"pack {self.name!r}: the {what} set needs at least 2 prompts "
                                f"(one to measure the direction, one to validate it)")
        if sorted(self.positive) == sorted(self.negative):
            raise UserError(f"pack {self.name!r}: the positive and negative sets are identical, so there is "
                            f"no difference to measure")
        if not self.probes:
            raise UserError(f"pack {self.name!r}: no probe prompts to measure the behaviour on")
        if self.measure is not None and self.measure.needs_answers and any(p.answer is None for p in self.probes):
            raise UserError(f"pack {self.name!r}: the {self.measure.name!r} measure needs an integer 'answer' "
                            f"for every probe")
        if self.max_tokens < 1:
            raise UserError(f"pack {self.name!r}: max_tokens must be at least 1")

    def direction_sets(self) -> tuple[list[str], list[str]]:
        """(positive, negative): the even lines, which make the direction."""
        return P.split(list(self.positive), "direction"), P.split(list(self.negative), "direction")

    def metadata(self) -> dict[str, str]:
        """What a direction file records about the pack it came from."""
        return {"behaviour": self.name, "pack": self.source, "sign": SIGN,
                "measure": self.measure.name if self.measure else "none",
                "positive_sha256": P.prompt_hash(list(self.positive)),
                "negative_sha256": P.prompt_hash(list(self.negative))}

    @property
    def first_token(self) -> bool:
        """Refusal has a first-token stand-in (refusal-opening probability); other packs generate."""
        return isinstance(self.measure, Markers)

    def layer_measure(self) -> str:
        if self.measure is None:
            return "separation"
        return ("refusal-opening probability" if self.first_token
                else f"share that {self.measure.describe()}, {SCORE_TOKENS} tokens")

    def first_token_scores(self, model: LlamaModel, logprobs: np.ndarray) -> np.ndarray:
        """Per probe, the layer test's score read from the first-token log-probabilities where
        the probes' answers open (a first-token pack: refusal-opening probability)."""
        return refusal_masses(logprobs, refusal_token_ids(model))

    def layer_scorer(self, model: LlamaModel, count: int) -> LayerScorer:
        """The behaviour's score on each of probes lo:hi of the first `count`, a direction
        ablated (or None; lower means less of the behaviour), and the next-token
        log-probabilities of other prompts under the same edit: for refusal, in the same pass."""
        probes = list(self.probes[:count])
        prompts = model.at_answer([p.prompt for p in probes])  # a thinking model: where its final answer opens
        if self.measure is None:
            raise UserError(f"pack {self.name!r} has no measure to score layers by")
        if self.first_token:
            def masses(r: np.ndarray | None, lo: int, hi: int, also: Sequence[Prompt] = ()) -> tuple[np.ndarray, np.ndarray]:
                # one pass: the system turn the two sets open with is computed once
                lp = model.next_token_logprobs([*prompts[lo:hi], *also], ablate=r, share_prefix=True)
                return self.first_token_scores(model, lp[: hi - lo]), lp[hi - lo :]
            return masses

        def shown(r: np.ndarray | None, lo: int, hi: int, also: Sequence[Prompt] = ()) -> tuple[np.ndarray, np.ndarray]:
            answers = model.greedy_answers(prompts[lo:hi], min(SCORE_TOKENS, self.max_tokens), ablate=r)
            assert self.measure is not None
            values = np.array([self.measure.shows(p, Reply(a.reply, a.finished)) for p, a in zip(probes[lo:hi], answers)],
                              np.float64)
            return values, model.next_token_logprobs(also, ablate=r, share_prefix=True)
        return shown


def refusal_pack(harmful: Path | None = None, harmless: Path | None = None) -> Pack:
    """The refusal pack, with the user's harmful or harmless prompt files in place of the
    built-in sets where given."""
    bad, good = P.default_prompts("all")
    bad = P.load_prompts(harmful) if harmful else bad
    good = P.load_prompts(harmless) if harmless else good
    return Pack("refusal", tuple(bad), tuple(good), tuple(Probe(p) for p in P.split(bad, "validation")),
                get_measure("markers"), 64, "refuses harmful requests (harmful vs harmless requests)",
                "shipped" if harmful is None and harmless is None else "user prompt files")


def _reasoning() -> Pack:
    tasks = generate_tasks(96, REASONING_SEED)
    return Pack("reasoning", tuple(f"{STEP_BY_STEP}\n\n{t.question}" for t in tasks),
                tuple(f"{RESULT_ONLY}\n\n{t.question}" for t in tasks),
                tuple(Probe(t.question, t.answer) for t in P.split(tasks, "validation")),  # type: ignore[arg-type]
                get_measure("worked"), 96, "shows its working on arithmetic and code-tracing questions")


def _questions() -> list[str]:
    text = files("gguf_abliterate").joinpath("data", "questions.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _concise() -> Pack:
    questions = _questions()
    return Pack("concise", tuple(f"{SHORT}\n\n{q}" for q in questions), tuple(f"{DETAILED}\n\n{q}" for q in questions),
                tuple(Probe(q) for q in P.split(questions, "validation")), get_measure("length", max_words=30), 96,
                "answers everyday questions in one short sentence rather than at length")


def _markdown() -> Pack:
    questions = _questions()
    return Pack("markdown", tuple(f"{MARKDOWN}\n\n{q}" for q in questions), tuple(f"{PROSE}\n\n{q}" for q in questions),
                tuple(Probe(q) for q in P.split(questions, "validation")),
                get_measure("regex", pattern=MARKDOWN_PATTERN), 96,
                "formats everyday answers as Markdown (lists, headings, bold) rather than plain prose")


PACKS: dict[str, Callable[[], Pack]] = {"refusal": refusal_pack, "reasoning": _reasoning, "concise": _concise,
                                        "markdown": _markdown}


def load_pack(name_or_path: str | Path) -> Pack:
    """A shipped pack by name, or a user pack from its JSON file."""
    if str(name_or_path) in PACKS:
        return PACKS[str(name_or_path)]()
    path = Path(name_or_path)
    if path.suffix.lower() != ".json":
        raise UserError(f"unknown behaviour {str(name_or_path)!r}: give a shipped pack "
                        f"({', '.join(PACKS)}) or a pack file (.json)")
    spec = read_json(path, "pack file")
    if not isinstance(spec, dict):
        raise UserError(f"{path}: a pack file is a JSON object with 'positive' and 'negative'")
    unknown = set(spec) - {"name", "positive", "negative", "probes", "measure", "max_tokens", "about"}
    if unknown:
        raise UserError(f"{path}: unknown pack fields {sorted(unknown)}")
    for key in ("positive", "negative"):
        if key not in spec:
            raise UserError(f"{path}: the pack has no {key!r} prompts")
    name = spec.get("name", path.stem)
    positive = _entries(spec["positive"], path, "positive")
    negative = _entries(spec["negative"], path, "negative")
    probes = (_entries(spec["probes"], path, "probes") if "probes" in spec
              else P.split(positive, "validation"))
    measure = spec.get("measure", "markers")
    if isinstance(measure, str):
        measure = {"name": measure}
    if not isinstance(measure, dict) or not isinstance(measure.get("name"), str):
        raise UserError(f"{path}: 'measure' is a name or an object with a 'name'")
    max_tokens = spec.get("max_tokens", 64)
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= MAX_ANSWER_TOKENS:
        raise UserError(f"{path}: max_tokens must be a whole number from 1 to {MAX_ANSWER_TOKENS}")
    return Pack(str(name), tuple(str(e["prompt"]) for e in positive), tuple(str(e["prompt"]) for e in negative),
                tuple(_probe(e, path) for e in probes),
                get_measure(measure["name"], **{k: v for k, v in measure.items() if k != "name"}),
                max_tokens, str(spec.get("about", "")), str(path))


def pack_from_files(positive: Path, negative: Path, name: str) -> Pack:
    """A pack from two prompt files (`direction --positive --negative`): a direction, with no
    measure (a pack file gives one)."""
    bad, good = P.load_prompts(positive), P.load_prompts(negative)
    return Pack(name, tuple(bad), tuple(good), tuple(Probe(p) for p in P.split(bad, "validation")),
                None, source=f"{positive} / {negative}")


def _entries(value: object, pack: Path, what: str) -> list[dict[str, object]]:
    """Prompt entries from a file (relative to the pack file, and inside its folder: a pack is a
    file from anywhere, and its prompts appear in outputs) or an inline list."""
    if isinstance(value, str):
        folder = pack.parent.resolve()
        file = (folder / value).resolve()
        if not file.is_relative_to(folder):
            raise UserError(f"{pack}: {what} file {value[:80]!r} is outside the pack's folder ({folder}); "
                            f"copy it there and name it relative to the pack")
        return P.load_entries(file, ("answer",))
    if isinstance(value, list):
        entries = []
        for n, item in enumerate(value, 1):
            if isinstance(item, str) and item.strip():
                entries.append({"prompt": item.strip()})
            elif isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"].strip():
                entries.append({"prompt": item["prompt"].strip(), **({"answer": item["answer"]} if "answer" in item else {})})
            else:
                raise UserError(f"{pack}: {what} entry {n} is not a prompt string (or an object with a 'prompt' field)")
        if entries:
            return entries
    raise UserError(f"{pack}: {what!r} is empty; give a prompt file or a list of prompts")


def _probe(entry: dict[str, object], pack: Path) -> Probe:
    answer = entry.get("answer")
    if answer is not None and (not isinstance(answer, int) or isinstance(answer, bool)):
        raise UserError(f"{pack}: probe {entry['prompt']!r}: 'answer' must be an integer")
    return Probe(str(entry["prompt"]), answer)
