"""Build small random GGUF models of real architectures that llama.cpp loads and runs.

    python -m tests.support.tiny_models OUT_DIR     # one file per architecture

The tests build theirs at test time through `build_model`. Shapes are chosen so every
matrix row is a multiple of 256, so any quant type (K-quants included) fits. Types that our
engine cannot quantize yet are quantized by ggml's C code (tests/support/ggml_ref.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
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
    n_expert: int = 4  # mixture-of-experts architectures
    n_expert_used: int = 2  # experts the router picks per token
    n_ff_expert: int = 256  # qwen2moe's experts (its shared expert uses n_ff), gpt-oss's; granitemoe's shared one
    # trailing multi-token-prediction blocks counted in block_count but not stored (llama.cpp
    # then loads the trunk only, as from a GGUF converted without them)
    n_nextn: int = 0
    output_biases: bool = False  # attn_output.bias and ffn_down.bias (llama supports them)
    split_max_tensors: int = 0  # >0: write a split model (gguf-split layout), this many tensors a part
    seed: int = 0
    # tensor kind ("attn_output", "ffn_down", "token_embd", "output", ...) -> storage type
    types: dict[str, GGMLQuantizationType] = field(default_factory=dict)
    default_type: GGMLQuantizationType = Q.Q8_0
    chat_template: str | None = None  # jinja2, as a GGUF's tokenizer.chat_template (CHATML ...)
    name: str | None = None  # general.name (default: tiny-<arch>)


# Qwen's ChatML template, as its GGUFs carry it (shortened: no tools)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")



def _turns(open_: str, close: str, assistant: str, roles: dict[str, str] | None = None, prefix: str = "") -> str:
    """A short template of ours in a family's turn markup: each message as
    `open_(role) + content + close`, then `assistant` as the generation prompt."""
    role = "message['role']" if not roles else (
        "{" + ", ".join(f"'{k}': '{v}'" for k, v in roles.items()) + "}[message['role']]")
    return (f"{prefix}{{% for message in messages %}}{{{{ '{open_[0]}' + {role} + '{open_[1]}' + message['content'] + "
            f"'{close}' }}}}{{% endfor %}}{{% if add_generation_prompt %}}{{{{ '{assistant}' }}}}{{% endif %}}")


# Each family's turn markup (from its published template), in a short template of ours:
# enough for prompts to be rendered as the family renders them, not the vendors' full text.
FAMILY_TEMPLATES = {
    "chatml": CHATML,
    "gemma": _turns(("<start_of_turn>", "\n"), "<end_of_turn>\n", "<start_of_turn>model\n",
                    {"user": "user", "assistant": "model", "system": "user"}),
    "gemma4": _turns(("<|turn>", "\n"), "<turn|>\n", "<|turn>model\n",
                     {"user": "user", "assistant": "model", "system": "system"}),
    "llama3": _turns(("<|start_header_id|>", "<|end_header_id|>\n\n"), "<|eot_id|>",
                     "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "mistral": ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + '</s>' }}"
                "{% else %}{{ '[INST]' + message['content'] + '[/INST]' }}{% endif %}{% endfor %}"),
    "granite": _turns(("<|start_of_role|>", "<|end_of_role|>"), "<|end_of_text|>\n",
                      "<|start_of_role|>assistant<|end_of_role|>"),
    "tulu": _turns(("<|", "|>\n"), "\n", "<|assistant|>\n"),  # OLMo 2
    "phi3": _turns(("<|", "|>\n"), "<|end|>\n", "<|assistant|>\n"),
    "glm": _turns(("<|", "|>\n"), "", "<|assistant|>\n", prefix="[gMASK]<sop>"),
    "cohere": _turns(("<|START_OF_TURN_TOKEN|>", ""), "<|END_OF_TURN_TOKEN|>",
                     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                     {"user": "<|USER_TOKEN|>", "assistant": "<|CHATBOT_TOKEN|>", "system": "<|SYSTEM_TOKEN|>"}),
    "harmony": _turns(("<|start|>", "<|message|>"), "<|end|>", "<|start|>assistant"),  # gpt-oss
    "deepseek": _turns(("", ""), "", "<｜Assistant｜>",
                       {"user": "<｜User｜>", "assistant": "<｜Assistant｜>", "system": ""}),
    "nemotron": _turns(("<SPECIAL_11>", "\n"), "\n", "<SPECIAL_11>Assistant\n",
                       {"user": "User", "assistant": "Assistant", "system": "System"}),
}
# Templates of models that think, in each family's real markup and switches (short, ours):
# Qwen3's enable_thinking (off: a closed empty thought), DeepSeek-R1's generation prompt that
# opens the thought, gpt-oss's Harmony system turn with its reasoning effort, SmolLM3's
# /think and /no_think flags in the system turn.
THINKING_TEMPLATES = {
    "qwen3": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
              "{% endif %}{% endif %}"),
    "deepseek-r1": ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                    "{{ '<｜User｜>' + message['content'] }}{% elif message['role'] == 'assistant' %}"
                    "{{ '<｜Assistant｜>' + message['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' }}"
                    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}"),
    "harmony": ("{{ '<|start|>system<|message|>Reasoning: ' + (reasoning_effort if reasoning_effort is defined "
                "else 'medium') + '\\n\\n# Valid channels: analysis, commentary, final.<|end|>' }}"
                "{% for message in messages %}{% if message['role'] == 'assistant' %}"
                "{{ '<|start|>assistant<|channel|>final<|message|>' + message['content'] + '<|end|>' }}"
                "{% elif message['role'] != 'system' %}"
                "{{ '<|start|>' + message['role'] + '<|message|>' + message['content'] + '<|end|>' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}"),
    "smollm3": ("{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
                "{% set think = '/no_think' not in system %}"
                "{{ '<|im_start|>system\\n## Metadata\\nReasoning Mode: ' + ('/think' if think else '/no_think') + "
                "'<|im_end|>\\n' }}{% for message in messages %}{% if message['role'] != 'system' %}"
                "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% if not think %}{{ '<think>\\n\\n</think>\\n' }}{% endif %}{% endif %}"),
}
# the template each family's tiny model carries
TEMPLATE_OF = {
    "llama": "llama3", "qwen2": "chatml", "qwen2moe": "chatml", "qwen3": "chatml", "qwen3moe": "chatml",
    "qwen35": "chatml", "qwen35moe": "chatml", "qwen3next": "chatml", "smollm3": "chatml", "lfm2": "chatml",
    "gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "gemma4": "gemma4", "mistral3": "mistral",
    "granite": "granite", "granitemoe": "granite", "granitehybrid": "granite", "olmo2": "tulu", "phi3": "phi3",
    "glm4": "glm", "glm4moe": "glm", "cohere2": "cohere", "gpt-oss": "harmony", "deepseek2": "deepseek",
    "nemotron_h": "nemotron",
}

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
    from . import ggml_ref

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
    # llama.cpp's vocabulary loader treats a model *named* phi3 specially and then wants Phi's
    # <|endoftext|> token, which this vocabulary lacks
    w.add_name(spec.name if spec.name is not None else f"tiny-{a}".replace("phi3", "phi"))
    keys: dict[str, object] = {
        "context_length": 256, "embedding_length": e, "block_count": spec.n_layer + spec.n_nextn,
        "feed_forward_length": spec.n_ff,
        "attention.head_count": spec.n_head, "attention.head_count_kv": spec.n_head_kv,
        "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": 10000.0,
    }
    if spec.n_nextn:
        keys["nextn_predict_layers"] = spec.n_nextn
    if a == "qwen2moe":
        keys |= {"expert_count": spec.n_expert, "expert_used_count": spec.n_expert_used,
                 "expert_feed_forward_length": spec.n_ff_expert, "expert_shared_feed_forward_length": spec.n_ff}
    if a == "gemma3":
        keys |= {"attention.key_length": hd, "attention.value_length": hd}
    else:
        keys["rope.dimension_count"] = hd
    keys |= EXTRA_KEYS.get(a, lambda s: {})(spec)  # an architecture's own keys win
    for key, value in keys.items():
        add_key(w, f"{a}.{key}", value)
    w.add_string("tokenizer.ggml.model", "llama")
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.scores", scores)
    w.add_array("tokenizer.ggml.token_type", ttypes)
    w.add_uint32("tokenizer.ggml.bos_token_id", 1)
    w.add_uint32("tokenizer.ggml.eos_token_id", 2)
    w.add_uint32("tokenizer.ggml.unknown_token_id", 0)
    if spec.chat_template is not None:
        w.add_chat_template(spec.chat_template)

    def matrix(name: str, kind: str, rows: int, cols: int, std: float = 0.05, experts: int = 0,
               mean: float = 0.0) -> None:
        shape = (experts, rows, cols) if experts else (rows, cols)
        values = rng.normal(mean, std, shape).astype(np.float32)
        qtype = Q.F32 if kind == "bias" else spec.types.get(kind, spec.default_type)
        data = _store(values.reshape(-1, cols), qtype).reshape(*shape[:-1], -1)
        w.add_tensor(name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)

    def vector(name: str, n: int, around: float = 1.0, spread: float = 0.0) -> None:
        w.add_tensor(name, (around + spread * rng.uniform(-1, 1, n)).astype(np.float32))

    matrix("token_embd.weight", "token_embd", n_vocab, e, 0.5)
    vector(OUTPUT_NORM.get(a, "output_norm.weight"), e)
    if not spec.tied:
        matrix("output.weight", "output", n_vocab, e)
    if a in RECIPES:
        RECIPES[a](Blocks(spec, matrix, vector))
    for i in range(spec.n_layer if a in LEGACY else 0):
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



def add_key(w: GGUFWriter, key: str, value: object) -> None:
    """One metadata value, typed as llama.cpp reads it (bool, uint32, float32, string, array)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, list(value))


