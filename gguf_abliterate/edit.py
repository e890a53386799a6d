"""Plan which tensors an edit changes, and apply the signed projection to each.

Abliterate: `W' = W - s u (u^T W)`; reverse: `W' = W + s u (u^T W)`, for every matrix that
writes into the residual stream (numpy rows are residual dimensions). `token_embd` holds one
residual-stream row per token, so it is projected row-wise: `E' = E -/+ s (E r) r^T`.
Edited tensors are dequantized, projected in float32 and requantized to their own type (or
`requant_type`); every other tensor is copied byte for byte.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from gguf_abliterate import __version__, fidelity, quants, rounding
from gguf_abliterate.arch import EMBEDDING, LM_HEAD, WRITER_KINDS, Arch, get_arch
from gguf_abliterate.directions import Direction, normalise
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model, OutTensor, Reserved, plan_files, write_files
from gguf_abliterate.parallel import UnitRunner, available_cores

PROVENANCE_PREFIX = "abliterate."
# float32 bytes processed at once; bounds the working memory of one tensor edit.
CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class EditOptions:
    """What the user asked for."""

    reverse: bool = False
    scale: float = 1.0
    layers: frozenset[int] | None = None  # None: every block
    embeddings: bool | None = None  # None: on unless the embeddings are tied to the LM head
    requant_type: GGMLQuantizationType | None = None
    rounding: str = "aware"  # "aware": keep the edit through requantization; "nearest": ggml's

    @property
    def coef(self) -> float:
        """The signed factor in `W + coef * u (u^T W)`."""
        return self.scale if self.reverse else -self.scale


@dataclass(frozen=True)
class TensorEdit:
    """One tensor the edit changes."""

    name: str
    kind: str  # "matrix" (rows are residual dims), "embedding" (columns are), "bias"
    block: int  # which row of a per-layer direction applies
    src_type: GGMLQuantizationType
    out_type: GGMLQuantizationType
    post_norm: str | None = None  # norm weight g: project with u = g*r/||g*r||
    aware: bool = False  # re-round the codes so the edit survives requantization


@dataclass
class EditPlan:
    """Every edited tensor, by name, and what the user should be told about the choices."""

    arch: Arch
    tied_embeddings: bool
    layers: frozenset[int]
    edits: dict[str, TensorEdit]
    notices: list[str] = field(default_factory=list)


def parse_layers(spec: str | None, n_layer: int) -> frozenset[int] | None:
    """Parse `A-B`, `A`, or comma-separated mixes of both (inclusive, 0-based) into block indices."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    blocks: set[int] = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise UserError(f"--layers {spec!r}: expected ranges like 4-20 or 3,5,7-9")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if lo > hi:
            raise UserError(f"--layers {spec!r}: range {lo}-{hi} runs backwards")
        if hi >= n_layer:
            raise UserError(f"--layers {spec!r}: the model has blocks 0-{n_layer - 1}")
        blocks.update(range(lo, hi + 1))
    return frozenset(blocks)


def format_layers(blocks: frozenset[int]) -> str:
    """The inverse of parse_layers, compact: {0,1,2,5} -> '0-2,5'."""
    out, run = [], []
    for b in sorted(blocks):
        if run and b != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(b)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def _out_type(
    name: str, src: GGMLQuantizationType, opts: EditOptions, n_per_row: int, is_bias: bool, strict: bool
) -> GGMLQuantizationType:
    """The type an edited tensor is stored as; refuses (if strict) types we cannot write."""
    out = src if is_bias or opts.requant_type is None else opts.requant_type
    if not strict:
        return out
    if not quants.can_quantize(out):
        hint = " (it needs an importance matrix)" if out in quants.NEEDS_IMATRIX else ""
        raise UserError(
            f"tensor {name} is {out.name}, which cannot be requantized yet{hint}; "
            f"store the edited tensors as another type with --requant-type (e.g. q8_0 or f16)"
        )
    if n_per_row % quants.block_size(out):
        raise UserError(f"tensor {name}: rows of {n_per_row} values do not fit {out.name} blocks")
    return out


