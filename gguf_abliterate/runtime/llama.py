"""Run a GGUF model in llama.cpp (llama-cpp-python's low-level API) and look inside it.

- `residuals`: the residual stream after every block (llama.cpp's `l_out-L`, or what the
  architecture's registry entry names it) at the last
  prompt token, all layers in one forward pass, several prompts per decode.
- `next_token_logprobs`: the next-token distribution after each prompt, optionally with a
  direction projected out of the residual stream after every block (directional ablation,
  applied inside the graph through the same hook), which is what an edit approximates.

The high-level `Llama` class does not pass `cb_eval`, so a context is made here with the
callback set. Prompts are rendered with the model's own chat template (jinja2, as
llama-cpp-python does) unless asked for raw text.
"""

from __future__ import annotations

import ctypes
import os
import sys
import tempfile
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np

from gguf_abliterate import names
from gguf_abliterate.arch import ARCHITECTURES
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io.adapters import write_lora_adapter
from gguf_abliterate.portable import available_cores
from gguf_abliterate.runtime.library import Ggml, load_llama_cpp
from gguf_abliterate.runtime.thinking import THINKING_BATCH, Render, Thinking, detect, resolve, split


@dataclass(frozen=True)
class Answer:
    """One greedy answer: its text, its tokens, and whether it ended (end-of-generation token)
    within the budget; for a model that thinks, the thought and the final answer apart."""

    text: str
    tokens: list[int]
    finished: bool
    thought: str | None = None  # None: no thought
    final: str | None = ""  # the final answer; None: it never arrived (the budget ran out inside the thought)
    thought_tokens: int = 0
    # a model that thinks: what it wrote before its final answer (thought, markers, spacing;
    # special tokens written out), "" if the answer began at once; None: no final answer
    opening: str | None = None

    @property
    def reply(self) -> str:
        """What a measure reads: the final answer (empty if it never arrived)."""
        return self.final or ""


@dataclass(frozen=True)
class AtAnswer:
    """A prompt carried to where its final answer opens: past a closed empty thought, or past
    `thought` (the model's own, teacher-forced), or past `written`, the model's own text before
    its answer exactly as it wrote it (an `Answer.opening`). For a model that does not think,
    the prompt."""

    prompt: str
    thought: str | None = None
    written: str | None = None


Prompt = str | AtAnswer


# what llama.cpp calls the input of a dense block's MLP down projection (the gated activation)
MLP_INPUT_NAMES = ("ffn_swiglu-", "ffn_geglu-")
# ... and of the attention output projection (every head's output, before wo)
ATTN_INPUT_NAMES = ("kqv_out-",)


class MlpInputs:
    """Per block, the sum and count of the MLP down projection's input vectors."""

    prefixes = MLP_INPUT_NAMES
    weighted = True  # rows of a shared prompt prefix count once per prompt that shares it

    def __init__(self, n_layer: int):
        self.sums: dict[int, np.ndarray] = {}
        self.counts = np.zeros(n_layer, np.int64)

    def add(self, name: str, rows: np.ndarray, weight: int = 1) -> None:
        block = int(name.rpartition("-")[2])
        self.sums[block] = self.sums.get(block, 0) + weight * rows.sum(axis=0, dtype=np.float64)
        self.counts[block] += weight * rows.shape[0]

    def means(self) -> np.ndarray | None:
        """(n_layer, n_ff) means, or None unless every block has a dense MLP llama.cpp names so
        (mixture-of-experts blocks do not)."""
        if not self.sums or (self.counts == 0).any() or len({v.shape for v in self.sums.values()}) != 1:
            return None
        return np.stack([self.sums[b] / self.counts[b] for b in range(len(self.counts))]).astype(np.float32)


def writer_key(name: str) -> tuple[str, int]:
    """`kqv_out-7` -> ("attn", 7), `ffn_swiglu-7` -> ("mlp", 7)."""
    prefix, _, block = name.rpartition("-")
    return ("attn" if prefix + "-" in ATTN_INPUT_NAMES else "mlp", int(block))


class WriterInputs:
    """Per block, up to `limit` input rows (tokens) of the attention output projection
    (`attn`) and of the dense MLP's down projection (`mlp`): what a writer's output error is
    measured on. Rows past the limit are dropped, so memory stays bounded."""

    prefixes = ATTN_INPUT_NAMES + MLP_INPUT_NAMES

    def __init__(self, limit: int):
        self.limit = limit
        self.rows: dict[tuple[str, int], list[np.ndarray]] = {}

    def add(self, name: str, rows: np.ndarray) -> None:
        have = self.rows.setdefault(writer_key(name), [])
        room = self.limit - sum(len(r) for r in have)
        if room > 0:
            have.append(rows[:room].copy())

    def get(self, kind: str, block: int) -> np.ndarray | None:
        """(tokens, n_in) float32, or None if llama.cpp never showed that input."""
        have = self.rows.get((kind, block))
        return np.concatenate(have) if have else None