@dataclass
class Blocks:
    """What a recipe writes each block's tensors with. Shapes are numpy's: (rows, cols) is
    ggml's {cols, rows}, as in llama.cpp's `create_tensor` calls read backwards."""

    spec: TinySpec
    matrix: Callable[..., None]
    vector: Callable[..., None]

    def each(self) -> Iterator[tuple[int, str]]:
        """(block, "blk.N.") for every block."""
        return ((i, f"blk.{i}.") for i in range(self.spec.n_layer))

    def attention(self, b: str, q_dim: int | None = None, norm: bool = True) -> None:
        s = self.spec
        hd, e = s.head_dim, s.n_embd
        if norm:
            self.vector(b + "attn_norm.weight", e)
        self.matrix(b + "attn_q.weight", "attn_q", q_dim or s.n_head * hd, e)
        self.matrix(b + "attn_k.weight", "attn_k", s.n_head_kv * hd, e)
        self.matrix(b + "attn_v.weight", "attn_v", s.n_head_kv * hd, e)
        self.matrix(b + "attn_output.weight", "attn_output", e, s.n_head * hd)

    def mlp(self, b: str, norm: bool = True, gate: bool = True) -> None:
        s = self.spec
        if norm:
            self.vector(b + "ffn_norm.weight", s.n_embd)
        if gate:
            self.matrix(b + "ffn_gate.weight", "ffn_gate", s.n_ff, s.n_embd)
        self.matrix(b + "ffn_up.weight", "ffn_up", s.n_ff, s.n_embd)
        self.matrix(b + "ffn_down.weight", "ffn_down", s.n_embd, s.n_ff)

    def experts(self, b: str, n_ff: int, shared: int = 0, norm: bool = True) -> None:
        e, x = self.spec.n_embd, self.spec.n_expert
        if norm:
            self.vector(b + "ffn_norm.weight", e)
        self.matrix(b + "ffn_gate_inp.weight", "ffn_gate_inp", x, e, 0.5)
        self.matrix(b + "ffn_gate_exps.weight", "ffn_gate_exps", n_ff, e, experts=x)
        self.matrix(b + "ffn_up_exps.weight", "ffn_up_exps", n_ff, e, experts=x)
        self.matrix(b + "ffn_down_exps.weight", "ffn_down_exps", e, n_ff, experts=x)
        if shared:
            self.matrix(b + "ffn_gate_shexp.weight", "ffn_gate_shexp", shared, e)
            self.matrix(b + "ffn_up_shexp.weight", "ffn_up_shexp", shared, e)
            self.matrix(b + "ffn_down_shexp.weight", "ffn_down_shexp", e, shared)

    def post_norm(self, name: str) -> None:
        # far from 1, so that the post-norm rule (u = g*r/|g*r|) visibly matters
        self.vector(name, self.spec.n_embd, 1.0, 0.9)


