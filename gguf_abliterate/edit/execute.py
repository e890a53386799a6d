"""Carry out a plan: edit each tensor in pieces, stream the output file.

An edited tensor is cut into independent *pieces* (one matrix, one expert, or a bounded run
of embedding rows). Each piece goes through four named steps: dequantize, project,
requantize (keeping the edit if the rounding is aware), measure what survived. Pieces run in
worker processes ahead of the writer; their results come back in task order and are handed
to the writer tensor by tensor, each result checked to belong to the tensor and piece that
takes it, so no reordering can pair bytes with the wrong tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gguf_abliterate import names, quants
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.edit.options import EditOptions
from gguf_abliterate.edit.parallel import UnitRunner
from gguf_abliterate.edit.plan import EditPlan, TensorEdit, TensorKind
from gguf_abliterate.edit.project import axis_vector, component, project, rows_per_chunk
from gguf_abliterate.edit.provenance import provenance
from gguf_abliterate.edit.verify import verify_output
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model, OutTensor, Reserved, plan_files, write_files
from gguf_abliterate.portable import available_cores
from gguf_abliterate.quants import rounding, snapback

# Below this many edited values, worker processes cost more to start than they save.
PARALLEL_MIN_VALUES = 16 << 20


@dataclass(frozen=True)
class Piece:
    """Rows `first .. first+count` of one edited tensor, the `index`-th piece of it."""

    edit: TensorEdit
    u: np.ndarray  # the projection axis
    index: int
    first: int
    count: int


@dataclass(frozen=True)
class PieceResult:
    """A finished piece: its output bytes and how much of the edit they kept."""

    name: str
    index: int
    data: np.ndarray
    sums: snapback.Sums


def pieces(model: Model, edit: TensorEdit, u: np.ndarray) -> list[Piece]:
    """The pieces an edited tensor is produced in, in file order."""
    n_rows = model.n_rows(edit.name)
    if edit.kind is TensorKind.BIAS:
        spans = [(0, n_rows)]
    elif edit.kind is TensorKind.EMBEDDING:
        step = rows_per_chunk(int(model.tensors[edit.name].shape[0]))
        spans = [(i, min(step, n_rows - i)) for i in range(0, n_rows, step)]
    else:
        n_embd = int(model.tensors[edit.name].shape[1])
        spans = [(i, n_embd) for i in range(0, n_rows, n_embd)]
    return [Piece(edit, u, k, first, count) for k, (first, count) in enumerate(spans)]


def edit_piece(model: Model, piece: Piece) -> PieceResult:
    """Dequantize, project, requantize and measure one piece."""
    edit, u = piece.edit, piece.u
    values = _dequantized(model, edit, piece.first, piece.count)
    before = component(values, u, edit.kind)
    project(values, u, edit.coef, edit.kind, edit.method, edit.reads, edit.columns)
    if not edit.aware:
        data = _requantized(values, edit)
    elif edit.moments is not None and rounding.compensates(edit.out_type, values.shape[1]):
        # every code is written anew from the scales: split codes would be read for nothing
        data = rounding.keep_edit_compensated(_requantized(values, edit), values, u, edit.out_type, before=before,
                                              moments=edit.moments)
    else:
        data, codes = _requantized_split(values, edit)
        data = rounding.keep_edit(data, values, u, edit.out_type, over_rows=edit.kind.over_rows, before=before,
                                  codes=codes)
    written, error_sq = _measured(data, values, u, edit)
    sums = snapback.Sums.of(before, component(values, u, edit.kind), written, error_sq, values.size)
    return PieceResult(edit.name, piece.index, data, sums)


def _chunks(values: np.ndarray) -> Iterator[slice]:
    """Row ranges of at most CHUNK_BYTES: every step works a chunk at a time."""
    step = rows_per_chunk(values.shape[1])
    return (slice(i, i + step) for i in range(0, values.shape[0], step))


def _dequantized(model: Model, edit: TensorEdit, first: int, count: int) -> np.ndarray:
    """The piece as float32 (count, row_len), dequantized a chunk at a time into one buffer
    (whole-tensor dequantizers hold several temporaries)."""
    values = np.empty((count, int(model.tensors[edit.name].shape[0])), dtype=np.float32)
    for rows in _chunks(values):
        n = values[rows].shape[0]
        values[rows] = quants.dequantize(model.read_rows(edit.name, first + rows.start, n), edit.src_type)
    return values


def _requantized(values: np.ndarray, edit: TensorEdit) -> np.ndarray:
    with _finite_input(edit):
        return np.concatenate([quants.quantize(values[rows], edit.out_type) for rows in _chunks(values)])


def _requantized_split(values: np.ndarray, edit: TensorEdit) -> tuple[np.ndarray, np.ndarray]:
    """`quants.quantize_split` of the piece, for aware rounding (every type with codes
    quantizes a few blocks at a time, so the whole piece goes at once)."""
    with _finite_input(edit):
        return quants.quantize_split(values, edit.out_type)


@contextmanager
def _finite_input(edit: TensorEdit) -> Iterator[None]:
    """The quantizers' NaN/Inf error as the user's: the input tensor itself holds them."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"tensor {edit.name}: {e} (is the input file corrupt?)") from None


