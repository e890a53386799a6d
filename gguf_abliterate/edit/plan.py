"""Plan an edit: which tensors change, along which axis, how strongly, stored as what.

Everything is checked here, before anything is written: that each tensor has the residual
stream where it should, that its output type can be written, that the post-norms the architecture needs exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from gguf import MODEL_TENSOR, GGMLQuantizationType

from gguf_abliterate import names, quants
from gguf_abliterate.arch import Arch, get_arch
from gguf_abliterate.edit.options import EditOptions, Rounding
from gguf_abliterate.edit.schedule import Component, Method, strength_of
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import rounding


class TensorKind(Enum):
    """How a tensor holds the residual stream, which decides how it is projected."""

    MATRIX = "matrix"  # a writer: numpy rows are residual dimensions, component u^T W
    EMBEDDING = "embedding"  # token_embd: one residual row per token, component E u
    BIAS = "bias"  # a writer's bias: one residual vector

    @property
    def over_rows(self) -> bool:
        """Whether the residual stream runs along the rows (else along each row)."""
        return self is TensorKind.MATRIX

    @property
    def residual_dim(self) -> int:
        """The ggml dimension of length n_embd."""
        return 1 if self is TensorKind.MATRIX else 0


@dataclass(frozen=True)
class TensorEdit:
    """One tensor the edit changes."""

    name: str
    kind: TensorKind
    block: int  # which row of a per-layer direction applies (0 for token_embd)
    coef: float  # the signed strength: W + coef * u (u^T W)
    src_type: GGMLQuantizationType
    out_type: GGMLQuantizationType
    post_norms: tuple[str, ...] = ()  # norm weights g between it and the residual: u ~ g*r
    aware: bool = False  # re-round the codes so the edit survives requantization
    method: Method = Method.PLAIN
    reads: np.ndarray | None = field(default=None, compare=False)  # STEER: the input-side vector w
    # --rounding gptq: the diagonal blocks of the second moments of what the matrix reads
    moments: np.ndarray | None = field(default=None, compare=False)
    # a head-restricted edit: the input columns (start, stop) of the heads it changes; None: all
    columns: tuple[tuple[int, int], ...] | None = None

    def only_columns(self, c: np.ndarray) -> np.ndarray:
        """A row over the matrix's inputs (u^T W), zero outside the edited heads' columns."""
        if self.columns is None:
            return c
        kept = np.zeros_like(c)
        for start, stop in self.columns:
            kept[..., start:stop] = c[..., start:stop]
        return kept


@dataclass
class EditPlan:
    """Every edited tensor, by name, and what the user should be told about the choices."""

    arch: Arch
    tied_embeddings: bool
    layers: frozenset[int]
    edits: dict[str, TensorEdit]
    notices: list[str] = field(default_factory=list)
    statistics: str | None = None  # the input statistics gptq rounding used (their source and digest)


def output_type(name: str, src: GGMLQuantizationType, opts: EditOptions, n_per_row: int, is_bias: bool,
                strict: bool) -> GGMLQuantizationType:
    """The type an edited tensor is stored as; refuses (if strict) types we cannot write."""
    out = src if is_bias or opts.requant_type is None else opts.requant_type
    if not strict:
        return out
    if not quants.can_quantize(out):
        hint = " (it needs an importance matrix)" if quants.needs_imatrix(out) else ""
        raise UserError(
            f"tensor {name} is {out.name}, which cannot be requantized yet{hint}; "
            f"store the edited tensors as another type with --requant-type (e.g. q8_0 or f16)"
        )
    if n_per_row % quants.block_size(out):
        raise UserError(f"tensor {name}: rows of {n_per_row} values do not fit {out.name} blocks")
    return out


def plan_edit(model: Model, opts: EditOptions, strict: bool = True,
              strengths: Mapping[Component, np.ndarray] | None = None, method: Method = Method.PLAIN,
              heads: Mapping[int, Sequence[int]] | None = None) -> EditPlan:
    """Decide which tensors change and how, checking everything before anything is written.

    `strict=False` skips the check that each output type can be written (for `inspect`).
    `strengths` (a schedule: per component, a factor per block) scales each writer's edit;
    blocks where it is 0 are left alone, and token_embd is not edited (no search saw it).
    `heads` (block -> head indices) edits only those heads' columns of the attention output
    projections, and nothing else.
    """
    arch = get_arch(model.arch)
    for role, why in arch.refuses:
        if any(names.tensor_role(name) == role for name in model.tensors):
            raise UserError(f"this {arch.name} model has {role} tensors, {why}")
    n_layer = model.n_layer
    layers = opts.layers if opts.layers is not None else frozenset(range(n_layer))
    columns = None if heads is None else _head_columns(model, arch, heads, method, opts)
    if columns is not None:
        layers = layers & frozenset(columns)
    tied = names.OUTPUT not in model.tensors
    plan = EditPlan(arch, tied, layers, {})

    n_embd = model.n_embd

    def add(name: str, kind: TensorKind, block: int, post_norms: tuple[str, ...] = (), factor: float = 1.0,
            cols: tuple[tuple[int, int], ...] | None = None) -> None:
        t = model.tensors[name]
        dim = kind.residual_dim
        if len(t.shape) <= dim or t.shape[dim] != n_embd:
            raise UserError(f"tensor {name} has shape {list(t.shape)}, expected n_embd={n_embd} "
                            f"along ggml dimension {dim}")
        is_bias = kind is TensorKind.BIAS
        out = output_type(name, t.tensor_type, opts, int(t.shape[0]), is_bias, strict)
        for norm in post_norms:
            if norm not in model.tensors:
                raise UserError(f"{arch.name} model lacks {norm}, needed to edit {name}")
        aware = opts.rounding is not Rounding.NEAREST and not is_bias and rounding.supports(out)
        plan.edits[name] = TensorEdit(name, kind, block, opts.coef * factor, t.tensor_type, out, post_norms, aware,
                                      method if kind is TensorKind.MATRIX else Method.PLAIN, columns=cols)

    if strengths is not None:
        if opts.embeddings:
            raise UserError("a scheduled edit (from optimise) leaves token_embd alone; drop --embeddings")
        if any(np.asarray(s).shape != (n_layer,) for s in strengths.values()):
            raise UserError(f"the edit's per-block strengths do not fit the model's {n_layer} blocks")
    embeddings = opts.embeddings if opts.embeddings is not None else (not tied and strengths is None
                                                                      and columns is None)
    if embeddings:
        if names.TOKEN_EMBD not in model.tensors:
            raise UserError(f"model has no {names.TOKEN_EMBD}")
        add(names.TOKEN_EMBD, TensorKind.EMBEDDING, 0)
        if tied:
            plan.notices.append(
                "token_embd is tied to the output head: editing it changes the output logits too"
            )
    elif opts.embeddings is None and tied and columns is None:
        plan.notices.append(
            "token_embd is tied to the output head, so it is left unedited (--embeddings to edit it)"
        )
    for block in sorted(layers):
        for writer in arch.writers:
            if columns is not None and writer.tensor != MODEL_TENSOR.ATTN_OUT:
                continue  # a head-restricted edit: the chosen heads' columns of attn_output only
            norms = arch.norm_chain(block, writer, model.tensors)
            factor = 1.0 if strengths is None else float(strength_of(strengths, writer)[block])
            for suffix, kind in (("weight", TensorKind.MATRIX), ("bias", TensorKind.BIAS)):
                name = names.block_tensor(writer.tensor, block, suffix)
                if name in model.tensors and (columns is None or kind is TensorKind.MATRIX):
                    add(name, kind, block, norms, factor, None if columns is None else columns[block])
    if not plan.edits:
        raise UserError("nothing to edit: " + ("no residual-stream writers in the selected blocks" if columns is None
                                               else "no chosen head lies in the selected blocks"))
    return plan


def _head_columns(model: Model, arch: Arch, heads: Mapping[int, Sequence[int]], method: Method,
                  opts: EditOptions) -> dict[int, tuple[tuple[int, int], ...]]:
    """Per chosen block, the input columns (start, stop) of its chosen heads in `attn_output`,
    checked: what a head-restricted edit changes, and nothing else."""
    if method is not Method.PLAIN:
        raise UserError(f"a head-restricted edit projects each head's columns plainly; drop --method {method.value}")
    if opts.embeddings:
        raise UserError("a head-restricted edit changes attention output projections only; drop --embeddings")
    if not any(w.tensor == MODEL_TENSOR.ATTN_OUT for w in arch.writers):
        raise UserError(f"{arch.name} models have no attention output projection to restrict to heads")
    columns = {}
    for block, chosen in sorted(heads.items()):
        if not 0 <= block < model.n_layer:
            raise UserError(f"head {block}.{chosen[0]}: the model has blocks 0-{model.n_layer - 1}")
        count, width = model.attention_heads(block)
        bad = [h for h in chosen if not 0 <= h < count]
        if bad:
            raise UserError(f"head {block}.{bad[0]}: block {block} has heads 0-{count - 1}")
        columns[block] = tuple((h * width, (h + 1) * width) for h in sorted(set(chosen)))
    return columns