class LastInputs(WriterInputs):
    """`WriterInputs` at each prompt's last token only, every prompt kept, in prompt order: what
    splits a block's write into its writers' (`explain`)."""

    last_token = True  # the model hands it the rows of each prompt's last token only

    def __init__(self) -> None:
        super().__init__(limit=sys.maxsize)


class InputMoments:
    """Per block and writer (`attn`, `mlp` as in `WriterInputs`), the diagonal blocks of the
    inputs' second moments E[x x^T] over every token seen, in column blocks of
    `rounding.column_block(n_in)`: what compensated rounding weighs errors by. Memory is
    n_in * B floats per writer, never n_in^2."""

    prefixes = WriterInputs.prefixes
    weighted = True  # rows of a shared prompt prefix count once per prompt that shares it

    def __init__(self, block: Callable[[int], int]):
        self._block = block
        self.sums: dict[tuple[str, int], np.ndarray] = {}
        self.counts: dict[tuple[str, int], int] = {}

    def add(self, name: str, rows: np.ndarray, weight: int = 1) -> None:
        key = writer_key(name)
        width = self._block(rows.shape[1])
        if not width or not rows.shape[0]:  # the last block of a decode that reads no logits has no rows
            return
        x = rows.reshape(rows.shape[0], -1, width).transpose(1, 0, 2)  # (blocks, tokens, width)
        moments = np.matmul(x.transpose(0, 2, 1), x)  # batched BLAS, not einsum
        self.sums[key] = self.sums.get(key, 0) + (moments if weight == 1 else np.float32(weight) * moments)
        self.counts[key] = self.counts.get(key, 0) + weight * rows.shape[0]

    def get(self, kind: str, block: int) -> np.ndarray | None:
        """(n_in / B, B, B) float32, or None if llama.cpp never showed that input."""
        key = (kind, block)
        return self.sums[key] / np.float32(self.counts[key]) if key in self.sums else None

    def means(self) -> dict[tuple[str, int], np.ndarray]:
        """Every input seen: (kind, block) -> its moments as `get` gives them."""
        return {key: self.sums[key] / np.float32(self.counts[key]) for key in self.sums}

    @property
    def tokens(self) -> int:
        """Tokens seen (the last block may see fewer: llama.cpp computes only output rows there)."""
        return max(self.counts.values(), default=0)


class SpanMeans:
    """Per prompt and block, the mean over the tokens of one span (an answer) of the residual
    stream after the block and of the attention output projection's input (every head's output,
    `kqv_out`). llama.cpp computes the last block's residual only at the tokens whose logits are
    read, so there the mean is that of the span's last token."""

    def __init__(self, residual: str, n_prompts: int, n_layer: int):
        self.prefixes = (residual, *ATTN_INPUT_NAMES)
        self._residual = residual
        self.residual: list[dict[int, np.ndarray]] = [{} for _ in range(n_prompts)]
        self.attention: list[dict[int, np.ndarray]] = [{} for _ in range(n_prompts)]
        self.spans: list[tuple[int, int, int]] = []  # (prompt, first row, end row) in the decode now running

    def add(self, name: str, rows: np.ndarray) -> None:
        block = int(name.rpartition("-")[2])
        into = self.residual if name.startswith(self._residual) else self.attention
        whole = rows.shape[0] >= self.spans[-1][2]
        for j, (i, start, stop) in enumerate(self.spans):
            into[i][block] = rows[start:stop].mean(axis=0) if whole else rows[j].copy()

    def stacked(self, which: list[dict[int, np.ndarray]]) -> np.ndarray:
        """(n_prompts, n_layer, width) float32."""
        return np.stack([np.stack([d[b] for b in sorted(d)]) for d in which]).astype(np.float32)


