"""Quantization-aware rounding: requantize an edited tensor so the edit survives.

Rounding each edited weight to its nearest code adds an error E whose component along the
edit axis, u^T E, puts back part of what the projection removed ("snap-back"). Here the
block scales stay those ggml's quantizer chose for the edited weights, and single codes move
to the neighbouring level where that cancels u^T E at the least cost in squared weight error:

For every group of values that sums into one component (a matrix column over its residual
rows; an embedding row over its residual columns), with residual r = sum_i u_i e_i, each
value i offers one move (to the level above or below, whichever pushes r towards zero) with
gain g_i = |u_i delta_i| and cost c_i = (e_i + delta_i)^2 - e_i^2. The moves are taken
cheapest-per-gain first, as many as minimise sum(c) + WEIGHT * n * r^2 (but always as many as
bring |r| under LEAK_LIMIT of the component's RMS, if they can), and the search repeats
on what is left with ever smaller moves (a move is only offered if g_i < 2|r|, so |r| never
grows). Moving back a code moved in an earlier pass is a move like any other.

The weight error still grows, because the edit moves weights by far less than a step and can
only survive as whole-step moves: about 1.3x nearest rounding's error on Q4_K tensors
requantized to Q4_K, where nearest rounding's small error is mostly the edit undone. When u
sits almost entirely on one or two residual dimensions (Gemma's post-norm weights make it so),
fine corrections need many costly moves; below LEAK_LIMIT, WEIGHT decides how many are worth it.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from gguf_abliterate.quants.types import QuantType, get_type

# embedding rows handled at once by `keep_edit`: their steps and offsets are spread per value
GROUP_VALUES = 1 << 18
# passes of ever smaller moves: groups that take no move stop, so this bounds only those still
# moving (Q2_K columns under a massive activation needed more than 12)
PASSES = 24
# most moves considered per group and pass: a pass starts with `rounding_moves.START` and doubles them
# after taking all it kept (Q6_K columns of a 1.5B ffn_down take about 40 moves per group)
CANDIDATES = 64
# a group is done when its error component is below this fraction of the RMS component the
# edit acted on (its size before the edit)
TOLERANCE = 1e-3
# ... and it must get below this fraction, whatever the cost in weight error
LEAK_LIMIT = 5e-3
# How much the component's squared error counts against the weights' squared error, per value
# of the group: 1 weighs the component along u like all other directions together (for a
# random error it holds 1/n of the total). Moves stop once they cost more than they save.
WEIGHT = 1.0
# keep_edit_compensated: columns whose errors are carried one by one before one matmul carries
# them all further (GPTQ's lazy batch updates)
LAZY = 32


def supports(qtype: GGMLQuantizationType) -> bool:
    """Whether the type has codes this module can move (every integer-coded type)."""
    return get_type(qtype).has_codes


def scales(blocks: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray, int]:
    """Per sub-block, (a, b) such that code c dequantizes to `a * table[c] + b` as ggml's
    to_float computes it, and the sub-block's size: (blocks, block_size / size) float32 arrays."""
    layout = get_type(qtype)
    a, b = layout.steps(blocks)
    a = np.asarray(a, np.float32)
    return a, (np.zeros_like(a) if b is None else np.asarray(b, np.float32)), layout.block_size // a.shape[1]


def levels(blocks: np.ndarray, qtype: GGMLQuantizationType) -> tuple[np.ndarray, np.ndarray]:
    """`scales` per value: (blocks, block_size) arrays."""
    a, b, per = scales(blocks, qtype)
    return np.repeat(a, per, axis=1), np.repeat(b, per, axis=1)


def _search_inputs(layout: QuantType, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the compiled search reads besides the values: the type's table padded with NaN (so
    that code-1 and code+1 index safely; NaN marks "no level there"), u as float32, and the
    order it visits a group's values in (largest |u| first)."""
    assert layout.table is not None
    u = np.ascontiguousarray(u, dtype=np.float32)
    padded = np.concatenate([[np.nan], layout.table, [np.nan]]).astype(np.float32)
    return padded, u, np.argsort(-np.abs(u), kind="stable")


