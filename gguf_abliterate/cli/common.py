"""What every command shares: one-line errors, messages on stderr, progress bars, output checks."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from gguf import GGMLQuantizationType

from gguf_abliterate import quants
from gguf_abliterate.errors import UserError

Say = Callable[[str], None]


def sayer(quiet: bool) -> Say:
    """Messages go to stderr (stdout stays for results), or nowhere with -q."""
    return (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))


def progress(total: int, desc: str, unit: str, quiet: bool, **kwargs: Any) -> Any:
    """A tqdm bar on stderr, so it never mixes into piped output."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr, **kwargs)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into one line on stderr and a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was written", err=True)
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


def check_report(report: Path, inputs: list[Path]) -> None:
    """Before any long work: the report can be written (no input overwritten, its folder
    there) and its charts drawn (matplotlib installed)."""
    from gguf_abliterate.report.charts import require_matplotlib

    check_output(inputs, [report], force=True)
    require_matplotlib()


def check_output(inputs: list[Path], outputs: list[Path], force: bool) -> None:
    """Refuse to overwrite an input, an existing file without --force, or a missing folder."""
    for out in outputs:
        for inp in inputs:
            if (out.exists() and inp.exists() and os.path.samefile(inp, out)) or out.resolve() == inp.resolve():
                raise UserError(f"{out} is an input file; write the edit to a new file")
        if out.is_dir():
            raise UserError(f"{out} is a directory")
        if out.exists() and not force:
            raise UserError(f"{out} exists; pass --force to replace it")
        if not out.parent.resolve().is_dir():
            raise UserError(f"{out.parent}: no such directory")
