"""Ctrl-C as a request, for loops that stop between steps: a flag, not an exception.

A KeyboardInterrupt raised while llama.cpp is inside one of our ctypes callbacks (the eval
callback runs for every graph node) is printed and swallowed by ctypes, and one raised inside
a decode leaves the caller mid-step. So while a long loop runs, the first SIGINT only sets a
flag that the loop reads between steps (a trial, a token); a second one raises as usual.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def sigint_flag() -> Iterator[Callable[[], bool]]:
    """Inside: SIGINT sets the flag the yielded function reads (the second raises
    KeyboardInterrupt). Outside the main thread, where signals cannot be caught, the flag stays
    down and Ctrl-C behaves as usual."""
    flag = {"asked": False}

    def on_sigint(signum: int, frame: Any) -> None:
        if flag["asked"]:
            raise KeyboardInterrupt
        flag["asked"] = True

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if main else None
    try:
        yield lambda: flag["asked"]
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)
