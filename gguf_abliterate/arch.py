"""Per-architecture facts, as data: which tensors write into the residual stream, and how.

Each entry was read from llama.cpp's own graph (`src/models/<file>.cpp` in the llama.cpp that
llama-cpp-python 0.3.36 vendors) and is proven against it by tests/test_architectures.py,
which edits a tiny model of the family and reads the residual stream back through llama.cpp.

A writer is a weight whose output is added to the residual stream. When norms sit between it
and the add (`x + RMSNorm(W h) * g`, Gemma 2/3/4, OLMo 2, GLM-4), the removal projects W with
`u = g*r / ||g*r||` instead of `u = r`: RMSNorm only rescales the whole vector, so
`(g*r)^T W h = 0` gives `r^T out = 0`. Several norms in a row multiply their weights
(Gemma 4's MoE blocks: `RMSNorm(RMSNorm(W h) * g1 + ...) * g`, so `u ~ g*g1*r`).

Beware names: Qwen 3.5/3-Next, gpt-oss and GLM-4.5 call their *pre*-MLP norm
`post_attention_norm`; it normalises the MLP's input, not a writer's output, so it is no
post-norm here.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

from gguf import MODEL_ARCH_NAMES, MODEL_TENSOR

from gguf_abliterate import names
from gguf_abliterate.errors import UserError

T = MODEL_TENSOR


@dataclass(frozen=True)
class Writer:
    """One residual-stream writer and the norms between its output and the residual add,
    innermost first. `if_present` norms apply in the blocks whose file has them."""

    tensor: MODEL_TENSOR
    mixer: bool  # attention or its stand-in (linear attention, SSM, short conv); else the MLP side
    norms: tuple[MODEL_TENSOR, ...] = ()
    if_present: tuple[MODEL_TENSOR, ...] = ()
    # the llama.cpp graph node that holds this writer's whole output before any norm (its bias
    # added; for an expert stack the router-weighted sum over the chosen experts): where a search
    # trial projects the output when no adapter can carry the edit (expert stacks, biases)
    node: str = ""


ATTN = Writer(T.ATTN_OUT, True)
SSM = Writer(T.SSM_OUT, True)
CONV = Writer(T.SHORTCONV_OUTPROJ, True)
# build_moe_ffn (src/llama-graph.cpp) names its weighted sum "ffn_moe_out" in every MoE graph
EXPERTS = Writer(T.FFN_DOWN_EXP, False, node="ffn_moe_out")
MLP = (Writer(T.FFN_DOWN, False), EXPERTS, Writer(T.FFN_DOWN_SHEXP, False))
STANDARD = (ATTN, *MLP)


@dataclass(frozen=True)
class Arch:
    """What the edit needs to know about one llama.cpp architecture."""

    name: str
    graph: str  # llama.cpp's src/models/<graph>.cpp, which the entry was read from
    writers: tuple[Writer, ...] = STANDARD
    note: str = ""
    # the name llama.cpp gives each block's output (the residual stream after the block)
    residual: str = "l_out"
    # blocks where llama.cpp applies a control vector: those holding one of these (all if empty)
    steered_with: tuple[MODEL_TENSOR, ...] = ()
    # tensor roles (blk.N.<role>.weight) that mean a variant the entry does not cover, and why
    refuses: tuple[tuple[str, str], ...] = ()
    # the norm llama.cpp applies to the last residual before the output head, and whether it
    # centres the vector (LayerNorm) as well as scaling it (RMSNorm): how `explain` reads a
    # direction as words
    head_norm: MODEL_TENSOR = T.OUTPUT_NORM
    head_norm_centres: bool = False

    def norm_chain(self, block: int, writer: Writer, present: Container[str]) -> tuple[str, ...]:
        """Names of the norm weights between this writer's output and the residual add, in
        this block (required ones always; `if_present` ones where the file has them)."""
        chain = []
        for norm in writer.if_present:
            name = names.block_tensor(norm, block)
            if name in present:
                chain.append(name)
        chain += [names.block_tensor(norm, block) for norm in writer.norms]
        return tuple(chain)

    def steerable(self, n_layer: int, present: Container[str]) -> frozenset[int]:
        """The blocks whose output a llama.cpp control vector reaches."""
        return frozenset(b for b in range(n_layer) if not self.steered_with
                         or any(names.block_tensor(t, b) in present for t in self.steered_with))

    @property
    def has_norms(self) -> bool:
        """Whether any writer's output is normalised before the residual add."""
        return any(w.norms or w.if_present for w in self.writers)


_POST_NORMED = (Writer(T.ATTN_OUT, True, (T.ATTN_POST_NORM,)), Writer(T.FFN_DOWN, False, (T.FFN_POST_NORM,)))


