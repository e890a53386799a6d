"""The edit as a small file instead of a whole model: a rank-1 LoRA adapter for llama.cpp.

`W' = W + coef * u (u^T W)` is exactly `W + B A` with `A = u^T W` (1 x n_in, from this very
file's dequantized weights) and `B = coef * u` (n_out x 1); `--steer`'s `W + coef * u w^T`
is `A = w^T`. llama.cpp applies an adapter as
`W x + scale * alpha / r * B (A x)`; with alpha = r = 1 and `--lora` (scale 1) that is the
float edit. Only 2-D writer matrices are expressible: biases, MoE expert stacks and
token_embd (llama.cpp aborts on an adapter for a tied token_embd) are left out, and said so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.edit.plan import EditPlan, TensorKind
from gguf_abliterate.edit.project import axis_vector
from gguf_abliterate.edit.schedule import Method
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io.adapters import write_lora_adapter
from gguf_abliterate.gguf_io import Model


def lora_pieces(model: Model, plan: EditPlan,
                direction: Direction) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{tensor name: (A (1, n_in), B (n_out, 1))} and what could not be expressed."""
    pieces, skipped = {}, []
    for name, edit in plan.edits.items():
        if edit.kind is not TensorKind.MATRIX or len(model.tensors[name].shape) != 2:
            skipped.append(name)
            continue
        u = axis_vector(model, edit, direction).astype(np.float32)
        reads = edit.reads if edit.method is Method.STEER else edit.only_columns(u @ model.values(name))
        a = np.asarray(reads, np.float32)[None, :]
        pieces[name] = (a, (edit.coef * u)[:, None].astype(np.float32))
    return pieces, skipped


def write_lora(model: Model, plan: EditPlan, direction: Direction, out: Path,
               provenance: dict[str, str | bool | int | float]) -> list[str]:
    """Write the adapter GGUF (atomically); returns the names of the edits it leaves out."""
    pieces, skipped = lora_pieces(model, plan, direction)
    if not pieces:
        raise UserError("nothing to put in an adapter: the edit touches no 2-D writer matrix")
    write_lora_adapter(out, model.arch, pieces, dict(provenance))
    return skipped