def _llama_like(m: Blocks) -> None:
    for _, b in m.each():
        m.attention(b)
        m.mlp(b)


def _qwen3(m: Blocks, moe: bool = False) -> None:  # src/models/qwen3.cpp, qwen3moe.cpp: q/k norms
    s = m.spec
    for _, b in m.each():
        m.attention(b)
        m.vector(b + "attn_q_norm.weight", s.head_dim)
        m.vector(b + "attn_k_norm.weight", s.head_dim)
        if moe:
            m.experts(b, s.n_ff_expert)
        else:
            m.mlp(b)


def _phi3(m: Blocks) -> None:  # src/models/phi3.cpp: fused qkv, ffn_up holds gate and up
    s, e = m.spec, m.spec.n_embd
    for _, b in m.each():
        m.vector(b + "attn_norm.weight", e)
        m.matrix(b + "attn_qkv.weight", "attn_qkv", (s.n_head + 2 * s.n_head_kv) * s.head_dim, e)
        m.matrix(b + "attn_output.weight", "attn_output", e, s.n_head * s.head_dim)
        m.vector(b + "ffn_norm.weight", e)
        m.matrix(b + "ffn_up.weight", "ffn_up", 2 * s.n_ff, e)
        m.matrix(b + "ffn_down.weight", "ffn_down", e, s.n_ff)


