"""What a direction means, read off the model itself (`explain`).

- **The words it speaks for** (`lens`): the model reads its last residual `x` through the
  final norm (weight `g`; RMSNorm scales `x`, a LayerNorm also centres it) and the output head
  `W`. Read the way the logit lens reads a residual, the norm's scale is a positive number per
  position, so adding a direction `d` moves the logits by a positive multiple of `W (g * d)`
  (`d` centred first under a LayerNorm): its largest entries are the tokens `d` promotes, its
  smallest the ones it suppresses. Logit scales (Granite, Cohere) and Gemma's soft-capping are
  monotone, so they leave the ranking alone.
- **The prompts that carry it** (`loads`): each prompt's residual at a block, projected on the
  direction.
- **Where it lives** (`writes`): what each writer adds along the direction at each prompt's
  last token, the part an edit removes from it: attention (split per head: the output
  projection is a sum over the heads' column blocks) and the dense MLP, computed from their
  inputs as llama.cpp hands them over and the dequantized weights, through the post-norm where
  the registry lists one; the rest of the block's write (experts, SSM and convolution layers,
  scales) is the residual's change over the block less those two.
- **How sure it is** (`measure.split_half`): the direction measured from alternate prompts of each
  set, the cosine per block; and at the block read, that cosine as the prompts grow
  (`growth`), which says how many prompts the direction needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from gguf_abliterate import names
from gguf_abliterate.arch import ATTN, MLP, Arch, Writer, get_arch
from gguf_abliterate.direction.measure import ProgressBars, cosines, difference_of_means, split_half
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.first_token import refusal_token_ids
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import dequantize
from gguf_abliterate.runtime.llama import AtAnswer, LlamaModel, Prompt

TOP_TOKENS = 12  # tokens shown on each side of a lens
HEAD_ROWS = 16384  # output-head rows dequantized at a time (a 150k vocabulary is 1 GB in float32)
WRITERS = ("attn", "mlp", "rest")  # what `writes` splits a block's write into


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logit: float  # W (g * d) for this token: how much adding the unit direction moves its logit


@dataclass(frozen=True)
class Lens:
    """The tokens a direction promotes (highest first) and suppresses (lowest first), and where
    the tokens asked about rank (1: promoted most) among all `vocabulary`."""

    promoted: list[Token]
    suppressed: list[Token]
    asked: list[tuple[Token, int]] = field(default_factory=list)
    vocabulary: int = 0


def head_tensor(meta: Model) -> str:
    """The output head's tensor (the token embedding where the head is tied to it)."""
    for name in (names.OUTPUT, names.TOKEN_EMBD):
        if name in meta.tensors:
            return name
    raise UserError(f"{meta.path.name} has no output head ({names.OUTPUT} or {names.TOKEN_EMBD}), so a direction "
                    f"cannot be read as words")


def head_norm(meta: Model) -> tuple[np.ndarray, bool]:
    """The final norm's weight and whether it centres (LayerNorm)."""
    arch = _arch(meta)
    name = names.model_tensor(arch.head_norm)
    if name not in meta.tensors:
        raise UserError(f"{meta.path.name} has no final norm ({name}), so a direction cannot be read as words")
    return meta.values(name).astype(np.float64), arch.head_norm_centres


def lens_vector(meta: Model, direction: np.ndarray) -> np.ndarray:
    """`g * d` (d centred under a LayerNorm): what the output head turns into the direction's logits."""
    g, centres = head_norm(meta)
    d = np.asarray(direction, np.float64)
    if d.shape != g.shape:
        raise UserError(f"direction has length {d.shape[-1]}, but the model's final norm has {g.shape[-1]}")
    return g * (d - d.mean() if centres else d)


def head_logits(meta: Model, vectors: np.ndarray, progress: Callable[[int], None] = lambda n: None) -> np.ndarray:
    """`W v` for each row v of `vectors` (k, n_embd): (k, n_vocab), the head read in slices of
    rows so memory stays bounded."""
    name = head_tensor(meta)
    kind, rows = meta.tensors[name].tensor_type, meta.n_rows(name)
    v = np.atleast_2d(vectors).astype(np.float32)
    out = np.empty((v.shape[0], rows), np.float64)
    for first in range(0, rows, HEAD_ROWS):
        count = min(HEAD_ROWS, rows - first)
        w = dequantize(meta.read_rows(name, first, count), kind).reshape(count, -1)
        out[:, first:first + count] = v @ w.T
        progress(count)
    return out


