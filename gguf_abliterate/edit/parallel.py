"""Run edit pieces in worker processes, ahead of the writer, and hand results back in order.

Processes, not threads: the quantizers are many small numpy calls, so threads would mostly
wait for the GIL. Each worker opens the model itself (parsing is cheap) and receives only
the piece to do and the projection axis. At most `jobs + 1` pieces are in flight, so peak
memory grows with the number of workers, never with the model. Workers ignore SIGINT: the
parent handles Ctrl-C (and SIGTERM), then terminates them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from gguf_abliterate.gguf_io import Model

_worker_model: Model | None = None
_BLAS_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _init_worker(parts: list[Path]) -> None:
    global _worker_model
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_model = Model(parts[0], parts=parts)


def _run(fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    assert _worker_model is not None
    return fn(_worker_model, *args)


class UnitRunner:
    """`results(tasks)` yields `fn(model, *task)` for each task, in order; in `jobs` processes."""

    def __init__(self, model: Model, jobs: int, fn: Callable[..., Any]):
        self.model, self.jobs, self.fn = model, max(1, jobs), fn
        self.pool: Any = None

    def __enter__(self) -> UnitRunner:
        if self.jobs > 1:
            ctx = multiprocessing.get_context("spawn")  # fork would copy the writer's state and threads
            # one BLAS thread per worker: the workers already fill the cores
            saved = {k: os.environ.get(k) for k in _BLAS_THREAD_VARS}
            os.environ.update(dict.fromkeys(_BLAS_THREAD_VARS, "1"))
            try:
                self.pool = ctx.Pool(self.jobs, _init_worker, ([p.path for p in self.model.parts],))
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.pool is not None:
            if kind is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()

    def results(self, tasks: Iterable[tuple[Any, ...]]) -> Iterator[Any]:
        if self.pool is None:
            for task in tasks:
                yield self.fn(self.model, *task)
            return
        pending: deque[Any] = deque()
        for task in tasks:
            pending.append(self.pool.apply_async(_run, (self.fn, task)))
            if len(pending) > self.jobs:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