def _gemma2(m: Blocks) -> None:  # src/models/gemma2.cpp: post-norms after attention and MLP
    for _, b in m.each():
        m.attention(b)
        m.post_norm(b + "post_attention_norm.weight")
        m.mlp(b)
        m.post_norm(b + "post_ffw_norm.weight")


def _olmo2(m: Blocks) -> None:  # src/models/olmo2.cpp: no pre-norms, q/k norms, post-norms
    s = m.spec
    for _, b in m.each():
        m.attention(b, norm=False)
        m.vector(b + "attn_q_norm.weight", s.n_head * s.head_dim)
        m.vector(b + "attn_k_norm.weight", s.n_head_kv * s.head_dim)
        m.post_norm(b + "post_attention_norm.weight")
        m.mlp(b, norm=False)
        m.post_norm(b + "post_ffw_norm.weight")


def _glm4(m: Blocks) -> None:  # src/models/glm4.cpp: ffn_up holds gate and up, post-norms
    s = m.spec
    for _, b in m.each():
        m.attention(b)
        m.post_norm(b + "post_attention_norm.weight")
        m.vector(b + "ffn_norm.weight", s.n_embd)
        m.matrix(b + "ffn_up.weight", "ffn_up", 2 * s.n_ff, s.n_embd)
        m.matrix(b + "ffn_down.weight", "ffn_down", s.n_embd, s.n_ff)
        m.post_norm(b + "post_ffw_norm.weight")


def _cohere2(m: Blocks) -> None:  # src/models/cohere2.cpp: one LayerNorm, attention and MLP in parallel
    for _, b in m.each():
        m.attention(b)
        m.mlp(b, norm=False)


def _granitemoe(m: Blocks) -> None:  # src/models/granite-moe.cpp: experts of n_ff, a shared expert
    for _, b in m.each():
        m.attention(b)
        m.experts(b, m.spec.n_ff, shared=m.spec.n_ff_expert)


def _gpt_oss(m: Blocks) -> None:  # src/models/openai-moe.cpp: sinks, biases everywhere, experts only
    s, e, x, fx = m.spec, m.spec.n_embd, m.spec.n_expert, m.spec.n_ff_expert
    for _, b in m.each():
        m.attention(b)
        m.vector(b + "post_attention_norm.weight", e)
        for part, n in (("q", s.n_head), ("k", s.n_head_kv), ("v", s.n_head_kv)):
            m.vector(b + f"attn_{part}.bias", n * s.head_dim, 0.0, 0.1)
        m.vector(b + "attn_output.bias", e, 0.0, 0.1)
        m.vector(b + "attn_sinks.weight", s.n_head, 0.0, 1.0)
        m.experts(b, fx, norm=False)
        m.vector(b + "ffn_gate_inp.bias", x, 0.0, 0.1)
        m.matrix(b + "ffn_gate_exps.bias", "bias", x, fx, 0.1)
        m.matrix(b + "ffn_up_exps.bias", "bias", x, fx, 0.1)
        m.matrix(b + "ffn_down_exps.bias", "bias", x, e, 0.1)