def plan_edit(model: Model, opts: EditOptions, strict: bool = True) -> EditPlan:
    """Decide which tensors change and how, checking everything before anything is written.

    `strict=False` skips the check that each output type can be written (for `inspect`).
    """
    arch = get_arch(model.arch)
    n_layer = model.n_layer
    layers = opts.layers if opts.layers is not None else frozenset(range(n_layer))
    tied = LM_HEAD not in model.tensors
    plan = EditPlan(arch, tied, layers, {})

    n_embd = model.n_embd

    def add(name: str, kind: str, block: int, post_norm: str | None = None) -> None:
        t = model.tensors[name]
        residual_axis = {"matrix": 1, "embedding": 0, "bias": 0}[kind]
        if len(t.shape) <= residual_axis or t.shape[residual_axis] != n_embd:
            raise UserError(f"tensor {name} has shape {list(t.shape)}, expected n_embd={n_embd} "
                            f"along ggml dimension {residual_axis}")
        is_bias = name.endswith(".bias")
        out = _out_type(name, t.tensor_type, opts, int(t.shape[0]), is_bias, strict)
        if post_norm is not None and post_norm not in model.tensors:
            raise UserError(f"{arch.name} model lacks {post_norm}, needed to edit {name}")
        aware = opts.rounding == "aware" and not is_bias and rounding.supports(out)
        plan.edits[name] = TensorEdit(name, kind, block, t.tensor_type, out, post_norm, aware)

    embeddings = opts.embeddings if opts.embeddings is not None else not tied
    if embeddings:
        if EMBEDDING not in model.tensors:
            raise UserError(f"model has no {EMBEDDING}")
        add(EMBEDDING, "embedding", 0)
        if tied:
            plan.notices.append(
                "token_embd is tied to the output head: editing it changes the output logits too"
            )
    elif opts.embeddings is None and tied:
        plan.notices.append(
            "token_embd is tied to the output head, so it is left unedited (--embeddings to edit it)"
        )
    for block in sorted(layers):
        for kind in WRITER_KINDS:
            norm = arch.post_norm(block, kind)
            for suffix, what in (("weight", "matrix"), ("bias", "bias")):
                name = f"blk.{block}.{kind}.{suffix}"
                if name in model.tensors:
                    add(name, what, block, norm)
    if not plan.edits:
        raise UserError("nothing to edit: no residual-stream writers in the selected blocks")
    return plan


def axis_vector(model: Model, edit: TensorEdit, direction: Direction) -> np.ndarray:
    """The unit vector u the tensor is projected with (Gemma post-norms: g*r/||g*r||)."""
    r = direction.for_block(edit.block)
    if edit.post_norm is None:
        return r
    g = model.values(edit.post_norm).astype(np.float32)
    return normalise(g * r, f"post-norm-weighted direction for {edit.name}")


def _rows_per_chunk(row_len: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(row_len, 1)))


def project_residual_rows(w: np.ndarray, u: np.ndarray, coef: float) -> None:
    """In place: `W += coef * u (u^T W)` for a 2-D `w` whose rows are residual dimensions."""
    c = u @ w
    step = _rows_per_chunk(w.shape[1])
    for i in range(0, w.shape[0], step):
        w[i : i + step] += (coef * u[i : i + step, None]) * c[None, :]


def project_residual_cols(e: np.ndarray, u: np.ndarray, coef: float) -> None:
    """In place: `E += coef * (E u) u^T` for a 2-D `e` whose columns are residual dimensions."""
    e += (coef * (e @ u))[:, None] * u[None, :]


def _requantize(values: np.ndarray, edit: TensorEdit) -> np.ndarray:
    try:
        return quants.quantize(values, edit.out_type)
    except ValueError as e:  # NaN/Inf: the input tensor itself holds them
        raise UserError(f"tensor {edit.name}: {e} (is the input file corrupt?)") from None