class LlamaModel:
    """A GGUF model loaded in llama.cpp for batched forward passes with a residual-stream hook."""

    decoded: ClassVar[int] = 0  # tokens every model of the process has decoded (runtime.stages)

    def __init__(self, path: str | os.PathLike[str], n_batch: int = 2048, n_seq: int = 16,
                 n_threads: int | None = None, chat: bool = True, thinking: Thinking = Thinking(),
                 room_for_thoughts: bool = False):
        """`room_for_thoughts`: where a caller generates thoughts, a model that thinks gets
        THINKING_BATCH times the context, so a decode still holds many answers of hundreds of
        tokens (a model that does not think is loaded as asked)."""
        self.ll = ll = load_llama_cpp()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file")
        self.ggml = Ggml(ll)
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self.model:
            raise UserError(f"{self.path}: llama.cpp could not load this model")
        self.vocab = ll.llama_model_get_vocab(self.model)
        self.n_embd = ll.llama_model_n_embd(self.model)
        self.n_layer = ll.llama_model_n_layer(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self.arch = _meta(ll, self.model, names.ARCHITECTURE)
        known = ARCHITECTURES.get(self.arch)
        self._residual = (known.residual if known else "l_out") + "-"  # the block-output tensor's name
        # A recurrent or hybrid model (Mamba, DeltaNet, short-conv layers) has llama.cpp split
        # each decode into one micro-batch per sequence, and the hook then sees the micro-batches
        # one by one, not the rows of the whole batch: decode one prompt at a time there.
        if ll.llama_model_is_recurrent(self.model) or ll.llama_model_is_hybrid(self.model):
            n_seq = 1
        try:
            raw = _meta_template(ll, self.model) if chat else None
            self.reasoning = resolve(detect(raw), thinking)
        except UserError:
            ll.llama_model_free(self.model)
            raise
        if room_for_thoughts and self.reasoning.thinks:
            n_batch *= THINKING_BATCH
        self.n_batch, self.n_seq = n_batch, n_seq
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq + 1  # sequence 0 holds a shared prompt prefix
        cparams.kv_unified = True  # sequences share the cache instead of n_ctx/n_seq slots each
        threads = n_threads or available_cores()
        cparams.n_threads = cparams.n_threads_batch = threads
        self._cb = ll.ggml_backend_sched_eval_callback(self._on_tensor)
        cparams.cb_eval = self._cb
        cparams.cb_eval_user_data = None
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            ll.llama_model_free(self.model)
            raise UserError(f"{self.path}: llama.cpp could not create a context")
        try:
            self.template = None if raw is None else _chat_template(ll, self.vocab, raw, self.path, self.reasoning)
        except UserError:
            self.close()
            raise
        # hook state, set around each decode
        self._capture: dict[int, np.ndarray] | None = None
        self._rows: np.ndarray = np.zeros(0, np.int64)
        self._ablate: np.ndarray | None = None
        self._inputs: list[MlpInputs | WriterInputs | InputMoments] = []  # listeners for writer inputs
        self._project: dict[str, tuple[np.ndarray, float]] = {}  # set_projections
        self._projected: set[str] = set()  # the nodes projected in the current decode
        self._weight = 1  # how many prompts the rows now decoding stand for (a shared prefix: all of them)
        # numpy's BLAS runs single-threaded inside a decode: its idle threads spin on the cores
        # llama.cpp's threads compute on (the writer statistics' capture took 1.9x a plain pass
        # with them, 1.3x without)
        from threadpoolctl import ThreadpoolController  # with llama-cpp-python, in the llama extra

        self._blas = ThreadpoolController()
        self.forwarded = 0  # tokens decoded so far: what a stage of a job cost (runtime.stages)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.ll.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.ll.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def set_lora(self, path: Path | None, scale: float = 1.0) -> None:
        """Apply a LoRA adapter GGUF to this context (None removes it); the adapter applied
        before is freed."""
        ll = self.ll
        previous, self._adapter = getattr(self, "_adapter", None), None
        if path is None:
            ll.llama_set_adapters_lora(self.ctx, None, 0, None)
        else:
            adapter = ll.llama_adapter_lora_init(self.model, str(path).encode())
            if not adapter:
                raise UserError(f"{path}: llama.cpp could not load this adapter")
            self._adapter = adapter
            arr = (ll.llama_adapter_lora_p_ctypes * 1)(adapter)
            scales = (ctypes.c_float * 1)(scale)
            if ll.llama_set_adapters_lora(self.ctx, arr, 1, scales) != 0:
                raise UserError(f"{path}: llama.cpp refused the adapter")
        if previous is not None:
            ll.llama_adapter_lora_free(previous)

    def set_adapter(self, pieces: dict[str, tuple[np.ndarray, np.ndarray]] | None) -> None:
        """Apply `W + B A` to each named weight (A (rank, n_in), B (n_out, rank)) inside
        llama.cpp, without touching the weights; None or {} removes it."""
        if not pieces:
            self.set_lora(None)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "trial.gguf"
            write_lora_adapter(path, self.arch, pieces)
            self.set_lora(path)  # llama.cpp copies the tensors: the file can go

    def set_projections(self, projections: Mapping[str, tuple[np.ndarray, float]] | None) -> None:
        """From now on, project each named graph node's rows `x - s (x.u) u` as soon as llama.cpp
        has computed it ({node-L: (unit u, s)}; None or {} stops). A decode that does not meet
        every named node is an error: the graph is not the one the names were read from."""
        self._project = {k: (np.asarray(u, np.float32), float(s)) for k, (u, s) in (projections or {}).items()}

    def set_control_vector(self, vectors: dict[int, np.ndarray] | None) -> None:
        """Add vectors[L] to the output of block L (llama.cpp's control-vector adapter); None clears."""
        ll = self.ll
        if not vectors:
            ll.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, -1, -1)
            return
        data = np.zeros((self.n_layer - 1, self.n_embd), np.float32)  # row 0 is block 1
        for block, v in vectors.items():
            data[block - 1] = v
        rc = ll.llama_set_adapter_cvec(self.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size,
                                       self.n_embd, min(vectors), max(vectors))
        if rc != 0:
            raise UserError("llama.cpp refused the control vector")

    # -- prompts ------------------------------------------------------------------------------

    @property
    def thinks(self) -> bool:
        """Whether the model thinks before it answers, as rendered here."""
        return self.reasoning.thinks

    def render(self, prompt: Prompt) -> str:
        """The prompt as the model sees a user turn, generation prompt included (for `AtAnswer`,
        carried on to where the final answer opens)."""
        if isinstance(prompt, AtAnswer):
            rendered = self.render(prompt.prompt)
            if prompt.written is not None:
                return rendered + prompt.written
            if prompt.thought is None:
                return self.reasoning.opening(rendered)
            return self.reasoning.after_thought(rendered, prompt.thought)
        return prompt if self.template is None else self.template(prompt)

    def at_answer(self, prompts: Sequence[str]) -> list[Prompt]:
        """Prompts as every first-token measure must read them: where the final answer opens
        (a model that does not think reads them as they are)."""
        return [AtAnswer(p) for p in prompts] if self.thinks else list(prompts)

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        ll = self.ll
        raw = text.encode()
        add_bos = bos and ll.llama_vocab_get_add_bos(self.vocab) and not text.startswith(self._bos_text())
        buf = (ll.llama_token * (len(raw) + 8))()
        n = ll.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_bos, True)
        if n < 0:  # the buffer was too small: -n is the count needed (a vocabulary without byte merges)
            buf = (ll.llama_token * -n)()
            n = ll.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_bos, True)
        if n < 0:
            raise UserError("prompt could not be tokenized")
        return list(buf[:n])

    def text(self, tokens: Sequence[int]) -> str:
        """Generated tokens as text (pieces joined as bytes: one character may span tokens)."""
        return _detokenize(self.ll, self.vocab, list(tokens))

    def piece(self, token: int) -> str:
        """A token's text as the model writes it (control tokens spelt out)."""
        return _piece(self.ll, self.vocab, token)

    def _bos_text(self) -> str:
        return _piece(self.ll, self.vocab, self.ll.llama_vocab_bos(self.vocab)) or "\0"

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Rendered and tokenized prompts; refuses ones that do not fit a batch."""
        out = []
        for p in prompts:
            toks = self.tokenize(self.render(p))
            if len(toks) > self.n_batch:
                raise UserError(f"a prompt is {len(toks)} tokens long, more than the context of {self.n_batch}")
            out.append(toks)
        return out

    # -- forward passes -----------------------------------------------------------------------

    def _batches(self, encoded: list[list[int]], prefix: int = 0, reserve: int = 0) -> Iterator[list[int]]:
        """Indices of prompts that go into one decode: at most n_seq prompts, and what they add
        to the cache (beyond a shared `prefix`, plus `reserve` tokens each) within n_batch."""
        batch: list[int] = []
        used = prefix
        for i, toks in enumerate(encoded):
            size = len(toks) - prefix + reserve
            if batch and (len(batch) == self.n_seq or used + size > self.n_batch):
                yield batch
                batch, used = [], prefix
            batch.append(i)
            used += size
        if batch:
            yield batch

    def _decode(self, seqs: list[list[int]], prefix: int = 0,
                reads: list[Collection[int]] | None = None) -> np.ndarray:
        """Decode several prompts as separate sequences; batch index of each last token (of the
        tokens at positions `reads[i]` of prompt i, in order, if given).

        With `prefix` > 0, the first `prefix` tokens of every prompt are the same and already in
        the cache as sequence 0 (`_decode_prefix`): each prompt's sequence starts as a copy of
        it, and only the rest is computed.
        """
        ll = self.ll
        mem = ll.llama_get_memory(self.ctx)
        if prefix:
            for seq_id in range(1, self.n_seq + 1):
                ll.llama_memory_seq_rm(mem, seq_id, -1, -1)
            for seq_id in range(1, len(seqs) + 1):
                ll.llama_memory_seq_cp(mem, 0, seq_id, -1, -1)
        else:
            ll.llama_memory_clear(mem, True)
        first = 1 if prefix else 0
        reads = reads or [(len(toks) - 1,) for toks in seqs]
        return self._step([(first + i, toks[prefix:], prefix, {r - prefix for r in read})
                           for i, (toks, read) in enumerate(zip(seqs, reads))])

    def _decode_prefix(self, tokens: list[int]) -> None:
        """Put `tokens` in the cache as sequence 0, for `_decode(..., prefix=len(tokens))`."""
        self.ll.llama_memory_clear(self.ll.llama_get_memory(self.ctx), True)
        self._step([(0, tokens, 0, set())])

    def _step(self, parts: list[tuple[int, list[int], int, Collection[int]]]) -> np.ndarray:
        """One llama_decode of (sequence, tokens, first position, reads) parts: the batch index
        of each part's tokens at the offsets `reads` (their logits rows), in order. llama.cpp
        keeps a vocabulary-wide row for each token read, so read only what is used."""
        ll = self.ll
        total = sum(len(toks) for _, toks, _, _ in parts)
        batch = ll.llama_batch_init(total, 0, 1)
        try:
            rows = []
            k = 0
            for seq_id, toks, start, read in parts:
                for j, tok in enumerate(toks):
                    batch.token[k] = tok
                    batch.pos[k] = start + j
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = seq_id
                    batch.logits[k] = j in read
                    if batch.logits[k]:
                        rows.append(k)
                    k += 1
            batch.n_tokens = total
            self.forwarded += total
            LlamaModel.decoded += total
            self._rows = np.array(rows, np.int64)
            self._projected.clear()
            with self._blas.limit(limits=1, user_api="blas"):  # numpy inside the callback: see __init__
                rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise UserError(f"llama.cpp failed to decode a batch (code {rc})")
            missing = self._project.keys() - self._projected
            if missing:
                raise UserError(f"{self.arch}: llama.cpp's graph has no node {min(missing)} to project "
                                f"(the registry's node names do not match this llama.cpp)")
            return self._rows
        finally:
            ll.llama_batch_free(batch)

    def _logprobs(self, row: int) -> np.ndarray:
        ptr = self.ll.llama_get_logits_ith(self.ctx, int(row))
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        return logits - np.logaddexp.reduce(logits)

    @contextmanager
    def mlp_inputs(self) -> Iterator[MlpInputs]:
        """Within the block, every pass also sums each block's MLP down-projection input
        (llama.cpp's `ffn_swiglu-L` / `ffn_geglu-L`) over all tokens."""
        with self._listening(MlpInputs(self.n_layer)) as mlp:
            yield mlp

    @contextmanager
    def writer_inputs(self, limit: int) -> Iterator[WriterInputs]:
        """Within the block, every pass also keeps up to `limit` tokens' inputs of each block's
        attention output and MLP down projections."""
        with self._listening(WriterInputs(limit)) as inputs:
            yield inputs

    @contextmanager
    def last_inputs(self) -> Iterator[LastInputs]:
        """Within the block, every pass also keeps each block's writer inputs at each prompt's
        last token."""
        with self._listening(LastInputs()) as inputs:
            yield inputs

    @contextmanager
    def input_moments(self, block: Callable[[int], int]) -> Iterator[InputMoments]:
        """Within the block, every pass also sums each writer input's second moments in
        diagonal blocks of width block(n_in)."""
        with self._listening(InputMoments(block)) as moments:
            yield moments

    @contextmanager
    def _listening(self, listener: Any) -> Iterator[Any]:
        """Listeners nest: each sees every input it names, read from llama.cpp once."""
        self._inputs.append(listener)
        try:
            yield listener
        finally:
            self._inputs.remove(listener)

    def _on_tensor(self, t: int, ask: bool, user_data: Any) -> bool:
        name = self.ggml.name(t)
        if name in self._project:
            if not ask:
                self._project_rows(t, self.ggml.width(t), *self._project[name])
                self._projected.add(name)
            return True
        listeners = [x for x in self._inputs if name.startswith(x.prefixes)]
        if listeners:
            if not ask:
                rows = self.ggml.read(t, self.ggml.width(t))
                last = None
                for listener in listeners:
                    if self._weight != 1:  # a shared prefix, in place of the prompts that share it
                        if getattr(listener, "weighted", False):
                            listener.add(name, rows, self._weight)
                    elif getattr(listener, "last_token", False):
                        if last is None:  # the last block's MLP sees only the output rows already; others, every token
                            last = rows if rows.shape[0] == len(self._rows) else rows[self._rows]
                        listener.add(name, last)
                    else:
                        listener.add(name, rows)
            return True
        if not name.startswith(self._residual):
            return not ask  # ask: we do not need it; otherwise: go on computing
        if ask:
            return self._capture is not None or self._ablate is not None
        if self._ablate is not None:
            x = self._project_rows(t, self.n_embd, self._ablate)
        else:
            x = self.ggml.read(t, self.n_embd)
        if self._capture is not None:
            # what flows on (after any ablation); the last block keeps only the output rows
            self._capture[int(name[len(self._residual):])] = x.copy() if x.shape[0] == len(self._rows) else x[self._rows]
        return True

    def _project_rows(self, t: int, width: int, u: np.ndarray, strength: float = 1.0) -> np.ndarray:
        """Project a computed node's rows in place, `x - s (x.u) u`, so what flows on is
        projected; returns the rows written."""
        x = self.ggml.read(t, width)
        x -= strength * np.outer(x @ u, u)
        self.ggml.write(t, x)
        return x

    def residuals(self, prompts: Sequence[Prompt], progress: Callable[[int], None] = lambda n: None,
                  share_prefix: bool = False) -> np.ndarray:
        """(n_prompts, n_layer, n_embd): l_out-L at each prompt's last token, for every L.

        With `share_prefix`, the tokens all prompts begin with are computed once, and listeners
        that sum over tokens (`mlp_inputs`, `input_moments`) count them once per prompt, as if
        every prompt had computed them (on Qwen2.5's prompts with their system turn, half the
        tokens). llama.cpp's numbers depend on how tokens are batched, so the residuals differ
        from unshared ones by as much as batching moves them."""
        return self._residuals(prompts, progress, share_prefix, None)

    def residuals_and_logprobs(self, prompts: Sequence[Prompt], progress: Callable[[int], None] = lambda n: None
                               ) -> tuple[np.ndarray, np.ndarray]:
        """`residuals` (prefix shared) and, from the same pass, `next_token_logprobs`."""
        out = np.zeros((len(prompts), self.n_vocab), np.float32)
        return self._residuals(prompts, progress, True, out), out

    def _residuals(self, prompts: Sequence[Prompt], progress: Callable[[int], None], share_prefix: bool,
                   logprobs: np.ndarray | None) -> np.ndarray:
        encoded = self.encode(prompts)
        out = np.zeros((len(prompts), self.n_layer, self.n_embd), np.float32)
        if share_prefix and not all(getattr(x, "weighted", False) or getattr(x, "last_token", False)
                                    for x in self._inputs):
            raise ValueError("a listener that keeps rows cannot see a shared prefix once for many prompts")
        prefix = self._shared_prefix(encoded, len(prompts)) if share_prefix else 0
        for idx in self._batches(encoded, prefix):
            self._capture = {}
            try:
                last = self._decode([encoded[i] for i in idx], prefix)
                for layer, rows in self._capture.items():
                    out[idx, layer] = rows
            finally:
                self._capture = None
            if logprobs is not None:
                for j, i in enumerate(idx):
                    logprobs[i] = self._logprobs(last[j])
            progress(len(idx))
        return out

    def next_token_logprobs(self, prompts: Sequence[Prompt], ablate: np.ndarray | None = None,
                            progress: Callable[[int], None] = lambda n: None,
                            share_prefix: bool = False) -> np.ndarray:
        """(n_prompts, n_vocab) log-probabilities of the first response token.

        With `ablate` (a unit vector), the direction is projected out of the residual stream
        after every block while the prompts run. With `share_prefix`, the tokens all prompts
        begin with (the chat template's system turn) are computed once, not once per prompt.
        """
        encoded = self.encode(prompts)
        out = np.zeros((len(prompts), self.n_vocab), np.float32)
        self._ablate = None if ablate is None else np.asarray(ablate, np.float32)
        try:
            prefix = self._shared_prefix(encoded) if share_prefix else 0
            for idx in self._batches(encoded, prefix):
                last = self._decode([encoded[i] for i in idx], prefix)
                for j, i in enumerate(idx):
                    out[i] = self._logprobs(last[j])
                progress(len(idx))
        finally:
            self._ablate = None
        return out

    def _shared_prefix(self, encoded: list[list[int]], weight: int = 1) -> int:
        """Decode `common_prefix(encoded)` tokens as sequence 0, as `weight` prompts to weighted
        listeners; returns how many."""
        n = common_prefix(encoded)
        if n > 0:
            self._weight = weight
            try:
                self._decode_prefix(encoded[0][:n])
            finally:
                self._weight = 1
        return n

    def forced_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[list[int]],
                        progress: Callable[[int], None] = lambda n: None,
                        steps: Sequence[Sequence[int]] | None = None) -> list[np.ndarray]:
        """Teacher-forced: per prompt, (K, n_vocab) log-probabilities of each next token while
        the model reads its K-token continuation (K may differ per prompt; at least 1). With
        `steps`, only at those steps of each continuation (sorted, each below its K)."""
        encoded = self.encode(prompts)
        full = [e + list(c[:-1]) for e, c in zip(encoded, continuations)]
        if steps is None:
            steps = [range(max(1, len(c))) for c in continuations]
        reads = [[len(e) - 1 + s for s in step] for e, step in zip(encoded, steps)]
        out: list[np.ndarray] = [np.zeros(0)] * len(prompts)
        # shared by the prompts themselves, so every step read lies past it
        prefix = self._shared_prefix(encoded)
        for idx in self._batches(full, prefix):
            rows = self._decode([full[i] for i in idx], prefix, [reads[i] for i in idx])
            k = 0
            for i in idx:
                n = len(reads[i])
                out[i] = np.stack([self._logprobs(r) for r in rows[k : k + n]]).astype(np.float32)
                k += n
            progress(len(idx))
        return out

    def answer_means(self, prompts: Sequence[Prompt], continuations: Sequence[list[int]],
                     progress: Callable[[int], None] = lambda n: None) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced on each prompt's continuation (an answer's tokens): per prompt and
        block, the mean over the continuation's tokens of the residual stream after the block
        (n, n_layer, n_embd) and of the attention output's input, every head's output side by
        side (n, n_layer, n_head * head width). An empty continuation reads the last prompt token."""
        encoded = self.encode(prompts)
        full = [e + list(c) for e, c in zip(encoded, continuations)]
        spans = [(len(e) - (1 if not c else 0), len(f)) for e, c, f in zip(encoded, continuations, full)]
        means = SpanMeans(self._residual, len(prompts), self.n_layer)
        prefix = self._shared_prefix(encoded)
        with self._listening(means):
            for idx in self._batches(full, prefix):
                offset, means.spans = 0, []
                for i in idx:
                    means.spans.append((i, offset + spans[i][0] - prefix, offset + spans[i][1] - prefix))
                    offset += len(full[i]) - prefix
                self._decode([full[i] for i in idx], prefix)
                progress(len(idx))
        return means.stacked(means.residual), means.stacked(means.attention)

    def greedy(self, prompts: Sequence[Prompt], max_tokens: int,
               progress: Callable[[int], None] = lambda n: None) -> list[str]:
        """Greedy answers, several sequences per decode, each up to `max_tokens` tokens or its
        end-of-generation token: the final answers, after any thought."""
        return [a.reply for a in self.greedy_answers(prompts, max_tokens, progress)]

    def greedy_tokens(self, prompts: Sequence[Prompt], max_tokens: int,
                      progress: Callable[[int], None] = lambda n: None) -> list[list[int]]:
        """The tokens of `greedy`."""
        return [a.tokens for a in self.greedy_answers(prompts, max_tokens, progress)]

    def greedy_answers(self, prompts: Sequence[Prompt], max_tokens: int,
                       progress: Callable[[int], None] = lambda n: None,
                       ablate: np.ndarray | None = None, settled: Callable[[str], bool] | None = None,
                       stop_after: int | None = None) -> list[Answer]:
        """`greedy` with the tokens, and whether each answer ended within the budget. With
        `ablate` (a unit vector), the direction is projected out of the residual stream after
        every block at every step, prompt and answer alike. With `settled`, an answer stops
        growing once `settled(its text so far)` (a caller that only counts verdicts, once the
        verdict can no longer change): it is then cut, not finished; with `stop_after` too,
        every answer stops once more than that many have settled (the count decides the
        caller's question), the prompts not reached yet with empty answers."""
        self._ablate = None if ablate is None else np.asarray(ablate, np.float32)
        try:
            return self._greedy_answers(prompts, max_tokens, progress, settled, stop_after)
        finally:
            self._ablate = None

    def _greedy_answers(self, prompts: Sequence[Prompt], max_tokens: int, progress: Callable[[int], None],
                        settled: Callable[[str], bool] | None = None, stop_after: int | None = None) -> list[Answer]:
        ll = self.ll
        encoded = self.encode(prompts)
        answers: list[list[int]] = [[] for _ in prompts]
        finished: set[int] = set()
        prefix = self._shared_prefix(encoded)
        n_settled = 0
        for idx in self._batches(encoded, prefix, reserve=max_tokens):
            if stop_after is not None and n_settled > stop_after:
                break
            rows = self._decode([encoded[i] for i in idx], prefix)
            live = {i: (1 + j, int(rows[j])) for j, i in enumerate(idx)}  # prompt -> (sequence, logits row)
            for _ in range(max_tokens):
                step = []
                for i, (seq_id, row) in list(live.items()):
                    tok = int(np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, row),
                                                              shape=(self.n_vocab,))))
                    if ll.llama_vocab_is_eog(self.vocab, tok):
                        del live[i]
                        finished.add(i)
                        continue
                    answers[i].append(tok)
                    if settled is not None and settled(_detokenize(ll, self.vocab, answers[i])):
                        del live[i]
                        n_settled += 1
                        continue
                    step.append((i, seq_id, tok))
                if not step or len(answers[step[0][0]]) >= max_tokens or (stop_after is not None
                                                                          and n_settled > stop_after):
                    break
                rows = self._step([(seq_id, [tok], len(encoded[i]) + len(answers[i]) - 1, {0})
                                   for i, seq_id, tok in step])
                live = {i: (seq_id, int(rows[k])) for k, (i, seq_id, _) in enumerate(step)}
            progress(len(idx))
        return [self._answer(p, a, i in finished) for i, (p, a) in enumerate(zip(prompts, answers))]

    def _answer(self, prompt: Prompt, tokens: list[int], finished: bool) -> Answer:
        """An answer; for a model that thinks, split into thought and final answer (on the text
        with special tokens written out: Harmony's channels are special tokens)."""
        text = _detokenize(self.ll, self.vocab, tokens)
        if not self.thinks:
            return Answer(text, tokens, finished, final=text)
        raw = _detokenize(self.ll, self.vocab, tokens, special=True)
        opened = isinstance(prompt, str) and self.reasoning.opened_by_prompt(self.render(prompt))
        parts = split(self.reasoning.format, raw, opened)
        if parts.answer is None and finished:  # the model ended its turn inside the thought: that was its answer
            final = parts.thought or ""
            return Answer(text, tokens, finished, final=final, opening=_before(raw, final))
        thought_tokens = len(self.tokenize(parts.thought, bos=False)) if parts.thought else 0
        opening = None if parts.answer is None else _before(raw, parts.answer)
        return Answer(text, tokens, finished, parts.thought, parts.answer, thought_tokens, opening)