def _lfm2(m: Blocks) -> None:  # src/models/lfm2.cpp: short-convolution blocks where head_count_kv is 0
    s, e = m.spec, m.spec.n_embd
    for i, b in m.each():
        m.mlp(b)
        m.vector(b + "attn_norm.weight", e)
        if _lfm2_attends(i):
            m.vector(b + "attn_q_norm.weight", s.head_dim)
            m.vector(b + "attn_k_norm.weight", s.head_dim)
            m.attention(b, norm=False)
        else:
            m.matrix(b + "shortconv.conv.weight", "bias", e, 3, 0.3)
            m.matrix(b + "shortconv.in_proj.weight", "shortconv_in", 3 * e, e)
            m.matrix(b + "shortconv.out_proj.weight", "shortconv_out", e, e)


def _lfm2_attends(block: int) -> bool:
    return block % 2 == 1


# Qwen 3.5's gated DeltaNet: k heads of SSM_STATE (ssm.group_count), v heads (ssm.time_step_rank)
SSM_STATE, SSM_K_HEADS, SSM_V_HEADS = 64, 2, 4


def _qwen35(m: Blocks, moe: bool = False, next_: bool = False) -> None:
    """src/models/qwen35.cpp (qwen35moe.cpp, qwen3next.cpp): DeltaNet blocks, every 4th attends."""
    s, e = m.spec, m.spec.n_embd
    key, value = SSM_STATE * SSM_K_HEADS, SSM_STATE * SSM_V_HEADS
    for i, b in m.each():
        m.vector(b + "attn_norm.weight", e)
        m.vector(b + "post_attention_norm.weight", e)  # the MLP's input norm, despite its name
        if (i + 1) % 4 == 0:
            m.attention(b, q_dim=2 * s.n_head * s.head_dim, norm=False)  # q and its gate
            m.vector(b + "attn_q_norm.weight", s.head_dim)
            m.vector(b + "attn_k_norm.weight", s.head_dim)
        else:
            m.matrix(b + "attn_qkv.weight", "attn_qkv", 2 * key + value, e)
            m.matrix(b + "attn_gate.weight", "attn_gate", value, e)
            m.matrix(b + "ssm_conv1d.weight", "bias", 2 * key + value, 4, 0.3)
            m.vector(b + "ssm_dt.bias", SSM_V_HEADS, 0.0, 0.5)
            m.vector(b + "ssm_a", SSM_V_HEADS, -1.0, 0.5)
            if next_:
                m.matrix(b + "ssm_ba.weight", "ssm_ba", 2 * SSM_V_HEADS, e)
            else:
                m.matrix(b + "ssm_beta.weight", "ssm_beta", SSM_V_HEADS, e)
                m.matrix(b + "ssm_alpha.weight", "ssm_alpha", SSM_V_HEADS, e)
            m.vector(b + "ssm_norm.weight", SSM_STATE)
            m.matrix(b + "ssm_out.weight", "ssm_out", e, value)
        if moe:
            m.experts(b, s.n_ff_expert, shared=s.n_ff, norm=False)
            m.vector(b + "ffn_gate_inp_shexp.weight", e, 0.0, 0.1)
        else:
            m.mlp(b, norm=False)


# Mamba-2 layers (nemotron_h, granitehybrid): heads of 64 in two groups, states of 64
MAMBA_STATE, MAMBA_GROUPS, MAMBA_HEAD = 64, 2, 64


def _mamba2_inner(s: TinySpec) -> int:
    return 2 * s.n_embd if s.arch == "granitehybrid" else s.n_embd  # granite-hybrid.cpp asserts 2 n_embd


