"""Every GGUF key and tensor name the project reads or writes, in one place.

Standard names come from gguf-py's constants (`gguf.Keys`, `gguf.TENSOR_NAMES`), so they are
spelled as llama.cpp spells them. Keys gguf-py does not define (llama.cpp's control vectors)
and our own provenance keys (`abliterate.*`) are spelled here. Per-architecture keys are
templates with `{arch}`: fill them with `arch_key`.
"""

from __future__ import annotations

from gguf import MODEL_TENSOR, TENSOR_NAMES, Keys

# -- metadata --------------------------------------------------------------------------------
ARCHITECTURE = Keys.General.ARCHITECTURE
NAME = Keys.General.NAME
ALIGNMENT = Keys.General.ALIGNMENT
FILE_KIND = Keys.General.TYPE  # "model", "adapter", ...

BLOCK_COUNT = Keys.LLM.BLOCK_COUNT
NEXTN_LAYERS = Keys.LLM.NEXTN_PREDICT_LAYERS  # trailing MTP blocks, counted in block_count
CONTEXT_LENGTH = Keys.LLM.CONTEXT_LENGTH
CHAT_TEMPLATE = Keys.Tokenizer.CHAT_TEMPLATE
EMBEDDING_LENGTH = Keys.LLM.EMBEDDING_LENGTH
HEAD_COUNT = Keys.Attention.HEAD_COUNT
HEAD_COUNT_KV = Keys.Attention.HEAD_COUNT_KV
KEY_LENGTH = Keys.Attention.KEY_LENGTH
RMS_EPS = Keys.Attention.LAYERNORM_RMS_EPS
LAYERNORM_EPS = Keys.Attention.LAYERNORM_EPS
RESIDUAL_SCALE = Keys.LLM.RESIDUAL_SCALE  # Granite: each writer's output times this scalar
SLIDING_WINDOW = Keys.Attention.SLIDING_WINDOW
ROPE_FREQ_BASE = Keys.Rope.FREQ_BASE
ROPE_FREQ_BASE_SWA = Keys.Rope.FREQ_BASE_SWA

SPLIT_NO = Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT = Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_TENSORS = Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)

ADAPTER_TYPE = Keys.Adapter.TYPE
LORA_ALPHA = Keys.Adapter.LORA_ALPHA

# llama.cpp's control vectors (read in its `llama_control_vector_load`; gguf-py has no names)
CVEC_ARCHITECTURE = "controlvector"
CVEC_MODEL_HINT = "controlvector.model_hint"
CVEC_LAYER_COUNT = "controlvector.layer_count"


def arch_key(template: str, arch: str) -> str:
    """`{arch}.block_count` -> `llama.block_count`."""
    return template.format(arch=arch)


# -- tensors ---------------------------------------------------------------------------------
TOKEN_EMBD = TENSOR_NAMES[MODEL_TENSOR.TOKEN_EMBD] + ".weight"
OUTPUT = TENSOR_NAMES[MODEL_TENSOR.OUTPUT] + ".weight"  # absent when tied to token_embd
BLOCK_PREFIX = "blk."


def model_tensor(kind: MODEL_TENSOR, suffix: str = "weight") -> str:
    """A tensor outside the blocks: `output_norm.weight`."""
    return f"{TENSOR_NAMES[kind]}.{suffix}"


def block_tensor(kind: MODEL_TENSOR, block: int, suffix: str = "weight") -> str:
    """`blk.{block}.<kind>.<suffix>`, e.g. blk.3.attn_output.weight."""
    return f"{TENSOR_NAMES[kind].format(bid=block)}.{suffix}"


def tensor_role(name: str) -> str:
    """What a tensor is, without its block: blk.3.ffn_down.weight -> ffn_down."""
    return name.split(".")[-2] if name.startswith(BLOCK_PREFIX) else name


def lora_names(name: str) -> tuple[str, str]:
    """The adapter tensors for one weight: `<name>.lora_a`, `<name>.lora_b`."""
    return f"{name}.lora_a", f"{name}.lora_b"


def cvec_direction(block: int) -> str:
    """The control-vector tensor llama.cpp adds to the output of `block`."""
    return f"direction.{block}"


# -- our provenance keys, written into every edited file --------------------------------------
PROVENANCE_PREFIX = "abliterate."
MODE = "abliterate.mode"
SCALE = "abliterate.scale"
LAYERS = "abliterate.layers"
EMBEDDINGS = "abliterate.embeddings"
TENSOR_COUNT = "abliterate.tensor_count"
DIRECTION_SHA256 = "abliterate.direction_sha256"
DIRECTION_LAYER = "abliterate.direction_layer"
BEHAVIOUR = "abliterate.behaviour"  # the pack the direction came from (refusal, reasoning, ...)
TOOL_VERSION = "abliterate.tool_version"
REQUANT_TYPE = "abliterate.requant_type"
ROUNDING = "abliterate.rounding"
STATISTICS = "abliterate.statistics"  # the input statistics gptq rounding used: source, tokens, moments' sha256
SIZE_BUDGET = "abliterate.size_budget"  # share of the file's size the edit was allowed to add
REQUANT_REPORT = "abliterate.requant_report"
SCHEDULE = "abliterate.schedule"  # a scheduled edit (from optimise): its trial and method