def lens(logits: np.ndarray, piece: Callable[[int], str], top: int, asked: Sequence[int] = ()) -> Lens:
    """The `top` most promoted and most suppressed tokens of one row of `head_logits`, and the
    rank of each token in `asked`."""
    order = np.argsort(logits, kind="stable")

    def token(t: int) -> Token:
        return Token(int(t), piece(int(t)), float(logits[t]))

    return Lens([token(t) for t in order[::-1][:top]], [token(t) for t in order[:top]],
                [(token(t), int((logits > logits[t]).sum()) + 1) for t in asked], len(logits))


def growth(positive: np.ndarray, negative: np.ndarray, block: int) -> list[tuple[int, float]]:
    """How the split-half cosine at `block` grows with the prompts: (prompts a half-set holds,
    cosine) for 2, 4, 8, ... of each set's even and odd prompts, ending with every pair. Where
    it has flattened near 1, more prompts would not have changed the direction."""
    half = min(len(positive), len(negative)) // 2  # split_half refuses fewer than two prompts a set
    counts = sorted({*(2 ** k for k in range(1, half.bit_length()) if 2 ** k < half), half})
    pos, neg = positive[:, block:block + 1], negative[:, block:block + 1]
    return [(n, float(split_half(pos[:2 * n], neg[:2 * n])[0])) for n in counts]


