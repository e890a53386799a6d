"""`--verify`: re-read a finished output before it takes its place."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gguf_abliterate import quants
from gguf_abliterate.edit.project import CHUNK_BYTES
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model, OutTensor


def verify_output(src: Model, written: list[Path], expected: list[OutTensor]) -> str:
    """Re-open written files (the parts of one model) and check every tensor's name, shape
    and type; copied tensors must be byte-identical to the input and edited ones finite.
    Returns a one-line report."""
    try:
        out = Model(written[0], parts=written)
    except UserError as e:
        raise UserError(f"verification failed: the output does not parse: {e}") from None
    try:
        return _check(src, out, expected)
    finally:
        out.close()  # before the files are renamed or removed (Windows cannot while open)


def _check(src: Model, out: Model, expected: list[OutTensor]) -> str:
    if list(out.tensors) != [t.name for t in expected]:
        raise UserError("verification failed: the output's tensors differ from the input's")
    identical = edited = 0
    for want in expected:
        got = out.tensors[want.name]
        if tuple(got.shape) != want.dims or got.tensor_type != want.qtype:
            raise UserError(f"verification failed: {want.name} is {got.tensor_type.name} {list(got.shape)}")
        n_rows = out.n_rows(want.name)
        step = max(1, CHUNK_BYTES // max(1, int(got.n_bytes) // n_rows))
        for i in range(0, n_rows, step):
            rows = out.read_rows(want.name, i, min(step, n_rows - i))
            if want.copy_of is not None:
                same = np.array_equal(rows, src.read_rows(want.copy_of, i, rows.shape[0]))
                if not same:
                    raise UserError(f"verification failed: {want.name} differs from the input")
            elif not np.isfinite(quants.dequantize(rows, want.qtype)).all():
                raise UserError(f"verification failed: {want.name} holds NaN or Inf")
        identical += want.copy_of is not None
        edited += want.copy_of is None
    return f"verified {len(expected)} tensors: {identical} byte-identical to the input, {edited} edited and finite"