def _before(raw: str, answer: str) -> str:
    """What `raw` holds before its final `answer` (the split keeps the answer as written, up to
    surrounding space): the whole of it where the answer is empty."""
    at = raw.rfind(answer) if answer else -1
    return raw if at < 0 else raw[:at]


def common_prefix(encoded: list[list[int]]) -> int:
    """How many tokens every prompt starts with, keeping at least one of each prompt's own."""
    if not encoded:
        return 0
    n = min(len(t) for t in encoded) - 1
    first = encoded[0]
    for toks in encoded[1:]:
        n = next((k for k in range(n) if toks[k] != first[k]), n)
    return max(n, 0)


def _piece_bytes(ll: Any, vocab: Any, token: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(64)
    n = ll.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    if n < 0:  # a longer piece: -n is the size it needs
        buf = ctypes.create_string_buffer(-n)
        n = ll.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    return buf.raw[: max(n, 0)]


def _piece(ll: Any, vocab: Any, token: int) -> str:
    return _piece_bytes(ll, vocab, token, True).decode(errors="replace")


def _detokenize(ll: Any, vocab: Any, tokens: list[int], special: bool = False) -> str:
    """Text of generated tokens (pieces joined as bytes: one character may span tokens);
    `special` writes out control tokens too."""
    return b"".join(_piece_bytes(ll, vocab, t, special) for t in tokens).decode(errors="replace")


def _meta(ll: Any, model: Any, key: str) -> str:
    buf = ctypes.create_string_buffer(256)
    n = ll.llama_model_meta_val_str(model, key.encode(), buf, len(buf))
    return buf.value.decode(errors="replace") if n >= 0 else ""


def _meta_template(ll: Any, model: Any) -> str | None:
    """The GGUF's chat template, if it has one."""
    raw = ll.llama_model_chat_template(model, None)
    return raw.decode(errors="replace") if raw else None


def _chat_template(ll: Any, vocab: Any, raw: str, path: Path, reasoning: Render) -> Callable[[str], str]:
    """The model's chat template as a function of one user message, thinking as `reasoning` says."""
    from gguf_abliterate.runtime.template import chat_formatter

    render = chat_formatter(raw, bos=_piece(ll, vocab, ll.llama_vocab_bos(vocab)),
                            eos=_piece(ll, vocab, ll.llama_vocab_eos(vocab)), where=path.name,
                            variables=reasoning.variables)
    return lambda prompt: render(reasoning.messages(prompt)).prompt
