"""Build small random GGUF models of real architectures that llama.cpp loads and runs.

    python -m tools.make_tiny_models OUT_DIR          # one file per architecture

The tests build theirs at test time through `build_model`. Shapes are chosen so every
matrix row is a multiple of 256, so any quant type (K-quants included) fits. Types that our
engine cannot quantize yet are quantized by ggml's C code (tools/ggml_ref.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from gguf_abliterate import quants

Q = GGMLQuantizationType


@dataclass
class TinySpec:
    """Shape and storage types of a tiny model."""

    arch: str = "llama"
    n_layer: int = 4
    n_embd: int = 256
    n_ff: int = 512
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 64
    tied: bool = True
    n_expert: int = 4  # qwen2moe only
    n_ff_expert: int = 256  # qwen2moe only; its shared expert uses n_ff
    output_biases: bool = False  # attn_output.bias and ffn_down.bias (llama supports them)
    split_max_tensors: int = 0  # >0: write a split model (gguf-split layout), this many tensors a part
    seed: int = 0
    # tensor kind ("attn_output", "ffn_down", "token_embd", "output", ...) -> storage type
    types: dict[str, GGMLQuantizationType] = field(default_factory=dict)
    default_type: GGMLQuantizationType = Q.Q8_0
    chat_template: str | None = None  # jinja2, as a GGUF's tokenizer.chat_template (CHATML ...)


# Qwen's ChatML template, as its GGUFs carry it (shortened: no tools)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: specials, 256 byte tokens, letters and a few words."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581" + p for p in pieces]
    pieces += ["\u2581the", "\u2581is", "\u2581of", "\u2581how", "\u2581to", "\u2581I", "\u2581you"]
    tokens += pieces
    types += [1] * len(pieces)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def _store(values: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == Q.F32:
        return values.astype(np.float32)
    if qtype == Q.F16:
        return values.astype(np.float16)
    if quants.can_quantize(qtype):
        return quants.quantize(values, qtype)
    from tools import ggml_ref

    # types that need an importance matrix get a flat one
    imatrix = np.ones(values.shape[-1], np.float32) if quants.needs_imatrix(qtype) else None
    return ggml_ref.quantize(values, qtype, imatrix)


def build_model(path: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a random model of `spec` to `path` and return its path (of a split model: the
    first part, `stem-00001-of-0000N.gguf`)."""
    spec = spec or TinySpec()
    rng = np.random.default_rng(spec.seed)
    path = Path(path)
    a, e, hd = spec.arch, spec.n_embd, spec.head_dim
    tokens, scores, ttypes = _vocab()
    n_vocab = len(tokens)

    w = GGUFWriter(str(path), a, split_max_tensors=spec.split_max_tensors)
    w.add_name(f"tiny-{a}")
    w.add_uint32(f"{a}.context_length", 256)
    w.add_uint32(f"{a}.embedding_length", e)
    w.add_uint32(f"{a}.block_count", spec.n_layer)
    w.add_uint32(f"{a}.feed_forward_length", spec.n_ff)
    w.add_uint32(f"{a}.attention.head_count", spec.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", spec.n_head_kv)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    if a == "qwen2moe":
        w.add_uint32(f"{a}.expert_count", spec.n_expert)
        w.add_uint32(f"{a}.expert_used_count", 2)
        w.add_uint32(f"{a}.expert_feed_forward_length", spec.n_ff_expert)
        w.add_uint32(f"{a}.expert_shared_feed_forward_length", spec.n_ff)
    if a == "gemma3":
        w.add_uint32(f"{a}.attention.key_length", hd)
        w.add_uint32(f"{a}.attention.value_length", hd)
    else:
        w.add_uint32(f"{a}.rope.dimension_count", hd)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", ttypes)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    if spec.chat_template is not None:
        w.add_chat_template(spec.chat_template)

    def matrix(name: str, kind: str, rows: int, cols: int, std: float = 0.05, experts: int = 0) -> None:
        shape = (experts, rows, cols) if experts else (rows, cols)
        values = rng.normal(0, std, shape).astype(np.float32)
        qtype = spec.types.get(kind, spec.default_type)
        data = _store(values.reshape(-1, cols), qtype).reshape(*shape[:-1], -1)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)

    def vector(name: str, n: int, around: float = 1.0, spread: float = 0.0) -> None:
        w.add_tensor(name, (around + spread * rng.uniform(-1, 1, n)).astype(np.float32))

    matrix("token_embd.weight", "token_embd", n_vocab, e, 0.5)
    vector("output_norm.weight", e)
    if not spec.tied:
        matrix("output.weight", "output", n_vocab, e)
    for i in range(spec.n_layer):
        b = f"blk.{i}."
        vector(b + "attn_norm.weight", e)
        matrix(b + "attn_q.weight", "attn_q", spec.n_head * hd, e)
        matrix(b + "attn_k.weight", "attn_k", spec.n_head_kv * hd, e)
        matrix(b + "attn_v.weight", "attn_v", spec.n_head_kv * hd, e)
        if a in ("qwen2", "qwen2moe"):
            vector(b + "attn_q.bias", spec.n_head * hd, 0.0, 0.1)
            vector(b + "attn_k.bias", spec.n_head_kv * hd, 0.0, 0.1)
            vector(b + "attn_v.bias", spec.n_head_kv * hd, 0.0, 0.1)
        matrix(b + "attn_output.weight", "attn_output", e, spec.n_head * hd)
        if spec.output_biases:
            vector(b + "attn_output.bias", e, 0.0, 0.1)
        vector(b + "ffn_norm.weight", e)
        if a == "qwen2moe":
            x, fx = spec.n_expert, spec.n_ff_expert
            matrix(b + "ffn_gate_inp.weight", "ffn_gate_inp", x, e, 0.5)
            matrix(b + "ffn_gate_exps.weight", "ffn_gate_exps", fx, e, experts=x)
            matrix(b + "ffn_up_exps.weight", "ffn_up_exps", fx, e, experts=x)
            matrix(b + "ffn_down_exps.weight", "ffn_down_exps", e, fx, experts=x)
            vector(b + "ffn_gate_inp_shexp.weight", e, 0.0, 0.1)
            matrix(b + "ffn_gate_shexp.weight", "ffn_gate_shexp", spec.n_ff, e)
            matrix(b + "ffn_up_shexp.weight", "ffn_up_shexp", spec.n_ff, e)
            matrix(b + "ffn_down_shexp.weight", "ffn_down_shexp", e, spec.n_ff)
            continue
        matrix(b + "ffn_gate.weight", "ffn_gate", spec.n_ff, e)
        matrix(b + "ffn_up.weight", "ffn_up", spec.n_ff, e)
        matrix(b + "ffn_down.weight", "ffn_down", e, spec.n_ff)
        if spec.output_biases:
            vector(b + "ffn_down.bias", e, 0.0, 0.1)
        if a == "gemma3":
            vector(b + "attn_q_norm.weight", hd)
            vector(b + "attn_k_norm.weight", hd)
            # far from 1, so that the post-norm rule (u = g*r/|g*r|) visibly matters
            vector(b + "post_attention_norm.weight", e, 1.0, 0.9)
            vector(b + "post_ffw_norm.weight", e, 1.0, 0.9)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return w.format_shard_names(path)[0]


ARCHES = ("llama", "qwen2", "qwen2moe", "gemma3")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
    out.mkdir(parents=True, exist_ok=True)
    for arch in ARCHES:
        print(build_model(out / f"tiny-{arch}.gguf", TinySpec(arch=arch)))
