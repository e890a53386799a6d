"""Every call that not all platforms have, behind one portable function each.

Fast paths are chosen by capability (does `os` have the call, does it work on these files),
never by guessing from `sys.platform`: Linux keeps `copy_file_range` (copies inside the
kernel) and positional reads; macOS has `pread` but, on some Pythons, no `preadv`; Windows
has none of them and opens files in text mode unless told `O_BINARY`. `tests/test_portable.py`
runs the real commands with these calls removed, and scans the package so that no module but
this one uses them.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

# copy_file_range cannot work here (other filesystem, old kernel): fall back to read/write
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}
# Windows opens low-level file descriptors in text mode (CRLF translation, ^Z as end of file)
_BINARY = getattr(os, "O_BINARY", 0)


def open_read(path: str | os.PathLike[str]) -> int:
    """A read-only, binary file descriptor."""
    return os.open(path, os.O_RDONLY | _BINARY)


def create_new(path: str | os.PathLike[str]) -> None:
    """Create an empty file that must not exist yet (FileExistsError if it does), with the
    permissions a new file gets (0o666 less the umask)."""
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _BINARY, 0o666))


def open_write(path: str | os.PathLike[str]) -> int:
    """A read-write, binary file descriptor on an existing file."""
    return os.open(path, os.O_RDWR | _BINARY)


def read_into(fd: int, view: memoryview, offset: int) -> int:
    """Read into `view` from `offset` of `fd`; returns the bytes read (0 at end of file).

    With `preadv` (Linux) straight into the buffer; with `pread` (macOS) through a bytes
    object; otherwise by seeking (Windows). Each process reads through its own descriptors,
    so the seek needs no lock.
    """
    if hasattr(os, "preadv"):
        return os.preadv(fd, [view], offset)
    if hasattr(os, "pread"):
        data = os.pread(fd, len(view), offset)
    else:
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(view))
    view[: len(data)] = data
    return len(data)


def read_at(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes from `offset` of `fd`."""
    buf = bytearray(n)
    return bytes(buf[: read_into(fd, memoryview(buf), offset)])


def copy_range(src_fd: int, dst_fd: int, n: int, offset: int) -> int:
    """Copy up to `n` bytes at `offset` of `src_fd` to the current position of `dst_fd` inside
    the kernel, if the platform and the filesystems allow; returns 0 when they do not (the
    caller then copies through memory)."""
    if not hasattr(os, "copy_file_range"):
        return 0
    try:
        return os.copy_file_range(src_fd, dst_fd, n, offset)
    except OSError as e:
        if e.errno not in _NO_COPY_RANGE:
            raise
        return 0


def available_cores() -> int:
    """Cores this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def termination_signals() -> list[signal.Signals]:
    """The signals that ask a process to stop, besides Ctrl-C: SIGTERM where it is real.

    Windows defines SIGTERM but never delivers it to a Python handler (a console close or
    `taskkill` ends the process outright), so there only Ctrl-C can be cleaned up after.
    """
    if os.name == "nt" or not hasattr(signal, "SIGTERM"):
        return []
    return [signal.SIGTERM]


def library_names(stem: str, platform: str) -> list[str]:
    """The file names a shared library `stem` (e.g. ggml-base) has on `platform` (sys.platform),
    in the order llama-cpp-python tries them for its own libraries."""
    if platform == "darwin":
        return [f"lib{stem}.dylib", f"lib{stem}.so"]
    if platform == "win32":
        return [f"{stem}.dll", f"lib{stem}.dll"]
    return [f"lib{stem}.so"]


def find_library(stem: str, folders: list[Path], platform: str) -> Path | None:
    """The first of `library_names(stem, platform)` that exists in one of `folders`."""
    for folder in folders:
        for name in library_names(stem, platform):
            if (folder / name).is_file():
                return folder / name
    return None
