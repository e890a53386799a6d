"""The one way the project writes a file: under a temporary name, renamed when complete.

Every output (edited models and their parts, direction files, adapters, control vectors)
goes through `atomic_paths`: the caller writes temporary files beside the destinations, and
only when its block finishes (and `check` accepts them) are they synced and renamed into
place, all together. An error, Ctrl-C or SIGTERM removes them, so no half-written file is
ever left, and an existing destination survives a failed run.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gguf_abliterate.portable import create_new, open_write, termination_signals

PARTIAL_SUFFIX = ".partial"


@contextlib.contextmanager
def atomic_paths(dsts: list[Path], check: Callable[[list[Path]], None] | None = None) -> Iterator[list[Path]]:
    """Temporary paths, one beside each of `dsts`, that replace them only if the block finishes.

    Each temporary file exists (empty) when the block starts, with the permissions a new file
    would get. The caller must have closed them by the end of the block (Windows cannot
    rename an open file). `check`, if given, inspects the complete files and raises to refuse
    them. SIGTERM, where the platform delivers it, is turned into KeyboardInterrupt meanwhile so
    that it cleans up too.
    """

    def _on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    in_main = threading.current_thread() is threading.main_thread()
    signals = termination_signals() if in_main else []
    previous = [signal.signal(s, _on_term) for s in signals]
    tmps: list[Path] = []
    try:
        for dst in dsts:
            # the name is recorded before the file exists: a signal landing between creating
            # the file and recording its name (mkstemp, then append) left the file behind
            while True:
                tmps.append(dst.parent / f".{dst.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")
                try:
                    create_new(tmps[-1])
                    break
                except FileExistsError:
                    tmps.pop()
        yield tmps
        for tmp in tmps:
            _sync(tmp)
        if check is not None:
            check(tmps)
        for tmp, dst in zip(tmps, dsts):
            os.replace(tmp, dst)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    finally:
        for s, handler in zip(signals, previous):
            signal.signal(s, handler)


@contextlib.contextmanager
def atomic_path(dst: Path) -> Iterator[Path]:
    """`atomic_paths` for a single file."""
    with atomic_paths([dst]) as (tmp,):
        yield tmp


def _sync(path: Path) -> None:
    fd = open_write(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
