"""A direction as a llama.cpp control vector, for steering at inference time.

llama.cpp's control-vector GGUF holds F32 tensors `direction.N` (N >= 1), each added to the
output of block N, the same `l_out-N` a direction is measured at (llama.cpp applies
`direction.N` in block N's graph; block 0 never has one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gguf_abliterate import names
from gguf_abliterate.formats.direction_file import load_direction, normalise
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io.adapters import write_small_gguf


def control_vectors(direction_path: Path, n_layer: int, blocks: frozenset[int], scale: float) -> dict[int, np.ndarray]:
    """{block: vector added to that block's output}: scale times the block's direction (per-layer
    directions from a `direction` .safetensors file, else the one vector), times the block's
    mean-difference norm when the file has one, so scale 1 adds the measured difference."""
    d = load_direction(direction_path)
    rows = np.broadcast_to(d.vectors, (n_layer, d.n_embd)) if not d.per_layer else d.vectors
    if d.per_block is not None:
        rows = d.per_block  # measured rows, not yet unit length; blocks before any token mixing
        # that reaches past the chat template's last tokens (LFM2's short convolutions) are zero
    norms = d.statistics.get("diff_norm", np.ones(n_layer, np.float32)).astype(np.float32)
    if rows.shape[0] != n_layer:
        raise UserError(f"{direction_path}: {rows.shape[0]} layers of directions, the model has {n_layer}")
    if 0 in blocks:
        raise UserError("llama.cpp control vectors cannot act on block 0; use --layers 1-...")
    return {b: (scale * norms[b] * normalise(rows[b], f"{direction_path.name}'s block {b} direction")).astype(np.float32)
            for b in sorted(blocks)}


def write_control_vector(vectors: dict[int, np.ndarray], arch: str, out: Path) -> None:
    """llama.cpp's control-vector GGUF: `direction.N` is added to the output of block N (l_out-N)."""
    kv = {names.CVEC_MODEL_HINT: arch, names.CVEC_LAYER_COUNT: np.int32(len(vectors))}
    write_small_gguf(out, names.CVEC_ARCHITECTURE, kv, {names.cvec_direction(b): v for b, v in vectors.items()})
