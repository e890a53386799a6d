"""The edit as a small file instead of a whole model: a rank-1 LoRA adapter for llama.cpp.

`W' = W + coef * u (u^T W)` is exactly `W + B A` with `A = u^T W` (1 x n_in, from this very
file's dequantized weights) and `B = coef * u` (n_out x 1). llama.cpp applies an adapter as
`W x + scale * alpha / r * B (A x)`; with alpha = r = 1 and `--lora` (scale 1) that is the
float edit. Only 2-D writer matrices are expressible: biases, MoE expert stacks and
token_embd (llama.cpp aborts on an adapter for a tied token_embd) are left out, and said so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from gguf import GGUFValueType, GGUFWriter

from gguf_abliterate.directions import Direction
from gguf_abliterate.edit import EditOptions, EditPlan, axis_vector
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model


def lora_pieces(model: Model, plan: EditPlan, direction: Direction,
                opts: EditOptions) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{tensor name: (A (1, n_in), B (n_out, 1))} and what could not be expressed."""
    pieces, skipped = {}, []
    for name, edit in plan.edits.items():
        if edit.kind != "matrix" or len(model.tensors[name].shape) != 2:
            skipped.append(name)
            continue
        u = axis_vector(model, edit, direction).astype(np.float32)
        a = (u @ model.values(name)).astype(np.float32)[None, :]
        pieces[name] = (a, (opts.coef * u)[:, None].astype(np.float32))
    return pieces, skipped


def write_lora(model: Model, plan: EditPlan, direction: Direction, opts: EditOptions, out: Path,
               provenance: dict[str, str | bool | int | float]) -> list[str]:
    """Write the adapter GGUF (under a temporary name, renamed when complete); returns the
    names of the edits it leaves out."""
    pieces, skipped = lora_pieces(model, plan, direction, opts)
    if not pieces:
        raise UserError("nothing to put in an adapter: the edit touches no 2-D writer matrix")
    kv = {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 1.0, **provenance}
    tensors = {}
    for name, (a, b) in pieces.items():
        tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"] = a, b
    _write_small_gguf(out, model.arch, kv, tensors)
    return skipped


def _write_small_gguf(out: Path, arch: str, kv: dict[str, str | bool | int | float | np.int32],
                      tensors: dict[str, np.ndarray]) -> None:
    """A fresh (small, in-memory) GGUF through gguf-py, under a temporary name renamed when complete."""
    tmp = out.with_name(f".{out.name}.partial")
    try:
        w = GGUFWriter(str(tmp), arch)
        for key, value in kv.items():
            w.add_key_value(key, value, _VTYPES.get(type(value), GGUFValueType.STRING))
        for name, data in tensors.items():
            w.add_tensor(name, data)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


_VTYPES = {bool: GGUFValueType.BOOL, int: GGUFValueType.INT64, float: GGUFValueType.FLOAT32,
           np.int32: GGUFValueType.INT32}


def control_vectors(direction_path: Path, n_layer: int, blocks: frozenset[int], scale: float) -> dict[int, np.ndarray]:
    """{block: vector added to that block's output}: scale times the block's direction (per-layer
    directions from a `direction` .safetensors file, else the one vector), times the block's
    mean-difference norm when the file has one, so scale 1 adds the measured difference."""
    from safetensors import safe_open

    from gguf_abliterate.directions import load_direction, normalise

    d = load_direction(direction_path)
    rows = np.broadcast_to(d.vectors, (n_layer, d.n_embd)) if not d.per_layer else d.vectors
    norms = np.ones(n_layer, np.float32)
    if direction_path.suffix.lower() == ".safetensors":
        with safe_open(str(direction_path), framework="numpy") as f:
            if "directions" in f.keys():
                rows = normalise(f.get_tensor("directions"))
            if "diff_norm" in f.keys():
                norms = f.get_tensor("diff_norm").astype(np.float32)
    if rows.shape[0] != n_layer:
        raise UserError(f"{direction_path}: {rows.shape[0]} layers of directions, the model has {n_layer}")
    if 0 in blocks:
        raise UserError("llama.cpp control vectors cannot act on block 0; use --layers 1-...")
    return {b: (scale * norms[b] * rows[b]).astype(np.float32) for b in sorted(blocks)}


def write_control_vector(vectors: dict[int, np.ndarray], arch: str, n_layer: int, out: Path) -> None:
    """llama.cpp's control-vector GGUF: `direction.N` is added to the output of block N (l_out-N)."""
    _write_small_gguf(out, "controlvector", {"controlvector.model_hint": arch, "controlvector.layer_count": np.int32(len(vectors))},
                      {f"direction.{block}": v for block, v in vectors.items()})
