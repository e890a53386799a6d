"""How a job talks while it runs: notes as they come, and progress bars (the command line's go
to stderr; the default says nothing)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _silent(message: str) -> None:
    pass


def _no_bar(**kwargs: Any) -> Any:
    """A progress bar that shows nothing (tqdm's own, disabled: it still counts)."""
    from tqdm import tqdm

    return tqdm(disable=True, **kwargs)


@dataclass(frozen=True)
class Ui:
    say: Callable[[str], None] = _silent
    bar: Callable[..., Any] = _no_bar  # bar(total=, desc=, unit=, **tqdm options): a context manager with update(n)
