"""`chat`: talk to one model, or to two that answer each prompt in turn, in the terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import click

from gguf_abliterate.cli.common import Command, Finite, InputPath, echo, thinking_options, user_errors
from gguf_abliterate.errors import UserError
from gguf_abliterate.interrupt import sigint_flag
from gguf_abliterate.runtime.chat import ChatModel, Reply, Sampling
from gguf_abliterate.runtime.thinking import Thinking
from gguf_abliterate.textfile import printable

PROMPT = ">>> "
MULTILINE = '"""'
HELP = f"""commands:
  /reset             forget the conversation (the system message stays)
  /system TEXT       set the system message (/system alone removes it)
  /set max-tokens N  answer length;  /set temperature T  (0: greedy)
  /help              this list;  /quit (or Ctrl-D) leaves
  {MULTILINE} starts and ends a message of several lines. Ctrl-C stops the answer under way."""


def _style(text: str, code: str) -> str:
    """ANSI colour on a terminal that wants it (not when piped, not with NO_COLOR), around text
    made printable (a label is a file name)."""
    text = printable(text)
    return f"\033[{code}m{text}\033[0m" if sys.stdout.isatty() and "NO_COLOR" not in os.environ else text


def _labels(paths: Sequence[Path]) -> list[str]:
    """Short names that tell the models apart."""
    names = [p.name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def _read(ask: Callable[[str], str]) -> str:
    """One message: a line, or the lines between two triple quotes."""
    line = ask(PROMPT)
    if not line.strip().startswith(MULTILINE):
        return line
    lines = [line.strip()[len(MULTILINE):]]
    while not lines[-1].rstrip().endswith(MULTILINE):
        lines.append(ask("... "))
    lines[-1] = lines[-1].rstrip()[: -len(MULTILINE)]
    return "\n".join(lines).strip()


def _command(line: str, models: list[ChatModel], sampling: Sampling) -> tuple[Sampling, bool]:
    """Carry out a /command; returns the sampling settings and whether to go on."""
    name, _, arg = line[1:].partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "bye"):
        return sampling, False
    if name == "reset":
        forgotten = [m.reset() for m in models]
        echo(f"(conversation forgotten: {max(forgotten)} exchange{'s' * (max(forgotten) != 1)})")
    elif name == "system":
        for m in models:
            m.system = arg or None
        echo(f"(system message {'set' if arg else 'removed'})")
    elif name == "set":
        key, _, value = arg.partition(" ")
        try:
            if key == "max-tokens" and int(value) > 0:
                sampling = replace(sampling, max_tokens=int(value))
            elif key == "temperature" and float(value) >= 0:
                sampling = replace(sampling, temperature=float(value))
            else:
                raise ValueError
        except ValueError:
            echo("usage: /set max-tokens N (N > 0) or /set temperature T (T >= 0)")
        else:
            echo(f"({key} {value})")
    elif name == "help":
        echo(HELP)
    else:
        echo(f"unknown command /{name}: /help lists them")
    return sampling, True


def _answer(model: ChatModel, label: str | None, message: str, sampling: Sampling) -> None:
    """Stream one model's answer; Ctrl-C stops it (the first sets a flag read between tokens; a
    second, during a long prompt, interrupts the decode)."""
    if label is not None:
        click.echo(_style(f"[{label}]", "1;36"))
    reply = Reply()
    try:
        with sigint_flag() as asked:
            for piece in model.answer(message, sampling, asked, reply):
                sys.stdout.write(printable(piece))  # a model's answer may hold escape codes
                sys.stdout.flush()
    except KeyboardInterrupt:
        reply.stopped = True
    ends = [" [stopped]" if reply.stopped else "", " [max tokens]" if reply.cut and not reply.stopped else ""]
    click.echo(_style("".join(ends), "2") if any(ends) else "")
    if reply.dropped_turns:
        click.echo(_style(f"(forgot the {reply.dropped_turns} oldest exchange(s) to fit the context of "
                          f"{model.n_ctx} tokens)", "2"))


def chat(paths: Sequence[Path], sampling: Sampling = Sampling(), *, system: str | None = None,
         n_ctx: int | None = None, ask: Callable[[str], str] = input, thinking: Thinking = Thinking()) -> None:
    """The conversation loop: each message goes to every model in turn, each with its own
    history, until /quit or end of input."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    except ImportError:
        pass
    if len(paths) > 2:
        raise UserError("chat takes one model, or two to compare")
    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 shows as U+FFFD, not the end of the session
        sys.stdin.reconfigure(errors="replace")
    models: list[ChatModel] = []
    try:
        for p in paths:
            echo(f"loading {p.name} ...", err=True)
            models.append(ChatModel(p, n_ctx, thinking=thinking))
            if not models[-1].has_template:
                echo(f"note: {p.name} has no chat template; using a plain User:/Assistant: transcript", err=True)
            models[-1].system = system
        labels: list[str | None] = list(_labels(paths)) if len(paths) > 1 else [None]
        echo(f"chatting with {' and '.join(p.name for p in paths)}: /help for commands, Ctrl-C stops an "
                   f"answer, /quit or Ctrl-D leaves", err=True)
        while True:
            try:
                message = _read(ask)
            except EOFError:
                echo()
                return
            except KeyboardInterrupt:
                echo("\n(Ctrl-C stops an answer; /quit or Ctrl-D leaves)")
                continue
            if not message.strip():
                continue
            if message.startswith("/"):
                sampling, go_on = _command(message.strip(), models, sampling)
                if not go_on:
                    return
                continue
            for model, label in zip(models, labels):
                try:
                    _answer(model, label, message, sampling)
                except UserError as e:
                    echo(f"error: {e}")
    finally:
        for m in models:
            m.close()


@click.command("chat", cls=Command)
@click.argument("models", nargs=-1, required=True, type=InputPath(), metavar="MODEL [MODEL2]")
@click.option("--max-tokens", type=click.IntRange(min=1), default=Sampling.max_tokens, show_default=True,
              help="Longest answer, in tokens.")
@click.option("--temperature", type=Finite(0, 100), default=Sampling.temperature, show_default=True,
              help="Sampling temperature; 0 answers greedily (the same answer every time).")
@click.option("--seed", type=int, default=Sampling.seed, show_default=True, help="Sampling seed.")
@click.option("--system", help="A system message for the conversation (/system changes it).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=64), default=None,
              help="Context size in tokens. Default: the model's own, at most 4096.")
@thinking_options
@user_errors
def command(models: tuple[Path, ...], max_tokens: int, temperature: float, seed: int, system: str | None,
            n_ctx: int | None, thinking: Thinking) -> None:
    """Chat with MODEL in the terminal, or with two models at once: each message goes to both,
    and each answers in turn under its name, with its own history (compare an edited model
    with its original). Uses each model's own chat template; answers stream as they come.

    \b
    /reset forgets the conversation, /system TEXT sets a system message, /set max-tokens N and
    /set temperature T change the sampling, /help lists the commands, /quit or Ctrl-D leaves.
    Ctrl-C stops the answer under way, not the program."""
    chat(models, Sampling(max_tokens=max_tokens, temperature=temperature, seed=seed), system=system, n_ctx=n_ctx,
         thinking=thinking)
