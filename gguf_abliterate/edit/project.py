"""The projection itself: `W' = W + coef * u (u^T W)`, per tensor kind, and the edit methods.

Abliterate has coef = -scale, reverse +scale. Writer matrices have the residual stream along
their (numpy) rows; `token_embd` holds one residual row per token, so it is projected
row-wise, `E' = E + coef * (E u) u^T`; a bias is one residual vector.

How a writer matrix is projected is an edit method, one registered record each (`METHODS`):
its projection, one line for `--help`, whether a low-rank adapter (a LoRA export, a search
trial) expresses it exactly, and whether `--method` offers it (`--steer` has its own option).
The command's choices and the adapter's refusal derive from the records: a new method is one
record here and its name in `schedule.Method` (which files store).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gguf_abliterate.formats.direction_file import Direction, normalise
from gguf_abliterate.edit.plan import TensorEdit, TensorKind
from gguf_abliterate.edit.schedule import Method
from gguf_abliterate.gguf_io import Model

# float32 bytes processed at once; bounds the working memory of one tensor edit.
CHUNK_BYTES = 16 << 20


def rows_per_chunk(row_len: int) -> int:
    """Rows of `row_len` float32 values that fit in CHUNK_BYTES."""
    return max(1, CHUNK_BYTES // (4 * max(row_len, 1)))


def norm_weights(model: Model, norms: tuple[str, ...]) -> np.ndarray | None:
    """The product of the norm weights between a writer and the residual stream (None if none)."""
    g = None
    for norm in norms:
        w = model.values(norm).astype(np.float32)
        g = w if g is None else g * w
    return g


def axis_vector(model: Model, edit: TensorEdit, direction: Direction) -> np.ndarray:
    """The unit vector u the tensor is projected with (behind post-norms g1, g2...: the
    normalised g1*g2*...*r)."""
    r = direction.for_block(edit.block)
    g = norm_weights(model, edit.post_norms)
    return r if g is None else normalise(g * r, f"post-norm-weighted direction for {edit.name}")


def component(values: np.ndarray, u: np.ndarray, kind: TensorKind) -> np.ndarray:
    """The part of `values` along u: u^T W for a writer, E u for embeddings and biases."""
    return u @ values if kind.over_rows else values @ u


def project(values: np.ndarray, u: np.ndarray, coef: float, kind: TensorKind,
            method: Method = Method.PLAIN, reads: np.ndarray | None = None,
            columns: tuple[tuple[int, int], ...] | None = None) -> None:
    """In place: add coef times the component along u, back along u (a writer matrix by its
    edit method; STEER: coef u reads^T). With `columns`, only those input columns of a writer
    (its chosen heads) change."""
    if kind is TensorKind.MATRIX and columns is not None:
        for start, stop in columns:
            part = np.ascontiguousarray(values[:, start:stop])
            METHODS[method].project(part, u, coef, reads)
            values[:, start:stop] = part
    elif kind is TensorKind.MATRIX:
        METHODS[method].project(values, u, coef, reads)
    elif kind is TensorKind.EMBEDDING:
        project_residual_cols(values, u, coef)
    else:
        for row in values:  # one bias, or one per expert (gpt-oss's ffn_down_exps.bias)
            row += coef * u * float(u @ row)


@dataclass(frozen=True)
class EditMethod:
    method: Method
    about: str  # for --help
    project: Callable[[np.ndarray, np.ndarray, float, np.ndarray | None], None]  # (W, u, coef, reads), in place
    low_rank: bool  # an adapter expresses it exactly (a LoRA export, a search trial)
    option: bool = True  # offered by --method


def _plain(w: np.ndarray, u: np.ndarray, coef: float, reads: np.ndarray | None) -> None:
    project_residual_rows(w, u, coef)


def _norm_preserving(w: np.ndarray, u: np.ndarray, coef: float, reads: np.ndarray | None) -> None:
    lengths = np.linalg.norm(w, axis=0)
    project_residual_rows(w, u, coef)
    keep_column_lengths(w, lengths)


def _steer(w: np.ndarray, u: np.ndarray, coef: float, reads: np.ndarray | None) -> None:
    assert reads is not None, "a steering edit carries what its matrix reads"
    add_along(w, u, reads, coef)


METHODS: dict[Method, EditMethod] = {m.method: m for m in (
    EditMethod(Method.PLAIN, "W - S u u^T W", _plain, low_rank=True),
    EditMethod(Method.NORM_PRESERVING, "the same, then every column of a writer (what one input feature writes "
               "into the residual stream) rescaled to its old length", _norm_preserving, low_rank=False),
    EditMethod(Method.STEER, "W + S u w^T: a fixed vector along u added to the output (--steer)", _steer,
               low_rank=True, option=False),
)}


def method_choices() -> list[str]:
    """What --method offers, the default first."""
    return [m.method.value for m in METHODS.values() if m.option]


def method_help() -> str:
    return " ".join(f"{m.method.value}{' (default)' if m.method is Method.PLAIN else ''}: {m.about}."
                    for m in METHODS.values() if m.option)


def project_residual_rows(w: np.ndarray, u: np.ndarray, coef: float) -> None:
    """In place: `W += coef * u (u^T W)` for a 2-D `w` whose rows are residual dimensions."""
    add_along(w, u, u @ w, coef)


def add_along(w: np.ndarray, u: np.ndarray, c: np.ndarray, coef: float) -> None:
    """In place: `W += coef * u c^T` (rows of `w` are residual dimensions), a chunk of rows at a
    time, multiplied in the order the projection always used, so its bytes stay the same."""
    step = rows_per_chunk(w.shape[1])
    for i in range(0, w.shape[0], step):
        w[i : i + step] += (coef * u[i : i + step, None]) * c[None, :]


def keep_column_lengths(w: np.ndarray, lengths: np.ndarray) -> None:
    """In place: rescale each column (what one input feature writes into the residual stream)
    back to `lengths`. Scaling a column keeps u^T W' = 0, so the removal still holds."""
    now = np.linalg.norm(w, axis=0)
    w *= np.where(now > 0, lengths / np.where(now > 0, now, 1), 1).astype(np.float32)[None, :]


def project_residual_cols(e: np.ndarray, u: np.ndarray, coef: float) -> None:
    """In place: `E += coef * (E u) u^T` for a 2-D `e` whose columns are residual dimensions."""
    e += (coef * (e @ u))[:, None] * u[None, :]
