"""Run a GGUF model in llama.cpp (llama-cpp-python's low-level API) and look inside it.

- `residuals`: the residual stream after every block (llama.cpp's `l_out-L`) at the last
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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from gguf_abliterate.errors import UserError
from gguf_abliterate.portable import available_cores
from gguf_abliterate.runtime.library import Ggml, load_llama_cpp


class LlamaModel:
    """A GGUF model loaded in llama.cpp for batched forward passes with a residual-stream hook."""

    def __init__(self, path: str | os.PathLike[str], n_batch: int = 2048, n_seq: int = 16,
                 n_threads: int | None = None, chat: bool = True):
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
        self.n_batch, self.n_seq = n_batch, n_seq
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_batch
        cparams.n_seq_max = n_seq
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
        self.template = _chat_template(ll, self.model, self.vocab) if chat else None
        # hook state, set around each decode
        self._capture: dict[int, np.ndarray] | None = None
        self._rows: np.ndarray = np.zeros(0, np.int64)
        self._ablate: np.ndarray | None = None

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
        """Apply a LoRA adapter GGUF to this context (None removes it)."""
        ll = self.ll
        if path is None:
            ll.llama_set_adapters_lora(self.ctx, None, 0, None)
            return
        adapter = ll.llama_adapter_lora_init(self.model, str(path).encode())
        if not adapter:
            raise UserError(f"{path}: llama.cpp could not load this adapter")
        self._adapters = getattr(self, "_adapters", []) + [adapter]  # freed with the model
        arr = (ll.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        if ll.llama_set_adapters_lora(self.ctx, arr, 1, scales) != 0:
            raise UserError(f"{path}: llama.cpp refused the adapter")

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

    def render(self, prompt: str) -> str:
        """The prompt as the model sees a user turn, generation prompt included."""
        return prompt if self.template is None else self.template(prompt)

    def tokenize(self, text: str) -> list[int]:
        ll = self.ll
        raw = text.encode()
        add_bos = ll.llama_vocab_get_add_bos(self.vocab) and not text.startswith(self._bos_text())
        buf = (ll.llama_token * (len(raw) + 8))()
        n = ll.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), add_bos, True)
        if n < 0:
            raise UserError("prompt could not be tokenized")
        return list(buf[:n])

    def _bos_text(self) -> str:
        return _piece(self.ll, self.vocab, self.ll.llama_vocab_bos(self.vocab)) or "\0"

    def encode(self, prompts: Sequence[str]) -> list[list[int]]:
        """Rendered and tokenized prompts; refuses ones that do not fit a batch."""
        out = []
        for p in prompts:
            toks = self.tokenize(self.render(p))
            if len(toks) > self.n_batch:
                raise UserError(f"a prompt is {len(toks)} tokens long, more than the context of {self.n_batch}")
            out.append(toks)
        return out

    # -- forward passes -----------------------------------------------------------------------

    def _batches(self, encoded: list[list[int]]) -> Iterator[list[int]]:
        """Indices of prompts that go into one decode: at most n_seq prompts, n_batch tokens."""
        batch: list[int] = []
        used = 0
        for i, toks in enumerate(encoded):
            if batch and (len(batch) == self.n_seq or used + len(toks) > self.n_batch):
                yield batch
                batch, used = [], 0
            batch.append(i)
            used += len(toks)
        if batch:
            yield batch

    def _decode(self, seqs: list[list[int]]) -> np.ndarray:
        """Decode several prompts as separate sequences; batch index of each last token."""
        ll = self.ll
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        total = sum(len(s) for s in seqs)
        batch = ll.llama_batch_init(total, 0, 1)
        try:
            last = []
            k = 0
            for seq_id, toks in enumerate(seqs):
                for pos, tok in enumerate(toks):
                    batch.token[k] = tok
                    batch.pos[k] = pos
                    batch.n_seq_id[k] = 1
                    batch.seq_id[k][0] = seq_id
                    batch.logits[k] = pos == len(toks) - 1
                    k += 1
                last.append(k - 1)
            batch.n_tokens = total
            self._rows = np.array(last, np.int64)
            rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise UserError(f"llama.cpp failed to decode a batch (code {rc})")
            return self._rows
        finally:
            ll.llama_batch_free(batch)

    def _on_tensor(self, t: int, ask: bool, user_data: Any) -> bool:
        name = self.ggml.name(t)
        if not name.startswith("l_out-"):
            return not ask  # ask: we do not need it; otherwise: go on computing
        if ask:
            return self._capture is not None or self._ablate is not None
        x = self.ggml.read(t, self.n_embd)
        if self._ablate is not None:
            r = self._ablate
            x -= np.outer(x @ r, r)
            self.ggml.write(t, x)
        if self._capture is not None:
            # what flows on (after any ablation); the last block keeps only the output rows
            self._capture[int(name[6:])] = x.copy() if x.shape[0] == len(self._rows) else x[self._rows]
        return True

    def residuals(self, prompts: Sequence[str], progress: Callable[[int], None] = lambda n: None) -> np.ndarray:
        """(n_prompts, n_layer, n_embd): l_out-L at each prompt's last token, for every L."""
        encoded = self.encode(prompts)
        out = np.zeros((len(prompts), self.n_layer, self.n_embd), np.float32)
        for idx in self._batches(encoded):
            self._capture = {}
            try:
                self._decode([encoded[i] for i in idx])
                for layer, rows in self._capture.items():
                    out[idx, layer] = rows
            finally:
                self._capture = None
            progress(len(idx))
        return out

    def next_token_logprobs(self, prompts: Sequence[str], ablate: np.ndarray | None = None,
                            progress: Callable[[int], None] = lambda n: None) -> np.ndarray:
        """(n_prompts, n_vocab) log-probabilities of the first response token.

        With `ablate` (a unit vector), the direction is projected out of the residual stream
        after every block while the prompts run.
        """
        ll = self.ll
        encoded = self.encode(prompts)
        out = np.zeros((len(prompts), self.n_vocab), np.float32)
        self._ablate = None if ablate is None else np.asarray(ablate, np.float32)
        try:
            for idx in self._batches(encoded):
                last = self._decode([encoded[i] for i in idx])
                for j, i in enumerate(idx):
                    ptr = ll.llama_get_logits_ith(self.ctx, int(last[j]))
                    logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
                    out[i] = logits - np.logaddexp.reduce(logits)
                progress(len(idx))
        finally:
            self._ablate = None
        return out


def _piece(ll: Any, vocab: Any, token: int) -> str:
    buf = ctypes.create_string_buffer(64)
    n = ll.llama_token_to_piece(vocab, token, buf, len(buf), 0, True)
    return buf.raw[: max(n, 0)].decode(errors="replace")


def _chat_template(ll: Any, model: Any, vocab: Any) -> Callable[[str], str] | None:
    """The model's chat template (from the GGUF) as a function of one user message."""
    raw = ll.llama_model_chat_template(model, None)
    if not raw:
        return None
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(raw.decode(), eos_token=_piece(ll, vocab, ll.llama_vocab_eos(vocab)),
                                    bos_token=_piece(ll, vocab, ll.llama_vocab_bos(vocab)),
                                    add_generation_prompt=True)
    return lambda prompt: formatter(messages=[{"role": "user", "content": prompt}]).prompt
