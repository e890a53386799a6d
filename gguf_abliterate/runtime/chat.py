"""A conversation with one model, streamed token by token (llama-cpp-python's high-level API).

Each `ChatModel` keeps its own history (its own answers), renders it with the model's own chat
template from the GGUF (jinja2, as llama-cpp-python and `runtime.llama` do; a plain
"User:/Assistant:" transcript, with a notice, where the file has none), and streams the
answer so a caller can stop between tokens. When the history no longer fits the context, the
oldest turns are dropped first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf_abliterate import names
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.portable import available_cores
from gguf_abliterate.runtime.library import load_llama_cpp
from gguf_abliterate.runtime.template import chat_formatter, without_chat_handlers
from gguf_abliterate.runtime.thinking import Thinking, detect, resolve

# where a model has no chat template
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
                  "{% if add_generation_prompt %}Assistant:{% endif %}")
DEFAULT_CONTEXT = 4096  # at most, unless asked: a 128k-token cache would take gigabytes


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 512
    temperature: float = 0.7  # 0: greedy
    seed: int = 0


@dataclass
class Reply:
    """What one answer produced, filled in as it streams."""

    text: str = ""
    stopped: bool = False  # the caller asked to stop
    cut: bool = False  # ran out of max_tokens (or of context)
    dropped_turns: int = 0  # oldest turns forgotten to make room


def file_settings(path: Path, asked: int | None) -> tuple[int, str | None]:
    """From the file's metadata, read once: the context to allocate (what was asked, else the
    model's own, at most DEFAULT_CONTEXT) and its chat template (None if it has none)."""
    model = Model(path)
    try:
        trained = model.arch_get(names.CONTEXT_LENGTH)
        template = model.get_str(names.CHAT_TEMPLATE) or None
    finally:
        model.close()
    if asked is not None:
        return asked, template
    return (min(trained, DEFAULT_CONTEXT) if isinstance(trained, int) and trained > 0 else DEFAULT_CONTEXT), template


class ChatModel:
    """One model and its side of the conversation."""

    def __init__(self, path: Path, n_ctx: int | None = None, threads: int | None = None,
                 thinking: Thinking = Thinking()):
        ll = load_llama_cpp()
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        self.path = path
        self.n_ctx, template = file_settings(path, n_ctx)
        self.reasoning = resolve(detect(template), thinking)  # an impossible --thinking fails before the load
        chat_formatter(template or PLAIN_TEMPLATE, bos="", eos="", where=path.name)  # a broken one fails before the load
        try:
            with without_chat_handlers():
                self.llm = ll.Llama(str(path), n_ctx=self.n_ctx, n_threads=threads or available_cores(), verbose=False)
        except ValueError as e:
            raise UserError(f"{path}: llama.cpp could not load this model ({e})") from None
        self.has_template = bool(template)

        def text(token: int) -> str:
            return self.llm.detokenize([token], special=True).decode(errors="replace") if token >= 0 else ""

        self.formatter = chat_formatter(template or PLAIN_TEMPLATE, bos=text(self.llm.token_bos()),
                                        eos=text(self.llm.token_eos()), where=path.name,
                                        variables=self.reasoning.variables)
        self.system: str | None = None
        self.history: list[dict[str, str]] = []  # user and assistant turns, alternating

    def close(self) -> None:
        self.llm.close()

    @property
    def turns(self) -> int:
        """Exchanges so far (a user message and its answer)."""
        return len(self.history) // 2

    def reset(self) -> int:
        """Forget the conversation (the system message stays); returns the exchanges forgotten."""
        n = self.turns
        self.history.clear()
        return n

    def render(self, messages: list[dict[str, str]]) -> tuple[list[int], list[str]]:
        """The tokens the model reads for `messages` (generation prompt included), and the stop strings."""
        result = self.formatter(messages)  # a template's refusal (e.g. of a system role) is a UserError
        stop = [result.stop] if isinstance(result.stop, str) else list(result.stop or [])
        add_bos = not getattr(result, "added_special", False)
        return self.llm.tokenize(result.prompt.encode(), add_bos=add_bos, special=True), [s for s in stop if s]

    def _fitted(self, user: str, reserve: int) -> tuple[list[int], list[str], int]:
        """The prompt for `user` after the history, dropping the oldest exchanges until `reserve`
        tokens of answer fit; how many were dropped."""
        dropped = 0
        while True:
            text = "\n".join(s for s in (self.reasoning.system, self.system) if s)  # a format's flag first
            system = [{"role": "system", "content": text}] if text else []
            tokens, stop = self.render([*system, *self.history, {"role": "user", "content": user}])
            if len(tokens) + reserve <= self.n_ctx:
                return tokens, stop, dropped
            if not self.history:
                raise UserError(f"the message is {len(tokens)} tokens with its template, more than the context of "
                                f"{self.n_ctx} leaves room for (--ctx)")
            del self.history[:2]
            dropped += 1

    def answer(self, user: str, sampling: Sampling, stop_asked: Callable[[], bool], reply: Reply) -> Iterator[str]:
        """Stream the answer to `user` piece by piece, filling `reply`; stops between tokens when
        `stop_asked()`. The exchange joins the history however it ended (a stopped answer as far
        as it got)."""
        tokens, stop, reply.dropped_turns = self._fitted(user, min(sampling.max_tokens, self.n_ctx // 2))
        stream: Any = self.llm.create_completion(
            tokens, max_tokens=sampling.max_tokens, temperature=sampling.temperature, seed=sampling.seed,
            stop=stop, stream=True)
        try:
            for chunk in stream:
                choice = chunk["choices"][0]
                piece = choice["text"]
                reply.text += piece
                reply.cut = choice.get("finish_reason") == "length"
                if piece:
                    yield piece
                if stop_asked():
                    reply.stopped = True
                    break
        finally:
            stream.close()
            self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": reply.text}]
