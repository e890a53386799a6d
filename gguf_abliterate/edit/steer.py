"""`--steer`: add a fixed vector along the direction instead of projecting.

The projection `W + s u u^T W` scales whatever component the activations already have, so it
can only strengthen the side of the axis a model leans to (`direction/lean.py`). Steering adds
`a u` to the residual stream whatever the lean, as llama.cpp's control vectors do at
inference; baked into weights, it becomes a rank-1 term in the direction's block's MLP down
projection, `W' = W + a u w^T`, with `w = m / |m|^2` for `m` the block's mean MLP input over
every token of the direction prompts (`direction` records it). The added vector is then
`a (w^T z) u` for each token's input z: `a` on average, and on Qwen2.5-Coder-0.5B between
0.2a and 2.2a (never of the other sign) across the tokens of everyday questions. `a` is `S`
times the norm of the block's mean difference, so S = 1 adds the whole difference of the
positive and negative prompts' means. A norm after the MLP (Gemma 2/3's post-norms) would
rescale the added vector with the rest, so those models are refused.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import MODEL_TENSOR

from gguf_abliterate import names
from gguf_abliterate.arch import get_arch
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.edit.options import EditOptions, Rounding
from gguf_abliterate.edit.plan import EditPlan, TensorEdit, TensorKind, output_type
from gguf_abliterate.edit.schedule import Method
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import rounding


def steer_plan(model: Model, direction: Direction, strength: float, opts: EditOptions) -> EditPlan:
    """The one-tensor edit that adds `strength` times the mean difference at the direction's
    block; everything checked before anything is written."""
    if not math.isfinite(strength) or strength == 0:
        raise UserError("--steer must be a finite number other than 0")
    measured = "layer" in direction.metadata and "diff_norm" in direction.statistics
    if not measured or direction.mlp_input_means is None:
        raise UserError("--steer needs a .safetensors direction file from `direction` (llama engine) of this "
                        "version, which records each block's mean MLP input")
    block = int(direction.metadata["layer"])
    arch = get_arch(model.arch)
    if arch.has_norms:
        raise UserError(f"{arch.name} normalises each MLP output before adding it to the residual stream, which "
                        f"would rescale a steering vector with it; --steer needs a model without post-norms")
    name = names.block_tensor(MODEL_TENSOR.FFN_DOWN, block, "weight")
    if name not in model.tensors:
        raise UserError(f"block {block} has no dense MLP down projection ({name}; mixture-of-experts blocks have "
                        f"none), which --steer adds through")
    means = direction.mlp_input_means
    t = model.tensors[name]
    if means.shape != (model.n_layer, int(t.shape[0])) or int(t.shape[1]) != model.n_embd:
        raise UserError(f"the direction file's MLP input means {list(means.shape)} do not fit {name} "
                        f"{list(t.shape)}")
    m = means[block].astype(np.float64)
    reads = (m / float(m @ m)).astype(np.float32)
    coef = strength * float(direction.statistics["diff_norm"][block])
    out = output_type(name, t.tensor_type, opts, int(t.shape[0]), False, True)
    aware = opts.rounding is not Rounding.NEAREST and rounding.supports(out)
    edit = TensorEdit(name, TensorKind.MATRIX, block, coef, t.tensor_type, out, (), aware, Method.STEER, reads)
    return EditPlan(arch, names.OUTPUT not in model.tensors, frozenset({block}), {name: edit})