def keep_edit(data: np.ndarray, target: np.ndarray, u: np.ndarray, qtype: GGMLQuantizationType, *,
              over_rows: bool, before: np.ndarray, codes: np.ndarray | None = None) -> np.ndarray:
    """Re-round quantized rows `data` (rows, row_bytes) of float `target` (rows, n) so that
    the component along `u` matches the target's. `over_rows`: the component is u^T W
    (u indexes rows, a matrix writing the residual stream); else W u (u indexes columns,
    token embeddings). `before` is that component before the edit, which sets the tolerance.
    `codes` (rows, n) uint8, if given, are the codes that go with data's scales
    (`quants.quantize_split`), and they are moved in place (a copy would add a byte per weight
    to the edit's peak memory): data's code fields are then not read, only written.
    Returns new bytes with the same scales and nearly the same codes."""
    layout = get_type(qtype)
    bs, ts = GGML_QUANT_SIZES[qtype]
    n_rows, n = target.shape
    out = np.array(data, dtype=np.uint8, copy=True).reshape(-1, ts)
    code = layout.read_codes(out).reshape(n_rows, n) if codes is None else codes.reshape(n_rows, n)
    assert code.dtype == np.uint8 and code.flags.c_contiguous  # moved in place, as numba writes it
    u = np.asarray(u, dtype=np.float32)
    rms = float(np.sqrt(np.mean(np.square(before, dtype=np.float64)))) if before.size else 0.0
    tol, limit = TOLERANCE * rms, LEAK_LIMIT * rms
    # numba's import would slow every command's start, so it happens here
    from gguf_abliterate.quants.rounding_moves import settle_columns, settle_rows

    padded, u, visit = _search_inputs(layout, u)
    search = (visit, padded, layout.first is not None, tol, limit, CANDIDATES, PASSES, WEIGHT)
    if over_rows:
        # groups are columns; the search reads them in tiles of whole rows' lines
        sa, sb, size = scales(out, qtype)
        settle_columns(code, sa.reshape(n_rows, -1), sb.reshape(n_rows, -1), size,
                       np.ascontiguousarray(target, dtype=np.float32), u, *search)
    else:
        # steps and offsets are spread per value here: GROUP_VALUES rows' worth at a time
        per = max(1, GROUP_VALUES // n)
        for i in range(0, n_rows, per):
            m = min(per, n_rows - i)
            a, b = levels(out[i * n // bs : (i + m) * n // bs], qtype)
            settle_rows(code[i : i + m], a.reshape(m, n), b.reshape(m, n), target[i : i + m], u, *search)
    layout.write_codes(out, code.reshape(-1, bs))
    return out.reshape(n_rows, -1)


def column_block(n_in: int) -> int:
    """Width of the diagonal blocks of the input second moments `keep_edit_compensated` uses:
    256 (a K-quant super-block) or the largest power of two from 32 that divides n_in, 0 if none."""
    return next((w for w in (256, 128, 64, 32) if n_in % w == 0), 0)


def compensates(qtype: GGMLQuantizationType, n_in: int) -> bool:
    """Whether `keep_edit_compensated` can round this type and row length (consecutive
    integer levels, whole column blocks)."""
    return get_type(qtype).first is not None and column_block(n_in) > 0


def keep_edit_compensated(data: np.ndarray, target: np.ndarray, u: np.ndarray, qtype: GGMLQuantizationType, *,
                          before: np.ndarray, moments: np.ndarray) -> np.ndarray:
    """Like `keep_edit` for a matrix writing the residual stream, but each rounding error is
    offset in the columns that follow it, weighted by what the matrix reads (GPTQ's rule).

    `moments` (blocks, B, B) are the diagonal blocks of the inputs' second moments E[x x^T]
    (B = column_block(n_in)). Column p of every block is rounded at once, blocks' columns in
    order of falling input variance (act-order): nearest code on the scales ggml's quantizer
    chose (in `data`), then the search moves codes so the column's component along u is the
    target's, then the rounding error e is carried to the block's later columns as
    w_k -= e * U_pk / U_pp, U the upper Cholesky factor of the block's inverse moments.
    Two guards keep the edit: e loses its component along u before it is carried (so later
    columns keep the target's), and carried values beyond the scales' range are clipped to it
    (Qwen2.5-1.5B's block 26 reads a massive activation: unclipped, the carry drove half a
    column's codes to the ends of their range, where no move could settle it: 7% leak).
    On held-back prompts this halves the output error of aware rounding (tools/bench_requant.py).
    """
    from gguf_abliterate.quants.rounding_moves import compensate_columns  # numba, as in keep_edit

    layout = get_type(qtype)
    assert layout.table is not None and layout.first is not None
    bs, ts = GGML_QUANT_SIZES[qtype]
    n_rows, n = target.shape
    width = column_block(n)
    nb = n // width
    out = np.array(data, dtype=np.uint8, copy=True).reshape(-1, ts)

    # GPTQ's act-order: within each block, the columns whose inputs vary most are rounded
    # first, so that the columns left to absorb their errors are those that matter least
    order = np.argsort(-np.einsum("bii->bi", moments), axis=1, kind="stable")  # (blocks, B)
    perm = (order + width * np.arange(nb)[:, None]).ravel()  # the columns, in that order block by block

    # the target by column, (blocks, width, rows): position p of every block is one contiguous
    # group (one column gather: take_along_axis over the 3-d result would build three index
    # arrays of its size)
    w = np.ascontiguousarray(np.asarray(target, dtype=np.float32).T[perm]).reshape(nb, width, n_rows)
    # steps and offsets per sub-block, (blocks, sub-blocks, rows), and each column's sub-block
    sa, sb, per = scales(out, qtype)
    a, b = (np.ascontiguousarray(x.reshape(n_rows, nb, width // per).transpose(1, 2, 0)) for x in (sa, sb))
    sub = order // per
    moments = moments[np.arange(nb)[:, None, None], order[:, :, None], order[:, None, :]]
    padded, u, visit = _search_inputs(layout, u)
    rms = float(np.sqrt(np.mean(np.square(before, dtype=np.float64)))) if before.size else 0.0
    tol, limit = TOLERANCE * rms, LEAK_LIMIT * rms
    chol = np.stack([_inverse_factor(m) for m in moments]).astype(np.float32)  # (blocks, B, B)
    codes = np.empty((nb, width, n_rows), np.uint8)
    # GPTQ's lazy batches: errors reach the next LAZY columns at once, the rest by one matmul
    for p0 in range(0, width, LAZY):
        p1 = min(p0 + LAZY, width)
        errs = np.empty((nb, p1 - p0, n_rows), np.float32)
        compensate_columns(codes, a, b, sub, w, errs, chol, u, visit, padded, layout.first, p0, p1, tol, limit,
                           CANDIDATES, PASSES, WEIGHT)
        if p1 < width:
            w[:, p1:] -= np.matmul(chol[:, p0:p1, p1:].transpose(0, 2, 1), errs)
    back = np.empty(n, np.intp)
    back[perm] = np.arange(n)  # each column's place in the act-order
    layout.write_codes(out, codes.transpose(2, 0, 1).reshape(n_rows, n)[:, back].reshape(-1, bs))
    return out.reshape(n_rows, -1)


def _inverse_factor(moments: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of the inverse of a block of second moments, damped by 1% of its
    mean diagonal (GPTQ's choice) so that inputs never seen do not make it singular."""
    m = np.asarray(moments, np.float64)
    damp = 0.01 * float(np.mean(np.diag(m))) or 1.0
    inv = np.linalg.inv(m + damp * np.eye(len(m)))
    return np.linalg.cholesky((inv + inv.T) / 2).T
