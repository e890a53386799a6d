"""The one way the project writes a file: claimed before the work, written under a temporary
name, renamed when complete.

Every output (edited models and their parts, direction files, adapters, control vectors, JSON,
reports, Modelfiles) goes through `atomic_paths` (or `write_text`, for a file made in memory):
the caller writes temporary files beside the destinations, and only when its block finishes
(and `check` accepts them) are they synced and renamed into place, all together. An error,
Ctrl-C or SIGTERM removes them, so no half-written file is ever left, and an existing
destination survives a failed run (a full disk included).

Before any long work a command `claim_outputs`: no output may be one of its inputs (by
identity: a symlink or a hard link to an input is that input), replace an existing file
without --force, be a folder, or lie in a folder it cannot write to.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gguf_abliterate.errors import UserError
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


def write_text(dst: Path, text: str) -> None:
    """A whole text file (UTF-8), atomically."""
    with atomic_path(dst) as tmp:
        tmp.write_bytes(text.encode("utf-8", errors="backslashreplace"))


def same_file(a: Path, b: Path) -> bool:
    """Whether two names lead to one file: by device and inode where it exists (symlinks and
    hard links included), by absolute name where it does not yet."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.abspath(a) == os.path.abspath(b)


def claim_outputs(outputs: list[Path], inputs: list[Path], force: bool) -> None:
    """Refuse, before any work, an output that is one of `inputs`, that names the same file as
    another output, that exists without `force`, that is a folder, or whose folder is missing
    or not writable (tried by creating a file there, which also works for root and on
    read-only mounts)."""
    for n, out in enumerate(outputs):
        for inp in inputs:
            if same_file(inp, out):
                raise UserError(f"{out} is one of this command's inputs ({inp}); write to a new file")
        if any(same_file(other, out) for other in outputs[:n]):
            raise UserError(f"{out} is named twice as an output")
        if out.is_dir():
            raise UserError(f"{out} is a directory")
        if (out.exists() or out.is_symlink()) and not force:
            raise UserError(f"{out} exists; pass --force to replace it")
        folder = out.parent
        if not folder.is_dir():
            raise UserError(f"{folder}: no such directory")
        try:  # an unnamed file where the platform has them (Linux's O_TMPFILE): nothing ever shows there
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as e:
            raise UserError(f"{folder}: cannot write here ({e.strerror or e})") from None


def _sync(path: Path) -> None:
    fd = open_write(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