def edit_units(model: Model, edit: TensorEdit) -> list[tuple[int, int]]:
    """The independent pieces (first row, row count) an edited tensor is produced in: one
    matrix (one expert) or a bounded chunk of embedding rows. Each piece's bytes follow the
    previous piece's in the file."""
    n_rows = model.n_rows(edit.name)
    if edit.kind == "bias":
        return [(0, 1)]
    if edit.kind == "embedding":
        step = _rows_per_chunk(int(model.tensors[edit.name].shape[0]))
        return [(i, min(step, n_rows - i)) for i in range(0, n_rows, step)]
    n_embd = int(model.tensors[edit.name].shape[1])
    return [(i, n_embd) for i in range(0, n_rows, n_embd)]


def edit_unit(model: Model, edit: TensorEdit, u: np.ndarray, coef: float, first: int,
              count: int) -> tuple[np.ndarray, np.ndarray]:
    """One piece of an edited tensor: dequantize, project, requantize. Returns its output
    bytes and its fidelity sums (how much of the edit survived requantization)."""
    row_len = int(model.tensors[edit.name].shape[0])
    step = _rows_per_chunk(row_len)
    if edit.kind == "matrix":
        # dequantize in chunks into one buffer: whole-tensor dequantizers hold several temporaries
        w = np.empty((count, row_len), dtype=np.float32)
        for i in range(0, count, step):
            w[i : i + step] = quants.dequantize(model.read_rows(edit.name, first + i, min(step, count - i)),
                                                edit.src_type)
        before = u @ w
        project_residual_rows(w, u, coef)
        data = np.concatenate([_requantize(w[i : i + step], edit) for i in range(0, count, step)])
        if edit.aware:
            data = rounding.keep_edit(data, w, u, edit.out_type, True, before)
        written, err2 = np.zeros(row_len, np.float64), 0.0
        for i in range(0, count, step):
            back = quants.dequantize(data[i : i + step], edit.out_type)
            written += u[i : i + step] @ back
            err2 += float(np.square(back - w[i : i + step], dtype=np.float64).sum())
        return data, fidelity.piece_sums(before, u @ w, written, err2, w.size)
    v = quants.dequantize(model.read_rows(edit.name, first, count), edit.src_type)
    before = v @ u
    if edit.kind == "bias":
        v += coef * u * float(u @ v[0])
    else:
        project_residual_cols(v, u, coef)
    data = _requantize(v, edit)
    if edit.aware:
        data = rounding.keep_edit(data, v, u, edit.out_type, False, before)
    back = quants.dequantize(data, edit.out_type)
    err2 = float(np.square(back - v, dtype=np.float64).sum())
    return data, fidelity.piece_sums(before, v @ u, back @ u, err2, v.size)


def provenance(plan: EditPlan, opts: EditOptions, direction: Direction) -> dict[str, str | bool | int | float]:
    """The `abliterate.*` keys recorded in the output."""
    kv: dict[str, str | bool | int | float] = {
        "abliterate.mode": "reverse" if opts.reverse else "abliterate",
        "abliterate.scale": float(opts.scale),
        "abliterate.layers": format_layers(plan.layers),
        "abliterate.embeddings": EMBEDDING in plan.edits,
        "abliterate.tensor_count": len(plan.edits),
        "abliterate.direction_sha256": direction.sha256,
        "abliterate.tool_version": __version__,
    }
    if "layer" in direction.metadata:
        kv["abliterate.direction_layer"] = direction.metadata["layer"]
    if opts.requant_type is not None:
        kv["abliterate.requant_type"] = opts.requant_type.name
    kv["abliterate.rounding"] = opts.rounding
    return kv


def output_nbytes(model: Model, plan: EditPlan) -> int:
    """Total tensor bytes the edited file will hold (for progress bars)."""
    total = 0
    for name, t in model.tensors.items():
        edit = plan.edits.get(name)
        total += int(t.n_bytes) if edit is None else quants.row_bytes(edit.out_type, int(t.n_elements))
    return total


