"""A model's chat template, rendered as llama-cpp-python renders it, with bounds.

The template is jinja2 from the GGUF, so it comes from whoever made the file. llama-cpp-python's
sandbox keeps it from reaching anything outside, but not from running forever or building a
string of gigabytes, and its errors (a syntax error, the template's own raise_exception())
arrive as any exception. Here every render runs under a time limit (a trace function, so it
also stops loops that produce no output, on every platform, and raises in the rendering
thread itself), `*`, `**`, `+` and `%` refuse results over the size limit before computing
them (at render time, and instead of jinja2's folding of constants while it compiles), and every
failure is one line naming the file. Left open: a filter given a huge literal (`center(10**9)`
written out) is still folded while compiling; it costs memory for a moment, then fails as
MemoryError or on the size of what was rendered.
"""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from gguf_abliterate.errors import UserError

RENDER_SECONDS = 10.0  # a real template renders in about a millisecond
MAX_CHARS = 1 << 20  # a template, or what it renders, of more characters is not a chat template
_CHECK_EVERY = 256  # trace events between looks at the clock


class _OutOfTime(BaseException):
    """Raised inside the render; BaseException, so no `except Exception` in jinja catches it."""


def _sized(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else 0


def _bounded_binop(context: Any, operator: str, left: Any, right: Any) -> Any:
    """The sandbox's hook for `*`, `**`, `+` and `%`: refuse a result over MAX_CHARS (or an
    integer of over 4096 bits) before it is made."""
    if operator == "*":
        count = right if isinstance(right, int) else left if isinstance(left, int) else 0
        if max(_sized(left), _sized(right)) * max(count, 0) > MAX_CHARS:
            raise ValueError("the template builds a string too large")
        return left * right
    if operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right * abs(left).bit_length() > 4096:
            raise ValueError("the template computes too large a number")
        return left ** right
    if operator == "%":
        args = right if isinstance(right, tuple) else (right,)
        widths = [int(n) for spec in _WIDTH.findall(left) for n in spec if n] if isinstance(left, str) else []
        if any(w > MAX_CHARS for w in widths) or ("*" in str(left) and any(
                isinstance(a, int) and abs(a) > MAX_CHARS for a in args)):
            raise ValueError("the template builds a string too large")
        return left % right
    if _sized(left) + _sized(right) > MAX_CHARS:
        raise ValueError("the template builds a string too large")
    return left + right


_WIDTH = re.compile(r"%[-#0 +]*(\d+)?(?:\.(\d+))?")


def _run(fn: Callable[[], Any], where: str) -> Any:
    """`fn()` stopped after RENDER_SECONDS (the previous trace function, a debugger's or
    coverage's, is put back)."""
    deadline = time.monotonic() + RENDER_SECONDS
    events = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal events
        events += 1
        if events % _CHECK_EVERY == 0 and time.monotonic() > deadline:
            raise _OutOfTime
        return tracer

    previous = sys.gettrace()
    sys.settrace(tracer)
    try:
        return fn()
    except _OutOfTime:
        raise UserError(f"{where}: rendering the chat template took over {RENDER_SECONDS:g} s (a loop without "
                        f"end?); give --raw or use another file") from None
    finally:
        sys.settrace(previous)


def chat_formatter(template: str, bos: str, eos: str, where: str,
                   variables: Mapping[str, object] | None = None) -> Callable[[list[dict[str, str]]], Any]:
    """A function of the messages giving llama-cpp-python's ChatFormatterResponse (prompt, stop,
    added_special), rendered exactly as its Jinja2ChatFormatter renders it; `variables` are
    the template's own switches (`enable_thinking`, `reasoning_effort`), seen as globals."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    if len(template) > MAX_CHARS:
        raise UserError(f"{where}: the chat template is {len(template)} characters long, which is no chat template")

    def build() -> Any:
        # llama-cpp-python's formatter, made on an empty template for its environment (the same
        # options, extensions and filters), then the real template compiled with the hooks: the
        # hooks also stop jinja2 folding `'x' * 10**9` or `7 ** 10**8` while it compiles
        formatter = Jinja2ChatFormatter("", eos_token=eos, bos_token=bos, add_generation_prompt=True)
        env = formatter._environment.environment
        env.intercepted_binops = frozenset({"*", "**", "+", "%"})
        env.call_binop = _bounded_binop
        formatter.template, formatter._environment = template, env.from_string(template)
        formatter._environment.globals.update(variables or {})
        return formatter

    try:
        formatter = _run(build, where)
    except UserError:
        raise
    except Exception as e:  # jinja2's TemplateSyntaxError and whatever else a broken template raises
        raise UserError(f"{where}: the chat template cannot be read ({_first_line(e)})") from None

    def render(messages: list[dict[str, str]]) -> Any:
        try:
            result = _run(lambda: formatter(messages=messages), where)
        except UserError:
            raise
        except Exception as e:  # the template's own raise_exception(), a type error, MemoryError
            raise UserError(f"{where}: the chat template failed ({_first_line(e)})") from None
        if len(result.prompt) > MAX_CHARS:
            raise UserError(f"{where}: the chat template rendered {len(result.prompt)} characters for one prompt")
        return result

    return render


@contextlib.contextmanager
def without_chat_handlers() -> Iterator[None]:
    """While llama-cpp-python's `Llama` loads a model, keep it from compiling the file's chat
    templates into chat handlers of its own: it compiles every `tokenizer.chat_template*` with
    no bounds (jinja2 folds `7 ** 10**8` there for minutes), and we render with ours anyway."""
    import llama_cpp.llama_chat_format as chat_format

    class _Unused:
        def __init__(self, **kwargs: Any) -> None:
            pass

        def to_chat_handler(self) -> None:
            return None

    real = chat_format.Jinja2ChatFormatter
    chat_format.Jinja2ChatFormatter = _Unused  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        chat_format.Jinja2ChatFormatter = real  # type: ignore[misc]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
