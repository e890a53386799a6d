"""What every command shares: one-line errors, messages on stderr, progress bars, and the
claim of every output against every input before the command runs."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from gguf import GGMLQuantizationType

from gguf_abliterate import quants
from gguf_abliterate.errors import Interrupted, UserError
from gguf_abliterate.gguf_io.atomic import claim_outputs
from gguf_abliterate.jobs.ui import Ui
from gguf_abliterate.portable import available_cores
from gguf_abliterate.textfile import printable

Say = Callable[[str], None]


def echo(message: str = "", err: bool = False) -> None:
    """Print a line. Everything a command prints goes through here, made `printable`: names,
    prompts and answers come from files, and a control character in them must not reach the
    terminal."""
    click.echo(printable(message), err=err)


def sayer(quiet: bool) -> Say:
    """Messages go to stderr (stdout stays for results), or nowhere with -q."""
    return (lambda msg: None) if quiet else (lambda msg: echo(msg, err=True))


def progress(total: int, desc: str, unit: str, quiet: bool, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, so it never mixes into piped output."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr, **kwargs)


def cli_ui(quiet: bool) -> Ui:
    """A job's notes and progress bars on stderr (none with -q)."""
    return Ui(sayer(quiet), lambda total, desc, unit, **kwargs: progress(total, desc, unit, quiet, **kwargs))


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(printable(str(e))) from None
        except KeyboardInterrupt:
            echo("interrupted; nothing was written", err=True)
            sys.exit(130)
        except Interrupted as e:
            echo(str(e), err=True)
            sys.exit(130)
        except MemoryError:
            raise click.ClickException("out of memory") from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise click.ClickException(f"{where}{e.strerror or e}") from None

    return wrapper


def qtype_option(ctx: click.Context, param: click.Parameter, value: str | None) -> GGMLQuantizationType | None:
    """click callback: a type name (any case) -> GGMLQuantizationType."""
    return None if value is None else GGMLQuantizationType[value.upper()]


WRITABLE = sorted(t.name.lower() for t in quants.writable_types())


class Finite(click.FloatRange):
    """A float option within a range. click's own FloatRange lets NaN (no comparison fails) and
    infinity through, which then write NaN weights or make a bound that nothing can meet."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


# a strength (--scale, --steer, a control vector's scale) past this only writes overflowing weights
MAX_STRENGTH = 1000.0
# worker processes: more than a few per core only costs memory (each holds a tensor's work)
MAX_JOBS = 4 * max(available_cores(), 1)


class Jobs(click.IntRange):
    """A worker count, 1 to `MAX_JOBS`; its help names the rule, not this machine's number."""

    def __init__(self) -> None:
        super().__init__(min=1, max=MAX_JOBS)

    def _describe_range(self) -> str:
        return "1<=x<=4 per core"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        n = click.INT.convert(value, param, ctx)
        if not 1 <= n <= MAX_JOBS:
            self.fail(f"{n} is not in 1 to {MAX_JOBS} (4 per core on this machine)", param, ctx)
        return n


class InputPath(click.Path):
    """A file the command reads. `Command` refuses to write any output over it."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)


class InputName(click.ParamType):
    """A name (a shipped pack) or a file the command reads (a pack file)."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        return str(value)


class OutputPath(click.Path):
    """A file the command writes. `Command` claims it before the command runs."""

    def __init__(self) -> None:
        super().__init__(path_type=Path)


class OutputFolder(click.Path):
    """A folder the command writes its files into (it claims them itself)."""

    def __init__(self) -> None:
        super().__init__(path_type=Path, file_okay=False)


class Command(click.Command):
    """A command whose outputs (options of type OutputPath) are claimed against its inputs
    (InputPath, InputName) before it runs: no input is ever overwritten, by name or through a
    link, no existing file is replaced without its --force, and an unwritable folder fails at
    once, not after the work. Files a command derives (split parts, a Modelfile, a study) it
    claims itself, with the same `claim_outputs`."""

    def invoke(self, ctx: click.Context) -> Any:
        outputs: list[Path] = []
        inputs: list[Path] = []
        for param in self.params:
            if not isinstance(param.type, (OutputPath, InputPath, InputName)):
                continue
            value = ctx.params.get(param.name or "")
            values = [Path(v) for v in (value if isinstance(value, tuple) else (value,)) if v is not None]
            (outputs if isinstance(param.type, OutputPath) else inputs).extend(values)
        try:
            claim_outputs(outputs, inputs, bool(ctx.params.get("force", False)))
        except UserError as e:
            raise click.ClickException(printable(str(e))) from None
        return super().invoke(ctx)


def thinking_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--thinking` and `--effort`, for every command that runs a model; the command gets `thinking`."""
    from gguf_abliterate.runtime.thinking import EFFORTS, MODES, Thinking

    def to_thinking(ctx: click.Context, param: click.Parameter, value: str) -> Thinking:
        return Thinking(value, ctx.params.pop("effort", None))

    fn = click.option("--thinking", type=click.Choice(MODES), default="auto", show_default=True,
                      callback=to_thinking,
                      help="For a model that thinks before it answers (Qwen3, DeepSeek-R1, gpt-oss, SmolLM3): on, "
                           "off (where its template can), or auto, as its template renders by itself. Measures "
                           "read the final answer, after the thought.")(fn)
    return click.option("--effort", type=click.Choice(EFFORTS), default=None, is_eager=True,
                        help="The reasoning effort, where the model's format has one (gpt-oss).")(fn)


def thought_tokens_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`--thought-tokens`, for the commands that generate a thinking model's answers in bulk."""
    from gguf_abliterate.evaluate.generate import MAX_ANSWER_TOKENS
    from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET

    return click.option("--thought-tokens", type=click.IntRange(min=0, max=MAX_ANSWER_TOKENS * 8), default=THOUGHT_BUDGET,
                        show_default=True,
                        help="For a model that thinks: tokens its thought may take, on top of the final answer's. "
                             "An answer whose thought does not end within them counts as 'no answer', not as a "
                             "refusal.")(fn)