_GEMMA4 = (
    Writer(T.ATTN_OUT, True, (T.ATTN_POST_NORM,)),
    Writer(T.FFN_DOWN, False, (T.FFN_POST_NORM,), if_present=(T.FFN_POST_NORM_1,)),
    Writer(T.FFN_DOWN_EXP, False, (T.FFN_POST_NORM_2, T.FFN_POST_NORM), node="ffn_moe_out"),
    Writer(T.PER_LAYER_PROJ, False, (T.PER_LAYER_POST_NORM,)),
)

_DELTANET = ("gated DeltaNet layers write through ssm_out; post_attention_norm is the MLP's input norm; "
             "MTP blocks are not edited")

ARCHITECTURES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("llama", "llama", note="also Mistral, Mixtral and most Llama-likes, which llama.cpp files as llama"),
        Arch("qwen2", "qwen2"),
        Arch("qwen2moe", "qwen2moe", note="shared expert gated by a per-token scalar"),
        Arch("qwen3", "qwen3"),
        Arch("qwen3moe", "qwen3moe"),
        Arch("phi3", "phi3", note="fused attn_qkv; ffn_up holds gate and up"),
        Arch("gemma", "gemma"),
        Arch("gemma2", "gemma2", _POST_NORMED),
        Arch("gemma3", "gemma3", _POST_NORMED),
        Arch("gemma4", "gemma4", _GEMMA4,
             "post-norms; MoE blocks normalise the dense MLP (post_ffw_norm_1) and the experts "
             "(post_ffw_norm_2), then their sum (post_ffw_norm); per-layer embeddings write through "
             "blk.N.proj and its post_norm; layer_output_scale scales the whole stream"),
        Arch("smollm3", "smollm3", note="no RoPE on every 4th layer; otherwise Llama"),
        Arch("mistral3", "mistral3"),
        Arch("granite", "granite", note="residual_scale multiplies each writer's output (a scalar)"),
        Arch("granitemoe", "granite-moe", note="residual_scale multiplies each writer's output (a scalar)"),
        Arch("granitehybrid", "granite-hybrid", (ATTN, SSM, *MLP), "Mamba-2 layers write through ssm_out"),
        Arch("olmo2", "olmo2", _POST_NORMED, "post-norms after attention and MLP"),
        Arch("glm4", "glm4", _POST_NORMED,
             "post-norms after attention and MLP; the NextN (MTP) block is not run and not edited"),
        Arch("glm4moe", "glm4-moe",
             note="post_attention_norm is the MLP's input norm; the NextN (MTP) block is not edited"),
        Arch("cohere2", "cohere2", note="attention and MLP in parallel on one LayerNorm",
             head_norm_centres=True),
        Arch("gpt-oss", "openai-moe", (Writer(T.ATTN_OUT, True, node="attn_out"), EXPERTS),
             "attention sinks and biases (attn_output.bias, ffn_down_exps.bias per expert); "
             "post_attention_norm is the MLP's input norm"),
        *(Arch(name, name, (ATTN, SSM, *MLP), _DELTANET) for name in ("qwen35", "qwen35moe", "qwen3next")),
        Arch("nemotron_h", "nemotron-h", (ATTN, SSM, *MLP),
             "each block is one of Mamba-2 (ssm_out), attention or MLP; its block output is "
             "nemotron_h_block_out, and its l_out (and a control vector) only exist in MLP blocks",
             residual="nemotron_h_block_out", steered_with=(T.FFN_DOWN, T.FFN_DOWN_EXP),
             refuses=(("ffn_latent_up", "a latent MoE: its experts write a smaller space that ffn_latent_up maps "
                                        "into the residual stream, and that writer is not supported yet"),)),
        Arch("lfm2", "lfm2", (ATTN, CONV, *MLP), "short-convolution layers write through shortconv.out_proj; "
             "its final norm is token_embd_norm", head_norm=T.TOKEN_EMBD_NORM),
        Arch("deepseek2", "deepseek2",
             note="multi-head latent attention writes through attn_output; the NextN (MTP) block is not edited"),
    )
}


def steerable_blocks(name: str, n_layer: int, present: Container[str]) -> frozenset[int]:
    """The blocks a llama.cpp control vector reaches in a model of architecture `name` (all of
    them for architectures the registry does not know)."""
    arch = ARCHITECTURES.get(name)
    return arch.steerable(n_layer, present) if arch else frozenset(range(n_layer))


def get_arch(name: str) -> Arch:
    """The registry entry for `name`, or a clear error saying what is missing."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        if name in MODEL_ARCH_NAMES.values():
            raise UserError(
                f"architecture {name!r} runs in llama.cpp, but gguf-abliterate does not know which of its tensors "
                f"write into the residual stream (nobody has read its graph and tested an edit against it yet); "
                f"supported: {supported}") from None
        raise UserError(f"architecture {name!r} is not one llama.cpp knows (supported: {supported})") from None