def _measured(data: np.ndarray, values: np.ndarray, u: np.ndarray, edit: TensorEdit) -> tuple[np.ndarray, float]:
    """The written bytes read back: their component along u, and their squared error."""
    error_sq = 0.0
    parts = []
    written = np.zeros(values.shape[1], np.float64) if edit.kind.over_rows else None
    for rows in _chunks(values):
        back = quants.dequantize(data[rows], edit.out_type)
        if written is not None:
            written += u[rows] @ back
        else:
            parts.append(back @ u)
        error_sq += float(np.square(back - values[rows], dtype=np.float64).sum())
    return (written if written is not None else np.concatenate(parts)), error_sq


class PieceStream:
    """Every piece's result, in task order, handed out tensor by tensor."""

    def __init__(self, results: Iterator[PieceResult], report: snapback.Report | None):
        self._results, self._report = results, report

    def take(self, edit: TensorEdit, count: int) -> Iterator[np.ndarray]:
        """The bytes of the next `count` results, which must be pieces 0.. of `edit`."""
        for index in range(count):
            result = next(self._results)
            if (result.name, result.index) != (edit.name, index):
                raise RuntimeError(f"internal error: piece {result.index} of {result.name} reached "
                                   f"{edit.name} (expected its piece {index})")
            if self._report is not None:
                self._report.add(edit.name, edit.out_type.name, result.sums)
            yield result.data


def output_nbytes(model: Model, plan: EditPlan) -> int:
    """Total tensor bytes the edited file will hold (for progress bars)."""
    total = 0
    for name, t in model.tensors.items():
        edit = plan.edits.get(name)
        total += int(t.n_bytes) if edit is None else quants.row_bytes(edit.out_type, int(t.n_elements))
    return total


def default_jobs(model: Model, plan: EditPlan) -> int:
    """All cores for a large edit, one process for a small one."""
    values = sum(int(model.tensors[n].n_elements) for n in plan.edits)
    return 1 if values < PARALLEL_MIN_VALUES else available_cores()


def output_tensors(model: Model, plan: EditPlan, direction: Direction, runner: UnitRunner,
                   report: snapback.Report | None = None) -> list[OutTensor]:
    """Every tensor of the output, in input order: copied verbatim, or produced by the edit.

    The pieces of all edited tensors are computed ahead by `runner`, and handed to each
    tensor as the writer reaches it. `direction` fits the model: the edit job checks each
    direction where it is made (the file's when loaded, a searched trial's when resolved).
    """
    planned: dict[str, list[Piece]] = {}
    for name in model.tensors:
        edit = plan.edits.get(name)
        if edit is not None and not (edit.coef == 0 and edit.out_type == edit.src_type):
            planned[name] = pieces(model, edit, axis_vector(model, edit, direction))
    stream = PieceStream(runner.results((p,) for ps in planned.values() for p in ps), report)
    out = []
    for name, t in model.tensors.items():
        dims = tuple(int(d) for d in t.shape)
        if name not in planned:
            out.append(OutTensor(name, dims, t.tensor_type, copy_of=name))
            continue
        edit, n = plan.edits[name], len(planned[name])
        out.append(OutTensor(name, dims, edit.out_type, chunks=lambda e=edit, n=n: stream.take(e, n)))
    return out


def apply_edit(model: Model, plan: EditPlan, direction: Direction, opts: EditOptions, out_path: Path, *,
               on_bytes: Callable[[int], None] = lambda n: None, verify: Callable[[str], None] | None = None,
               merge: bool = False, jobs: int | None = None, report: snapback.Report | None = None,
               schedule: dict[str, object] | None = None) -> list[Path]:
    """Write the edited model to `out_path` (atomically), streaming tensor by tensor.

    A split input gives a split output with the same parts (unless `merge`). `jobs` worker
    processes edit tensors ahead of the writer (default: `default_jobs`). With `verify`, the
    complete files are re-read and checked against the input before they take their places;
    `verify` receives the one-line report; `schedule` is recorded for a scheduled edit.
    Returns the paths written.
    """
    report = report if report is not None else snapback.Report()
    width = snapback.report_width({e.out_type.name for e in plan.edits.values()})
    kv = {**provenance(plan, opts, direction, schedule), names.REQUANT_REPORT: Reserved(width, report.to_json)}
    with UnitRunner(model, jobs or default_jobs(model, plan), edit_piece) as runner:
        out = output_tensors(model, plan, direction, runner, report)
        files = plan_files(model, out_path, out, kv, names.PROVENANCE_PREFIX, merge)
        check = None if verify is None else (lambda tmps: verify(verify_output(model, tmps, out)))
        write_files(model, files, on_bytes, check)
    return [f.path for f in files]
