"""Per-architecture facts, as data: which tensors write into the residual stream, and how.

Every supported architecture writes into the residual stream through the same tensor names
(`attn_output`, `ffn_down`, and for mixture-of-experts `ffn_down_exps` / `ffn_down_shexp`),
plus `token_embd`. What differs is whether a norm sits between a writer and the residual
add: Gemma 2/3 apply `RMSNorm(W h) * g` (post-norms), so the component along r is removed
by projecting W with `u = g*r / ||g*r||` instead of `u = r` (RMSNorm only rescales the
whole vector, so `(g*r)^T W h = 0` gives `r^T out = 0`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gguf import MODEL_TENSOR

from gguf_abliterate import names
from gguf_abliterate.errors import UserError

# The tensors (per block) that add into the residual stream, in the order they are edited.
WRITERS = (MODEL_TENSOR.ATTN_OUT, MODEL_TENSOR.FFN_DOWN, MODEL_TENSOR.FFN_DOWN_EXP, MODEL_TENSOR.FFN_DOWN_SHEXP)


@dataclass(frozen=True)
class Arch:
    """What the edit needs to know about one llama.cpp architecture."""

    name: str
    # writer -> the norm applied to its output before the residual add
    post_norms: dict[MODEL_TENSOR, MODEL_TENSOR] = field(default_factory=dict)

    def post_norm(self, block: int, writer: MODEL_TENSOR) -> str | None:
        """Name of the norm weight applied after this writer in this block, if any."""
        norm = self.post_norms.get(writer)
        return names.block_tensor(norm, block) if norm is not None else None


_GEMMA_POST_NORMS = {MODEL_TENSOR.ATTN_OUT: MODEL_TENSOR.ATTN_POST_NORM,
                     MODEL_TENSOR.FFN_DOWN: MODEL_TENSOR.FFN_POST_NORM}

ARCHITECTURES: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("llama"),  # also Mistral and most Llama-likes, which llama.cpp files as "llama"
        Arch("qwen2"),
        Arch("qwen2moe"),
        Arch("qwen3"),
        Arch("qwen3moe"),
        Arch("phi3"),
        Arch("gemma"),
        Arch("gemma2", _GEMMA_POST_NORMS),
        Arch("gemma3", _GEMMA_POST_NORMS),
    )
}


def get_arch(name: str) -> Arch:
    """The registry entry for `name`, or a clear error listing what is supported."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UserError(f"architecture {name!r} is not supported (supported: {supported})") from None
