"""Synthesise an 8B-shaped, Q4_K_M-like GGUF (Llama-3-8B shapes) for memory and speed benchmarks.

    python -m tools.make_big_model OUT.gguf [--layers 32] [--tokenizer-from MODEL.gguf]

Quant blocks are random bytes with sane fp16 scales, written directly (nothing is quantized),
streamed tensor by tensor, so building the ~4.9 GB file needs little memory. The file is a
valid GGUF that our reader and editor accept; it is not meant to produce sensible text.
Its vocabulary is 128256 placeholder tokens without merges, which llama.cpp cannot tokenize
prompts with; `--tokenizer-from` takes another GGUF's tokenizer and chat template instead
(and its vocabulary size), so prompts run through the model as they would through that one:
what timing `direction` or a search trial on an 8B needs (tools/bench_direction.py).
Not committed: build it when you need it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFWriter

from tests.support.tiny_models import add_key

Q = GGMLQuantizationType
N_EMBD, N_FF, N_VOCAB, N_HEAD, N_HEAD_KV, HEAD_DIM = 4096, 14336, 128256, 32, 8, 128
# per type, (byte offset, fp16 value) of each scale field inside one block (ggml's block
# layouts), chosen so that random quants give zero-mean weights of standard deviation about 0.02,
# a trained model's: a Q4_K weight is d*sc*q - dmin*m with sc, m in 0..63 and q in 0..15
# (dmin = 7.5 d centres it, std 245 d); Q6_K's d*sc*(q-32) (sc int8) has std 1367 d, Q8_0's d*q
# 74 d. With larger weights (an earlier build's fp16 0.002 everywhere: std up to 2.7) every
# prompt gave the same last-token residual stream, so `direction` found nothing to measure; at
# this scale the two prompt sets differ and it runs.
_SCALES = {Q.Q4_K: ((0, 8.2e-5), (2, 6.1e-4)), Q.Q6_K: ((208, 1.5e-5),), Q.Q8_0: ((0, 2.7e-4),)}


def _random_blocks(rng: np.random.Generator, qtype: GGMLQuantizationType, n_blocks: int) -> np.ndarray:
    bs, ts = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n_blocks, ts), dtype=np.uint8)
    for off, value in _SCALES[qtype]:
        blocks[:, off : off + 2] = np.frombuffer(np.array(value, "<f2").tobytes(), np.uint8)
    return blocks


def tensor_plan(n_layer: int, n_vocab: int = N_VOCAB) -> Iterator[tuple[str, tuple[int, ...], GGMLQuantizationType]]:
    """(name, numpy shape, type) of every tensor, as llama.cpp's Q4_K_M mix lays out Llama 3 8B."""
    yield "token_embd.weight", (n_vocab, N_EMBD), Q.Q4_K
    yield "output_norm.weight", (N_EMBD,), Q.F32
    yield "output.weight", (n_vocab, N_EMBD), Q.Q6_K
    for i in range(n_layer):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (N_EMBD,), Q.F32
        yield b + "attn_q.weight", (N_HEAD * HEAD_DIM, N_EMBD), Q.Q4_K
        yield b + "attn_k.weight", (N_HEAD_KV * HEAD_DIM, N_EMBD), Q.Q4_K
        yield b + "attn_v.weight", (N_HEAD_KV * HEAD_DIM, N_EMBD), Q.Q6_K if i % 2 == 0 else Q.Q4_K
        yield b + "attn_output.weight", (N_EMBD, N_HEAD * HEAD_DIM), Q.Q4_K
        yield b + "ffn_norm.weight", (N_EMBD,), Q.F32
        yield b + "ffn_gate.weight", (N_FF, N_EMBD), Q.Q4_K
        yield b + "ffn_up.weight", (N_FF, N_EMBD), Q.Q4_K
        yield b + "ffn_down.weight", (N_EMBD, N_FF), Q.Q6_K if i % 2 == 0 else Q.Q4_K


def tokenizer_of(path: Path) -> dict[str, object]:
    """Every `tokenizer.*` key of a GGUF, as values gguf-py's writer takes."""
    return {key: field.contents() for key, field in GGUFReader(path).fields.items() if key.startswith("tokenizer.")}


def build_big_model(path: Path, n_layer: int = 32, seed: int = 0, tokenizer: Path | None = None) -> Path:
    rng = np.random.default_rng(seed)
    vocab = tokenizer_of(tokenizer) if tokenizer else {}
    n_vocab = len(vocab["tokenizer.ggml.tokens"]) if vocab else N_VOCAB  # type: ignore[arg-type]
    w = GGUFWriter(str(path), "llama")
    w.add_name("synthetic-llama-8b-q4_k_m")
    for key, value in {"context_length": 8192, "embedding_length": N_EMBD, "block_count": n_layer,
                       "feed_forward_length": N_FF, "attention.head_count": N_HEAD,
                       "attention.head_count_kv": N_HEAD_KV, "rope.dimension_count": HEAD_DIM}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    if not vocab:
        vocab = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": [f"t{i}" for i in range(N_VOCAB)],
                 "tokenizer.ggml.token_type": [1] * N_VOCAB}
    for key, value in vocab.items():
        add_key(w, key, value)
    plan = list(tensor_plan(n_layer, n_vocab))
    for name, shape, qtype in plan:
        bs, ts = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // bs * ts
        if qtype == Q.F32:
            w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        else:  # gguf-py takes the byte shape of quantized tensors
            w.add_tensor_info(name, (*shape[:-1], shape[-1] // bs * ts), np.dtype(np.uint8), nbytes, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape, qtype in plan:
        if qtype == Q.F32:
            w.write_tensor_data(np.ones(shape, np.float32))
        else:
            bs, _ = GGML_QUANT_SIZES[qtype]
            w.write_tensor_data(_random_blocks(rng, qtype, int(np.prod(shape)) // bs))
    w.close()
    return path


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokenizer-from", type=Path, help="a GGUF whose tokenizer and chat template the model takes")
    args = ap.parse_args()
    print(build_big_model(args.out, args.layers, tokenizer=args.tokenizer_from))
