"""A trial's edit as an exact rank-1 LoRA adapter, built without touching the weights again.

For a writer W of block L with strength w and unit axis u, the plain edit is
`W' = W - w u (u^T W)`: the adapter `A = u^T W`, `B = -w u`. Every trial's direction is a
combination `c` of a fixed basis (`schedule.basis`), and the axis is `u = g*(c@basis) / |..|`
(g the post-norm weight on Gemma 2/3, else 1), so with `P = (basis*g) @ W` computed once per
writer, `A = (c @ P) / |c @ (basis*g)|`: a trial costs a few small products, not a pass over
the weights. Memory: 2 n_layer x n_in floats per writer (66 MB for a 1.5B model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gguf_abliterate.arch import get_arch
from gguf_abliterate.edit.project import norm_weights
from gguf_abliterate.edit.schedule import Component, Schedule, basis, component_of
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.names import block_tensor


@dataclass
class _Writer:
    name: str
    block: int
    component: Component
    weighted: np.ndarray  # (n_basis, n_embd): basis rows times the post-norm weight (or the basis)
    products: np.ndarray  # (n_basis, n_in): weighted @ W


class TrialAdapters:
    """Everything needed to turn a schedule into adapter pieces for this model."""

    def __init__(self, model: Model, per_block: np.ndarray, harmless_means: np.ndarray,
                 progress: Callable[[int], None] = lambda n: None):
        arch = get_arch(model.arch)
        self.basis = basis(per_block, harmless_means).astype(np.float32)
        self.writers: list[_Writer] = []
        for block in range(model.n_layer):
            for writer in arch.writers:
                name = block_tensor(writer.tensor, block)
                if name not in model.tensors:
                    continue
                if len(model.tensors[name].shape) != 2:
                    raise UserError(f"{name}: optimise cannot try edits of MoE expert stacks yet "
                                    f"(an adapter holds 2-D matrices only)")
                g = norm_weights(model, arch.norm_chain(block, writer, model.tensors))
                weighted = self.basis if g is None else self.basis * g
                self.writers.append(_Writer(name, block, component_of(writer), weighted,
                                            weighted @ model.values(name)))
                progress(1)
        self.biased = [block_tensor(w.tensor, b, "bias") for b in range(model.n_layer) for w in arch.writers
                       if block_tensor(w.tensor, b, "bias") in model.tensors]

    def pieces(self, schedule: Schedule) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{writer: (A (1, n_in), B (n_embd, 1))} for the blocks the schedule edits."""
        out = {}
        for w in self.writers:
            strength = float(schedule.strengths[w.component][w.block])
            if strength == 0:
                continue
            c = schedule.coefficients[w.block].astype(np.float32)
            axis = c @ w.weighted
            norm = float(np.linalg.norm(axis))
            out[w.name] = ((c @ w.products)[None, :] / norm, (-strength / norm * axis)[:, None])
        return out
