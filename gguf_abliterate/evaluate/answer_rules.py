"""Behaviour measures: does an answer show the behaviour? One small class each, by name.

A behaviour pack (`direction/packs.py`) measures its behaviour as the share of answers to
its probe prompts that show it. These are the rules a pack may choose:

- `markers`: the answer opens with a refusal marker (the refusal pack);
- `regex`: a pattern (Python `re` syntax, case-insensitive) occurs in the answer; matched by
  the `regex` module with a time limit, so a pattern that backtracks without end (a pack is a
  file from anywhere) is a one-line error, not a hang that Ctrl-C cannot stop;
- `length`: the answer ends within the token budget in at most N words (concise answers);
- `worked`: the answer shows its working: a calculation (`3 + 4`, `x = 5`, `2 * 6`) or three
  or more non-empty lines, rather than a bare result;
- `exact`: the answer's last integer is the probe's expected answer (needs probes with answers).

Whatever the rule, answers to probes with an expected answer are also scored for accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.markers import DEFAULT_MARKERS, is_refusal
from gguf_abliterate.evaluate.tasks import answer_value

_CALCULATION = re.compile(r"\d\s*[-+*/×÷=]\s*\(?-?\d|\b[a-z_]\w*\s*=\s*-?\d", re.IGNORECASE)


@dataclass(frozen=True)
class Probe:
    """A prompt asked plainly to see whether the behaviour shows, with its exact answer if any."""

    prompt: str
    answer: int | None = None


@dataclass(frozen=True)
class Reply:
    """What a measure reads of one answer."""

    text: str
    finished: bool  # ended within the token budget


@dataclass(frozen=True)
class Measured:
    """A behaviour measured on a probe set."""

    shown: int  # answers that show the behaviour
    total: int
    mean_words: float
    correct: int | None = None  # exact answers, where the probes have them

    @property
    def share(self) -> float:
        return self.shown / self.total if self.total else float("nan")

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else self.correct / self.total


class Measure:
    """Decides, answer by answer, whether the behaviour shows. Subclasses register with `name=`."""

    name: ClassVar[str]
    needs_answers: ClassVar[bool] = False

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            MEASURES[name] = cls

    def shows(self, probe: Probe, reply: Reply) -> bool:
        raise NotImplementedError

    def describe(self) -> str:
        """What a share of this measure means, for table headers and reports."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """The measure's parameters, as a pack file would give them."""
        return {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Measure) and (self.name, self.settings()) == (other.name, other.settings())

    def __hash__(self) -> int:
        return hash((self.name, repr(sorted(self.settings().items()))))

    def measure(self, probes: Sequence[Probe], replies: Sequence[Reply]) -> Measured:
        exact = all(p.answer is not None for p in probes) and bool(probes)
        return Measured(sum(self.shows(p, r) for p, r in zip(probes, replies)), len(probes),
                        sum(len(r.text.split()) for r in replies) / max(len(replies), 1),
                        sum(answer_value(r.text) == p.answer for p, r in zip(probes, replies)) if exact else None)


MEASURES: dict[str, type[Measure]] = {}


class Markers(Measure, name="markers"):
    def __init__(self, markers: Sequence[str] = DEFAULT_MARKERS):
        if isinstance(markers, str) or not all(isinstance(m, str) and m.strip() for m in markers) or not markers:
            raise UserError("markers measure: 'markers' is a list of non-empty phrases (an empty one would match "
                            "every answer)")
        self.markers = tuple(markers)

    def shows(self, probe: Probe, reply: Reply) -> bool:
        return is_refusal(reply.text, self.markers)

    def describe(self) -> str:
        return "refused (opens with a refusal marker)"

    def settings(self) -> dict[str, Any]:
        return {} if self.markers == DEFAULT_MARKERS else {"markers": list(self.markers)}


class Pattern(Measure, name="regex"):
    SECONDS = 1.0  # per answer; a sane pattern takes microseconds on a few hundred characters

    def __init__(self, pattern: str):
        import regex

        try:
            self.pattern = regex.compile(pattern, regex.IGNORECASE | regex.VERSION0)
        except (regex.error, TypeError, ValueError) as e:
            raise UserError(f"regex measure: bad pattern {str(pattern)[:80]!r} ({e})") from None

    def shows(self, probe: Probe, reply: Reply) -> bool:
        try:
            return self.pattern.search(reply.text, timeout=self.SECONDS) is not None
        except TimeoutError:
            raise UserError(f"regex measure: /{self.pattern.pattern[:80]}/ took over {self.SECONDS:g} s on one "
                            f"answer (a pattern that backtracks without end?)") from None

    def describe(self) -> str:
        return f"matches /{self.pattern.pattern}/"

    def settings(self) -> dict[str, Any]:
        return {"pattern": self.pattern.pattern}


class Length(Measure, name="length"):
    def __init__(self, max_words: int = 30):
        if not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1:
            raise UserError(f"length measure: max_words must be a whole number of at least 1, not {max_words!r}")
        self.max_words = max_words

    def shows(self, probe: Probe, reply: Reply) -> bool:
        return reply.finished and len(reply.text.split()) <= self.max_words

    def describe(self) -> str:
        return f"finished in at most {self.max_words} words"

    def settings(self) -> dict[str, Any]:
        return {"max_words": self.max_words}


class Worked(Measure, name="worked"):
    def shows(self, probe: Probe, reply: Reply) -> bool:
        lines = [line for line in reply.text.splitlines() if line.strip()]
        return bool(_CALCULATION.search(reply.text)) or len(lines) >= 3

    def describe(self) -> str:
        return "shows its working"


class Exact(Measure, name="exact"):
    needs_answers = True

    def shows(self, probe: Probe, reply: Reply) -> bool:
        return probe.answer is not None and answer_value(reply.text) == probe.answer

    def describe(self) -> str:
        return "exact answer"


def get_measure(name: str, **kwargs: Any) -> Measure:
    """A measure by name with its settings; a one-line error for an unknown name or setting."""
    try:
        cls = MEASURES[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown measure {name!r} (known: {', '.join(sorted(MEASURES))})") from None
    try:
        return cls(**kwargs)
    except TypeError:
        raise UserError(f"measure {name!r} does not take the settings {sorted(kwargs)}") from None
