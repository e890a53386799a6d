"""Models that think before they answer: each reasoning format as data, read off the chat template.

A thinking model's first answer tokens are the start of a thought (`<think>`, "Okay, the user
wants..."), so every measure that reads an answer must read the *final* answer, after the
thought, and every first-token measure must be taken where the final answer opens. This module
knows, per format:

- how a chat template switches thinking on or off, or sets an effort (`FORMATS`);
- the markers that open and close a thought, or Harmony's channels;
- the prompt that puts a model where its final answer opens, after a closed empty thought
  (`opening`), and how a generated text splits into thought and final answer (`split`).

Formats (recognised from the template's text by `detect`):

- `qwen3`: `<think>...</think>`, switched by the template variable `enable_thinking` (Qwen3,
  Qwen 3.5, and any template with that switch); off, the template writes a closed empty thought.
- `smollm3`: the same tags, switched by `/think` or `/no_think` in the system turn.
- `deepseek-r1`: the same tags, always on, often opened by the template itself (R1 distills,
  Phi-4-reasoning): no off.
- `harmony` (gpt-oss): an `analysis` channel, then `final`; the template's `reasoning_effort`
  (low, medium, high): no off.
- `none`: the model answers at once (every other template); nothing changes for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from gguf_abliterate.errors import UserError

MODES = ("auto", "on", "off")  # auto: as the template renders without being asked
EFFORTS = ("low", "medium", "high")
# tokens a thought may take before the final answer must have opened; on top of an answer's own budget
THOUGHT_BUDGET = 512
# a model that thinks generates hundreds of tokens per answer: its context (and decode) is this
# many times larger, so a batch still holds many answers (about 40 MB of cache per 1k tokens on a 1.5B)
THINKING_BATCH = 4


@dataclass(frozen=True)
class Thinking:
    """What the user asked for: `--thinking auto|on|off` and, where the format has one, `--effort`."""

    mode: str = "auto"
    effort: str | None = None


@dataclass(frozen=True)
class Format:
    name: str
    families: str  # who uses it, for messages
    opens: str = "<think>"
    closes: str = "</think>"
    switch: str | None = None  # template variable: True/False turns thinking on/off
    system_flags: tuple[str, str] | None = None  # (on, off) flags put in the system turn
    can_turn_off: bool = True
    efforts: tuple[str, ...] = ()
    effort_variable: str | None = None
    channels: bool = False  # Harmony: analysis, then final
    thinks: bool = True

    def supported(self) -> str:
        """What the model accepts, for a one-line refusal."""
        modes = "on or off" if self.can_turn_off else "on only"
        effort = f", --effort {'|'.join(self.efforts)}" if self.efforts else ", no --effort"
        return f"{self.name} ({self.families}): --thinking {modes}{effort}"


NONE = Format("none", "models that answer at once", opens="", closes="", thinks=False, can_turn_off=True)
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("qwen3", "Qwen3, Qwen 3.5: enable_thinking", switch="enable_thinking"),
    Format("smollm3", "SmolLM3: /think, /no_think", system_flags=("/think", "/no_think")),
    Format("deepseek-r1", "DeepSeek-R1 distills, Phi-4-reasoning: always thinks", can_turn_off=False),
    Format("harmony", "gpt-oss: analysis and final channels", opens="<|channel|>analysis<|message|>",
           closes="<|end|>", can_turn_off=False, efforts=EFFORTS,
           effort_variable="reasoning_effort", channels=True),
    NONE,
)}
FINAL = "<|start|>assistant<|channel|>final<|message|>"  # Harmony: where the final answer opens
HARMONY_ENDS = ("<|end|>", "<|return|>", "<|call|>")


def detect(template: str | None) -> Format:
    """The reasoning format a chat template speaks (`none` without a template)."""
    t = template or ""
    if "<|channel|>" in t or "reasoning_effort" in t:
        return FORMATS["harmony"]
    if "/no_think" in t:
        return FORMATS["smollm3"]
    if "<think>" in t or "</think>" in t:
        return FORMATS["qwen3"] if "enable_thinking" in t else FORMATS["deepseek-r1"]
    return NONE


@dataclass(frozen=True)
class Render:
    """How prompts are rendered for one model under one `Thinking`: template variables, a
    system turn, and whether the model then thinks."""

    format: Format
    thinks: bool
    variables: dict[str, object] = field(default_factory=dict)
    system: str | None = None

    def messages(self, prompt: str) -> list[dict[str, str]]:
        turn = [{"role": "user", "content": prompt}]
        return ([{"role": "system", "content": self.system}] if self.system else []) + turn

    def opening(self, rendered: str) -> str:
        """A rendered prompt carried to where the final answer opens, past a closed empty
        thought (the rendered prompt itself where the model does not think, or the template
        already closed one)."""
        f = self.format
        if not self.thinks:
            return rendered
        if f.channels:
            return rendered + f.opens + f.closes + FINAL
        body = rendered.rstrip()
        if body.endswith(f.opens):  # the template opened the thought
            return body + "\n\n" + f.closes + "\n\n"
        return rendered + f.opens + "\n\n" + f.closes + "\n\n"

    def after_thought(self, rendered: str, thought: str) -> str:
        """A rendered prompt followed by a thought, closed: where the final answer opens after it."""
        f = self.format
        if f.channels:
            return rendered + f.opens + thought + f.closes + FINAL
        body = rendered if rendered.rstrip().endswith(f.opens) else rendered + f.opens
        return body + thought + f.closes + "\n\n"

    def opened_by_prompt(self, rendered: str) -> bool:
        """Whether the generation starts inside a thought the template opened."""
        return self.thinks and not self.format.channels and rendered.rstrip().endswith(self.format.opens)


def resolve(fmt: Format, thinking: Thinking) -> Render:
    """The rendering `thinking` asks of a model of format `fmt` (a one-line error if the model
    cannot do it)."""
    if thinking.mode not in MODES:
        raise UserError(f"--thinking must be one of {', '.join(MODES)}, not {thinking.mode!r}")
    if thinking.effort is not None and thinking.effort not in fmt.efforts:
        raise UserError(f"--effort {thinking.effort}: the model's format has no such effort; it supports "
                        f"{fmt.supported()}")
    if not fmt.thinks:
        if thinking.mode == "on":
            raise UserError(f"--thinking on: the model's chat template has no thinking form; it supports "
                            f"{fmt.supported()}")
        return Render(fmt, False)
    if thinking.mode == "off" and not fmt.can_turn_off:
        raise UserError(f"--thinking off: the model cannot stop thinking; it supports {fmt.supported()}")
    on = thinking.mode != "off"
    variables: dict[str, object] = {}
    if fmt.effort_variable and thinking.effort:
        variables[fmt.effort_variable] = thinking.effort
    if thinking.mode == "auto":  # the template's own default: every thinking format thinks unless told not to
        return Render(fmt, True, variables)
    if fmt.switch:
        variables[fmt.switch] = on
    system = None if fmt.system_flags is None else fmt.system_flags[0 if on else 1]
    return Render(fmt, on, variables, system)


class Split(NamedTuple):
    """A generated text as thought and final answer."""

    thought: str | None  # None: the model did not think
    answer: str | None  # None: the final answer never arrived (the thought did not close)


def split(fmt: Format, text: str, opened: bool = False) -> Split:
    """Split `text` (special tokens written out) by `fmt`; `opened`: the prompt opened the thought."""
    if not fmt.thinks:
        return Split(None, text)
    if fmt.channels:
        return _split_channels(text)
    s = (fmt.opens + text) if opened else text
    body = s.lstrip()
    if not body.startswith(fmt.opens):
        return Split(None, text)
    thoughts: list[str] = []
    while body.startswith(fmt.opens):  # a thought, and any that follow it at once
        end = _matching_close(body, fmt.opens, fmt.closes)
        if end is None:
            thoughts.append(body[len(fmt.opens):])
            return Split("\n".join(thoughts).strip(), None)
        thoughts.append(body[len(fmt.opens):end])
        body = body[end + len(fmt.closes):].lstrip()
    return Split("\n".join(thoughts).strip(), body)


def _matching_close(s: str, opens: str, closes: str) -> int | None:
    """Index of the close that ends the thought opening `s` (thoughts may nest), or None."""
    depth, i = 0, 0
    while i < len(s):
        if s.startswith(opens, i):
            depth, i = depth + 1, i + len(opens)
        elif s.startswith(closes, i):
            depth -= 1
            if depth == 0:
                return i
            i += len(closes)
        else:
            i += 1
    return None


def _split_channels(text: str) -> Split:
    """Harmony: every `analysis` message is thought, the `final` message is the answer (a
    text with no channel at all is all answer)."""
    if "<|channel|>" not in text:
        return Split(None, text)
    thoughts: list[str] = []
    answer = None
    for part in text.split("<|channel|>")[1:]:
        channel, sep, content = part.partition("<|message|>")
        if not sep:
            continue
        for end in HARMONY_ENDS:
            content = content.split(end)[0]
        content = content.split("<|start|>")[0]
        if channel.strip().startswith("final"):
            answer = content.strip()
        else:
            thoughts.append(content.strip())
    return Split("\n".join(thoughts) if thoughts else None, answer)


def render_for(path: Path, thinking: Thinking) -> Render:
    """How `thinking` renders the model in `path`, read from its file without loading it, so an
    impossible request fails before any work."""
    from gguf_abliterate import names
    from gguf_abliterate.gguf_io import Model

    model = Model(path)
    try:
        return resolve(detect(model.get_str(names.CHAT_TEMPLATE) or None), thinking)
    finally:
        model.close()