# Below this many edited values, worker processes cost more to start than they save.
PARALLEL_MIN_VALUES = 16 << 20


def default_jobs(model: Model, plan: EditPlan) -> int:
    """All cores for a large edit, one process for a small one."""
    values = sum(int(model.tensors[n].n_elements) for n in plan.edits)
    return 1 if values < PARALLEL_MIN_VALUES else available_cores()


def output_tensors(model: Model, plan: EditPlan, direction: Direction, opts: EditOptions,
                   runner: UnitRunner | None = None, report: fidelity.Report | None = None) -> list[OutTensor]:
    """Every tensor of the output, in input order: copied verbatim, or produced by the edit.

    With a `runner`, the pieces of all edited tensors are computed ahead, in parallel, and
    consumed in file order as the writer reaches each tensor.
    """
    direction.check_fits(model.n_layer, model.n_embd, model.arch)
    coef = opts.coef
    out: list[OutTensor] = []
    tasks: list[tuple[TensorEdit, np.ndarray, float, int, int]] = []
    for name, t in model.tensors.items():
        dims = tuple(int(d) for d in t.shape)
        edit = plan.edits.get(name)
        if edit is None or (coef == 0 and edit.out_type == edit.src_type):
            out.append(OutTensor(name, dims, t.tensor_type, copy_of=name))
            continue
        u = axis_vector(model, edit, direction)
        mine = [(edit, u, coef, first, count) for first, count in edit_units(model, edit)]
        tasks += mine
        if runner is None:
            results = lambda mine=mine: (edit_unit(model, *task) for task in mine)  # noqa: E731
        else:
            results = lambda n=len(mine): itertools.islice(stream, n)  # noqa: E731
        out.append(OutTensor(name, dims, edit.out_type, chunks=lambda r=results, e=edit: _recorded(r(), e, report)))
    if runner is not None:
        stream = runner.results(tasks)
    return out


def _recorded(results: Iterable[tuple[np.ndarray, np.ndarray]], edit: TensorEdit,
              report: fidelity.Report | None) -> Iterator[np.ndarray]:
    """The bytes of each piece, noting its fidelity sums on the way."""
    for data, sums in results:
        if report is not None:
            report.add(edit.name, edit.out_type.name, sums)
        yield data


def apply_edit(
    model: Model,
    plan: EditPlan,
    direction: Direction,
    opts: EditOptions,
    out_path: Path,
    on_bytes: Callable[[int], None] = lambda n: None,
    verify: Callable[[str], None] | None = None,
    merge: bool = False,
    jobs: int | None = None,
    report: fidelity.Report | None = None,
) -> list[Path]:
    """Write the edited model to `out_path` (atomically), streaming tensor by tensor.

    A split input gives a split output with the same parts (unless `merge`). `jobs` worker
    processes edit tensors ahead of the writer (default: `default_jobs`). With `verify`, the
    complete files are re-read and checked against the input before they take their places;
    `verify` receives the one-line report. Returns the paths written.
    """
    report = report if report is not None else fidelity.Report()
    kv = {**provenance(plan, opts, direction), fidelity.REPORT_KEY: Reserved(fidelity.REPORT_WIDTH, report.to_json)}
    with UnitRunner(model, jobs or default_jobs(model, plan), edit_unit) as runner:
        out = output_tensors(model, plan, direction, opts, runner, report)
        files = plan_files(model, out_path, out, kv, PROVENANCE_PREFIX, merge)
        check = None if verify is None else (lambda tmps: verify(verify_output(model, tmps, out)))
        write_files(model, files, on_bytes, check)
    return [f.path for f in files]


def verify_output(src: Model, written: list[Path], expected: list[OutTensor]) -> str:
    """Re-open written files (the parts of one model) and check every tensor's name, shape
    and type; copied tensors must be byte-identical to the input and edited ones finite.
    Returns a one-line report."""
    try:
        out = Model(written[0], parts=written)
    except UserError as e:
        raise UserError(f"verification failed: the output does not parse: {e}") from None
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