def _mamba2(m: Blocks, b: str) -> None:
    e, inner = m.spec.n_embd, _mamba2_inner(m.spec)
    heads, conv = inner // MAMBA_HEAD, inner + 2 * MAMBA_GROUPS * MAMBA_STATE
    m.matrix(b + "ssm_in.weight", "ssm_in", conv + inner + heads, e)
    m.matrix(b + "ssm_conv1d.weight", "bias", conv, 4, 0.3)
    m.vector(b + "ssm_conv1d.bias", conv, 0.0, 0.1)
    m.vector(b + "ssm_dt.bias", heads, 0.0, 0.5)
    m.matrix(b + "ssm_a", "bias", heads, 1, 0.1, mean=-1.0)  # A < 0, or the state grows without bound
    m.matrix(b + "ssm_d", "bias", heads, 1, 0.5)
    m.matrix(b + "ssm_norm.weight", "bias", MAMBA_GROUPS, inner // MAMBA_GROUPS, 0.1)
    m.matrix(b + "ssm_out.weight", "ssm_out", e, inner)


NEMOTRON_LAYERS = "MAFF"  # per block: Mamba-2, attention or MLP (feed-forward)


def _nemotron_h(m: Blocks) -> None:  # src/models/nemotron-h.cpp: each block one of Mamba-2, attention, MLP
    for i, b in m.each():
        m.vector(b + "attn_norm.weight", m.spec.n_embd)
        kind = NEMOTRON_LAYERS[i % len(NEMOTRON_LAYERS)]
        if kind == "M":
            _mamba2(m, b)
        elif kind == "A":
            m.attention(b, norm=False)
        else:
            m.mlp(b, norm=False, gate=False)


def _granitehybrid(m: Blocks) -> None:  # src/models/granite-hybrid.cpp: Mamba-2 or attention, then an MLP
    for i, b in m.each():
        if _lfm2_attends(i):
            m.attention(b)
        else:
            m.vector(b + "attn_norm.weight", m.spec.n_embd)
            _mamba2(m, b)
        m.mlp(b)


def _ssm2_keys(s: TinySpec) -> dict[str, object]:
    inner = _mamba2_inner(s)
    return {"ssm.conv_kernel": 4, "ssm.inner_size": inner, "ssm.state_size": MAMBA_STATE,
            "ssm.time_step_rank": inner // MAMBA_HEAD, "ssm.group_count": MAMBA_GROUPS}


PER_LAYER = 64  # Gemma 4's per-layer embedding width


def _gemma4_moe(block: int) -> bool:
    return block % 2 == 1


def _gemma4(m: Blocks) -> None:  # src/models/gemma4.cpp: post-norms, MoE beside the MLP, per-layer embeddings
    s, e, hd = m.spec, m.spec.n_embd, m.spec.head_dim
    m.matrix("per_layer_token_embd.weight", "per_layer_token_embd", len(_vocab()[0]), PER_LAYER * s.n_layer, 0.5)
    m.matrix("per_layer_model_proj.weight", "per_layer_model_proj", PER_LAYER * s.n_layer, e)
    m.vector("per_layer_proj_norm.weight", PER_LAYER)
    m.vector("rope_freqs.weight", hd // 2)
    for i, b in m.each():
        m.attention(b)
        m.vector(b + "attn_q_norm.weight", hd)
        m.vector(b + "attn_k_norm.weight", hd)
        m.post_norm(b + "post_attention_norm.weight")
        m.mlp(b)
        m.post_norm(b + "post_ffw_norm.weight")
        if _gemma4_moe(i):
            m.vector(b + "ffn_gate_inp.scale", e)
            m.vector(b + "pre_ffw_norm_2.weight", e)
            m.post_norm(b + "post_ffw_norm_1.weight")
            m.post_norm(b + "post_ffw_norm_2.weight")
            m.experts(b, s.n_ff_expert, norm=False)
        m.matrix(b + "inp_gate.weight", "inp_gate", PER_LAYER, e)
        m.matrix(b + "proj.weight", "proj", e, PER_LAYER)
        m.post_norm(b + "post_norm.weight")
        if i == 0:
            m.vector(b + "layer_output_scale.weight", 1, 0.7)


def _glm4moe(m: Blocks) -> None:  # src/models/glm4-moe.cpp: a dense lead block, then routed + shared experts
    s, e = m.spec, m.spec.n_embd
    for i, b in m.each():
        m.attention(b)
        for part, n in (("q", s.n_head), ("k", s.n_head_kv), ("v", s.n_head_kv)):
            m.vector(b + f"attn_{part}.bias", n * s.head_dim, 0.0, 0.1)
        m.vector(b + "attn_q_norm.weight", s.head_dim)
        m.vector(b + "attn_k_norm.weight", s.head_dim)
        m.vector(b + "post_attention_norm.weight", e)  # the MLP's input norm, despite its name
        if i == 0:
            m.mlp(b, norm=False)
        else:
            m.experts(b, s.n_ff_expert, shared=s.n_ff_expert, norm=False)
            m.vector(b + "exp_probs_b.bias", s.n_expert, 0.0, 0.1)


def _moe_keys(s: TinySpec) -> dict[str, object]:
    return {"expert_count": s.n_expert, "expert_used_count": s.n_expert_used, "expert_feed_forward_length": s.n_ff_expert,
            "expert_shared_feed_forward_length": s.n_ff}


# DeepSeek's multi-head latent attention: latent ranks, and each head's rope / no-rope halves
Q_RANK, KV_RANK, ROPE, NOPE = 128, 64, 32, 32


def _deepseek2(m: Blocks) -> None:  # src/models/deepseek2.cpp: MLA (k_b/v_b split), a dense lead block, experts
    s, e, h = m.spec, m.spec.n_embd, m.spec.n_head
    for i, b in m.each():
        m.vector(b + "attn_norm.weight", e)
        m.vector(b + "attn_q_a_norm.weight", Q_RANK)
        m.vector(b + "attn_kv_a_norm.weight", KV_RANK)
        m.matrix(b + "attn_q_a.weight", "attn_q_a", Q_RANK, e)
        m.matrix(b + "attn_q_b.weight", "attn_q_b", h * (NOPE + ROPE), Q_RANK)
        m.matrix(b + "attn_kv_a_mqa.weight", "attn_kv_a_mqa", KV_RANK + ROPE, e)
        m.matrix(b + "attn_k_b.weight", "attn_k_b", KV_RANK, NOPE, experts=h)
        m.matrix(b + "attn_v_b.weight", "attn_v_b", s.head_dim, KV_RANK, experts=h)
        m.matrix(b + "attn_output.weight", "attn_output", e, h * s.head_dim)
        if i == 0:
            m.mlp(b)
        else:
            m.experts(b, s.n_ff_expert, shared=s.n_ff_expert)


def _ssm_keys(s: TinySpec) -> dict[str, object]:
    return {"ssm.conv_kernel": 4, "ssm.inner_size": SSM_STATE * SSM_V_HEADS, "ssm.state_size": SSM_STATE,
            "ssm.time_step_rank": SSM_V_HEADS, "ssm.group_count": SSM_K_HEADS, "full_attention_interval": 4,
            "rope.dimension_sections": [11, 11, 10, 0]}


# Blocks of the architectures built by recipe; the four below (LEGACY) keep their original
# code path and random draws, so their files stay the same.
RECIPES: dict[str, Callable[[Blocks], None]] = {
    "qwen3": _qwen3, "qwen3moe": lambda m: _qwen3(m, moe=True), "phi3": _phi3, "gemma": _llama_like,
    "gemma2": _gemma2,
    "smollm3": _llama_like, "mistral3": _llama_like, "granite": _llama_like, "olmo2": _olmo2,
    "glm4": _glm4, "cohere2": _cohere2, "granitemoe": _granitemoe, "gpt-oss": _gpt_oss, "lfm2": _lfm2,
    "qwen35": _qwen35, "gemma4": _gemma4,
    "deepseek2": _deepseek2, "nemotron_h": _nemotron_h, "granitehybrid": _granitehybrid, "glm4moe": _glm4moe, "qwen35moe": lambda m: _qwen35(m, moe=True), "qwen3next": lambda m: _qwen35(m, True, True),
}
OUTPUT_NORM = {"lfm2": "token_embd_norm.weight"}  # llama.cpp's LLM_TENSOR_OUTPUT_NORM_LFM2
LEGACY = ("llama", "qwen2", "qwen2moe", "gemma3")

# Per-architecture keys beyond the common ones (name without the "{arch}." prefix).
EXTRA_KEYS: dict[str, Callable[[TinySpec], dict[str, object]]] = {
    "granite": lambda s: {"logit_scale": 2.0, "residual_scale": 0.5, "embedding_scale": 3.0,
                          "attention.scale": 0.125},
    "granitemoe": lambda s: {"logit_scale": 2.0, "residual_scale": 0.5, "embedding_scale": 3.0,
                             "expert_count": s.n_expert, "expert_used_count": s.n_expert_used,
                             "expert_shared_feed_forward_length": s.n_ff_expert},
    "cohere2": lambda s: {"attention.layer_norm_epsilon": 1e-5, "attention.sliding_window": 16,
                          "logit_scale": 0.5},
    "qwen35": _ssm_keys,
    "deepseek2": lambda s: {"attention.q_lora_rank": Q_RANK, "attention.kv_lora_rank": KV_RANK,
                            "attention.key_length_mla": NOPE + ROPE, "attention.value_length_mla": s.head_dim,
                            "attention.key_length": KV_RANK + ROPE, "attention.value_length": KV_RANK,
                            "attention.head_count_kv": 1, "rope.dimension_count": ROPE,
                            "expert_count": s.n_expert, "expert_used_count": s.n_expert_used, "expert_shared_count": 1,
                            "expert_feed_forward_length": s.n_ff_expert, "leading_dense_block_count": 1},
    "qwen3moe": lambda s: {"expert_count": s.n_expert, "expert_used_count": s.n_expert_used,
                           "expert_feed_forward_length": s.n_ff_expert},
    "gemma2": lambda s: {"attention.sliding_window": 16, "attn_logit_softcapping": 50.0,
                         "final_logit_softcapping": 30.0},
    "granitehybrid": lambda s: _ssm2_keys(s) | {
        "logit_scale": 2.0, "residual_scale": 0.5, "embedding_scale": 3.0,
        "attention.head_count_kv": [s.n_head_kv if _lfm2_attends(i) else 0 for i in range(s.n_layer)]},
    "nemotron_h": lambda s: _ssm2_keys(s) | {
        "attention.layer_norm_epsilon": 1e-5,
        "attention.head_count_kv": [s.n_head_kv if NEMOTRON_LAYERS[i % 4] == "A" else 0 for i in range(s.n_layer)],
        "feed_forward_length": [s.n_ff if NEMOTRON_LAYERS[i % 4] == "F" else 0 for i in range(s.n_layer)]},
    "qwen35moe": lambda s: _ssm_keys(s) | _moe_keys(s),
    "qwen3next": lambda s: _ssm_keys(s) | _moe_keys(s),
    "glm4moe": lambda s: {"expert_count": s.n_expert, "expert_used_count": s.n_expert_used, "expert_shared_count": 1,
                          "expert_feed_forward_length": s.n_ff_expert, "leading_dense_block_count": 1},
    "gemma4": lambda s: {"attention.sliding_window_pattern": [(i + 1) % 4 != 0 for i in range(s.n_layer)],
                         "attention.sliding_window": 16, "embedding_length_per_layer_input": PER_LAYER,
                         "attention.key_length": s.head_dim, "attention.value_length": s.head_dim,
                         "attention.key_length_swa": s.head_dim, "attention.value_length_swa": s.head_dim,
                         "expert_count": s.n_expert, "expert_used_count": s.n_expert_used,
                         "expert_feed_forward_length": s.n_ff_expert},
    "lfm2": lambda s: {"shortconv.l_cache": 3,
                       "attention.head_count_kv": [s.n_head_kv if _lfm2_attends(i) else 0 for i in range(s.n_layer)]},
    "gpt-oss": lambda s: {"expert_count": s.n_expert, "expert_used_count": s.n_expert_used,
                          "expert_feed_forward_length": s.n_ff_expert, "attention.sliding_window": 16},
}

ARCHES = (*LEGACY, *RECIPES)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "fixtures")
    out.mkdir(parents=True, exist_ok=True)
    for arch in ARCHES:
        print(build_model(out / f"tiny-{arch}.gguf", TinySpec(arch=arch)))