def loads(residuals: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Each prompt's residual (n_prompts, n_embd) projected on the unit direction."""
    return residuals.astype(np.float64) @ direction


@dataclass
class Writes:
    """What each writer adds along its block's direction at each prompt's last token:
    `by[kind]` (n_prompts, n_layer) for kind in WRITERS (NaN where not measured: `rest` of
    block 0, a writer the block lacks), `heads` (n_prompts, n_layer, n_head) or None."""

    by: dict[str, np.ndarray]
    heads: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def shares(self) -> dict[str, np.ndarray]:
        """Per writer, (n_layer,): the mean size of its write along the direction over the
        prompts, as a share of all writers' in all blocks (what an edit would mostly change)."""
        size = {k: _mean_size(v) for k, v in self.by.items()}
        total = sum(float(np.nansum(s)) for s in size.values()) or 1.0
        return {k: s / total for k, s in size.items()}

    def head_shares(self) -> np.ndarray | None:
        """(n_layer, n_head): each head's mean write size, as a share of all writers' (as `shares`)."""
        if self.heads is None:
            return None
        total = sum(float(np.nansum(_mean_size(v))) for v in self.by.values()) or 1.0
        return _mean_size(self.heads) / total


def _mean_size(values: np.ndarray) -> np.ndarray:
    """Mean absolute value over the first axis, NaN where nothing was measured."""
    ok = np.isfinite(values)
    count = ok.sum(axis=0)
    return np.where(count > 0, np.abs(np.where(ok, values, 0)).sum(axis=0) / np.maximum(count, 1), np.nan)


def writes(meta: Model, residuals: np.ndarray, inputs: Callable[[str, int], np.ndarray | None],
           direction_of: Callable[[int], np.ndarray]) -> Writes:
    """Split each block's write along `direction_of(block)` (unit) into its writers' (see the
    module docstring): `residuals` (n_prompts, n_layer, n_embd) at the last token, and the
    writers' inputs there (`inputs(kind, block)`, as `LastInputs.get`)."""
    arch = _arch(meta)
    n, n_layer = residuals.shape[:2]
    by = {k: np.full((n, n_layer), np.nan) for k in WRITERS}
    heads: np.ndarray | None = None
    notes: list[str] = []
    scale = float(meta.arch_get(names.RESIDUAL_SCALE) or 1.0)
    eps = float(meta.arch_get(names.RMS_EPS) or 1e-6)
    for block in range(n_layer):
        r = np.asarray(direction_of(block), np.float64)
        for kind, writer, tensor in (("attn", ATTN, names.block_tensor(ATTN.tensor, block)),
                                     ("mlp", MLP[0], names.block_tensor(MLP[0].tensor, block))):
            x = inputs(kind, block)
            if x is None or tensor not in meta.tensors or x.shape[0] != n:
                continue
            w = meta.values(tensor).astype(np.float64)  # (n_embd, n_in)
            if w.shape != (r.shape[0], x.shape[1]):
                continue
            norms = _writer_norms(arch, writer, block, meta)
            if norms is None:
                notes.append(f"block {block}: {kind} writes through more than one norm; counted in the rest")
                continue
            bias_name = names.block_tensor(writer.tensor, block, "bias")
            bias = meta.values(bias_name).astype(np.float64) if bias_name in meta.tensors else np.zeros(w.shape[0])
            c, per_token = r, np.ones(n)
            if norms.size:  # x + RMSNorm(y) * g: along r that is ((g r) . y) / rms(y), y the writer's output
                y = scale * (x.astype(np.float64) @ w.T + bias)
                c = norms * r
                per_token = 1 / np.sqrt(np.mean(y * y, axis=1) + eps)
            along = (w.T @ c) * scale  # (n_in,): the write along r per unit of each input
            by[kind][:, block] = (x.astype(np.float64) @ along + scale * (bias @ c)) * per_token
            if kind == "attn":
                n_head = _heads(meta, block, x.shape[1])
                if heads is None:
                    heads = np.full((n, n_layer, n_head), np.nan)
                if heads.shape[2] == n_head:
                    parts = x.reshape(n, n_head, -1) * along.reshape(n_head, -1)
                    heads[:, block] = parts.sum(axis=2) * per_token[:, None]
        if block:
            change = (residuals[:, block].astype(np.float64) - residuals[:, block - 1]) @ r
            by["rest"][:, block] = change - np.nan_to_num(by["attn"][:, block]) - np.nan_to_num(by["mlp"][:, block])
    return Writes(by, heads, notes)


def _arch(meta: Model) -> Arch:
    return get_arch(meta.arch)


def _writer_norms(arch: Arch, writer: Writer, block: int, meta: Model) -> np.ndarray | None:
    """The one post-norm's weight between a writer and the residual add (empty if none), or
    None where there are several (their product is not a per-writer scale)."""
    own = next((w for w in arch.writers if w.tensor == writer.tensor), None)  # the family's entry holds its norms
    chain = arch.norm_chain(block, own, meta.tensors) if own else ()
    if len(chain) > 1:
        return None
    return meta.values(chain[0]).astype(np.float64) if chain else np.zeros(0)


def _heads(meta: Model, block: int, width: int) -> int:
    """Attention heads in a block (the key may hold one count per block), or 1 if the output
    projection's input does not split into them evenly."""
    value = meta.arch_get(names.HEAD_COUNT)
    count = int(value[block]) if isinstance(value, Sequence) and not isinstance(value, str) else int(value or 1)
    return count if count > 0 and width % count == 0 else 1


@dataclass(frozen=True)
class Loaded:
    """A prompt and its residual's projection on the direction at the explained block."""

    text: str
    group: str  # "positive", "negative" or "yours"
    load: float


@dataclass
class Explanation:
    """Everything `explain` reads off a direction and a model."""

    behaviour: str
    blocks: list[int]  # the blocks read through the head; the prompts are read at the first
    lenses: dict[int, Lens]
    split_half: np.ndarray  # (n_layer,)
    growth: list[tuple[int, float]]  # the split-half cosine at blocks[0] as the prompts grow (`growth`)
    agreement: np.ndarray  # (n_layer,): the direction measured again here vs the file's, per block
    neighbours: np.ndarray  # (n_layer, n_layer): cosine between blocks' directions
    prompts: list[Loaded]  # the pack's direction prompts, highest load first
    yours: list[Loaded]  # the user's prompts, likewise
    writes: Writes  # on the positive prompts
    positive_mean: float
    negative_mean: float

    def share(self, load: float) -> float:
        """A load as a share of the way from the negative prompts' mean (0) to the positive's (1)."""
        return (load - self.negative_mean) / (self.positive_mean - self.negative_mean)


@dataclass
class Captured:
    """What the model showed of the prompts: residuals (n_prompts, n_layer, n_embd) at the last
    token of the pack's positive and negative prompts and of the user's, and the writers'
    inputs there on the positive ones (as `LastInputs.get`)."""

    positive: list[str]
    negative: list[str]
    pos: np.ndarray
    neg: np.ndarray
    inputs: Callable[[str, int], np.ndarray | None]
    yours: list[str] = field(default_factory=list)
    own: np.ndarray | None = None


def capture(model: LlamaModel, positive: Sequence[Prompt], negative: Sequence[Prompt],
            yours: Sequence[tuple[str, Prompt]], bars: ProgressBars) -> Captured:
    """One pass over the prompts (as `Prompt`s at the position the direction was read)."""
    with bars(total=len(positive) + len(negative) + len(yours), desc="residuals", unit="prompt") as bar:
        with model.last_inputs() as inputs:  # batched as `direction` batches them, for the same numbers
            pos = model.residuals(positive, bar.update, share_prefix=True)
        neg = model.residuals(negative, bar.update, share_prefix=True)
        own = model.residuals([p for _, p in yours], bar.update, share_prefix=True) if yours else None
    return Captured([_text(p) for p in positive], [_text(p) for p in negative], pos, neg, inputs.get,
                    [t for t, _ in yours], own)


def explain(meta: Model, piece: Callable[[int], str], direction: Direction, blocks: list[int], seen: Captured,
            top: int, bars: ProgressBars, behaviour: str, asked: Sequence[int] = ()) -> Explanation:
    """Read `direction` (see the module docstring): through the head at `blocks` (`piece` spells
    a token; the tokens `asked` are ranked), on what the model showed of the prompts; the
    prompts are read at `blocks[0]`."""
    vectors = np.stack([lens_vector(meta, block_vector(direction, b)) for b in blocks])
    with bars(total=meta.n_rows(head_tensor(meta)), desc="output head", unit="row", unit_scale=True) as bar:
        logits = head_logits(meta, vectors, bar.update)
    lenses = {b: lens(row, piece, top, asked) for b, row in zip(blocks, logits)}
    pos, neg = seen.pos, seen.neg
    measured = difference_of_means(pos, neg).directions
    stored = direction.per_block if direction.per_block is not None else np.stack(
        [direction.for_block(b) for b in range(measured.shape[0])])
    at = blocks[0]
    d = block_vector(direction, at)
    texts = [(t, "positive") for t in seen.positive] + [(t, "negative") for t in seen.negative]
    load = loads(np.concatenate([pos[:, at], neg[:, at]]), d)
    prompts = sorted((Loaded(t, g, float(v)) for (t, g), v in zip(texts, load)), key=lambda x: -x.load)
    mine = [] if seen.own is None else sorted(
        (Loaded(t, "yours", float(v)) for t, v in zip(seen.yours, loads(seen.own[:, at], d))), key=lambda x: -x.load)
    dirs = direction.per_block if direction.per_block is not None else measured
    unit = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)
    return Explanation(behaviour, blocks, lenses, split_half(pos, neg), growth(pos, neg, at), cosines(measured, stored),
                       unit @ unit.T,
                       prompts, mine, writes(meta, pos, seen.inputs, direction.for_block),
                       float(loads(pos[:, at], d).mean()), float(loads(neg[:, at], d).mean()))


def asked_tokens(model: LlamaModel, texts: Sequence[str], behaviour: str) -> list[int]:
    """The first token of each text asked about; for refusal, first the openings its layer
    test scores (`refusal_token_ids`)."""
    ids = refusal_token_ids(model) if behaviour == "refusal" else []
    for text in texts:
        tokens = model.tokenize(text, bos=False)
        if not tokens:
            raise UserError(f"--token {text!r} is no token at all")
        ids.append(tokens[0])
    return list(dict.fromkeys(ids))


def block_vector(direction: Direction, block: int) -> np.ndarray:
    """The direction at a block: what the edit uses there for a file with one per block, else
    the block's measured direction where the file keeps them, else its one vector."""
    if direction.per_layer or direction.per_block is None:
        return direction.for_block(block)
    v = direction.per_block[block].astype(np.float64)
    return v / np.linalg.norm(v)


def _text(prompt: object) -> str:
    return prompt.prompt if isinstance(prompt, AtAnswer) else str(prompt)
