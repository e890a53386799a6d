"""A trial's edit, run inside llama.cpp exactly as the bake would write it, without touching
the weights again.

For a writer W of block L with strength w and unit axis u, the plain edit is
`W' = W - w u (u^T W)` (and a bias `b' = b - w u (u^T b)`). Every trial's direction is a
combination `c` of a fixed basis (`schedule.basis`), and the axis is `u = g*(c@basis) / |..|`
(g the post-norm weights, else 1). Two ways carry it:

- **An exact rank-1 LoRA adapter** (`A = u^T W`, `B = -w u`) for a 2-D writer without a bias:
  with `P = (basis*g) @ W` computed once per writer, `A = (c @ P) / |c @ (basis*g)|`, so a trial
  costs a few small products, not a pass over the weights. Memory: 2 n_layer x n_in floats per
  writer (66 MB for a 1.5B model).
- **A projection of the writer's output node in llama.cpp's graph** (`x' = x - w (x.u) u`, read
  and written by the evaluation callback) for expert stacks and biased writers, which an
  adapter cannot hold. It is the same edit: the projection is linear, so it commutes with the
  router's weighted sum over the experts, `sum_e g_e (I - w u u^T)(W_e h + b_e) =
  (I - w u u^T) sum_e g_e (W_e h + b_e)`, and the node sits before any norm (`Writer.node`), so
  norms after it see what the baked weights would give them. Nothing is precomputed for these:
  the expert stacks are never dequantized.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from gguf_abliterate.arch import Writer, get_arch
from gguf_abliterate.edit.project import norm_weights
from gguf_abliterate.edit.schedule import Component, Schedule, basis, component_of, strength_of
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.names import block_tensor
from gguf_abliterate.runtime.llama import LlamaModel


@dataclass
class _Writer:
    name: str
    block: int
    writer: Writer
    weighted: np.ndarray  # (n_basis, n_embd): basis rows times the post-norm weight (or the basis)
    products: np.ndarray | None  # (n_basis, n_in): weighted @ W; None: projected in the graph


@dataclass
class TrialEdit:
    """What one trial changes inside llama.cpp: adapter pieces {writer: (A (1, n_in), B (n_embd, 1))}
    and graph projections {node: (unit axis, strength)}."""

    pieces: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    projections: dict[str, tuple[np.ndarray, float]] = field(default_factory=dict)


def apply(model: LlamaModel, edit: TrialEdit | None) -> None:
    """Run `model` under `edit` from now on (None: unedited)."""
    model.set_adapter(None if edit is None else edit.pieces)
    model.set_projections(None if edit is None else edit.projections)


def writers_of(model: Model) -> list[tuple[int, Writer, str]]:
    """(block, writer, weight name) of every residual writer the file holds."""
    arch = get_arch(model.arch)
    return [(block, writer, name) for block in range(model.n_layer) for writer in arch.writers
            if (name := block_tensor(writer.tensor, block)) in model.tensors]


def has_experts(model: Model) -> bool:
    """Whether the search gives the experts a strength (a kernel) of their own."""
    return any(component_of(writer) is Component.EXPERTS for _, writer, _ in writers_of(model))


class TrialAdapters:
    """Everything needed to turn a schedule into a trial's edit for this model."""

    def __init__(self, model: Model, per_block: np.ndarray, harmless_means: np.ndarray,
                 progress: Callable[[int], None] = lambda n: None):
        arch = get_arch(model.arch)
        self.basis = basis(per_block, harmless_means).astype(np.float32)
        self.writers: list[_Writer] = []
        self.biased: list[str] = []  # biases no trial edits (an adapter cannot, and no node is known)
        for block, writer, name in writers_of(model):
            bias = block_tensor(writer.tensor, block, "bias")
            stack = len(model.tensors[name].shape) != 2
            in_graph = bool(writer.node) and (stack or bias in model.tensors)
            if stack and not in_graph:
                raise UserError(f"{name}: optimise cannot try edits of this expert stack ({model.arch}: "
                                f"no graph node known to hold its output)")
            if bias in model.tensors and not in_graph:
                self.biased.append(bias)
            g = norm_weights(model, arch.norm_chain(block, writer, model.tensors))
            weighted = self.basis if g is None else self.basis * g
            products = None if in_graph else weighted @ model.values(name)
            self.writers.append(_Writer(name, block, writer, weighted, products))
            progress(1)
        self.experts = has_experts(model)

    def edit(self, schedule: Schedule) -> TrialEdit:
        """The trial edit for the blocks the schedule edits."""
        out = TrialEdit()
        for w in self.writers:
            strength = float(strength_of(schedule.strengths, w.writer)[w.block])
            if strength == 0:
                continue
            c = schedule.coefficients[w.block].astype(np.float32)
            axis = c @ w.weighted
            norm = float(np.linalg.norm(axis))
            if w.products is None:
                out.projections[f"{w.writer.node}-{w.block}"] = (axis / norm, strength)
            else:
                out.pieces[w.name] = ((c @ w.products)[None, :] / norm, (-strength / norm * axis)[:, None])
        return out
