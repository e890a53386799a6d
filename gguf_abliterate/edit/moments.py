"""`--rounding gptq`: the statistics of what each edited matrix reads, measured in llama.cpp.

The input model runs the direction prompts (the package's harmful and harmless direction
halves, the validation halves stay unseen) and the runtime's hook sums, per block, the second
moments of the inputs of the attention output projection (`kqv_out`) and of the dense MLP's
down projection (`ffn_swiglu` / `ffn_geglu`) in diagonal blocks (`rounding.column_block`).
Each such matrix's edit then carries its blocks, and `rounding.keep_edit_compensated` weighs
rounding errors by them. Other edited tensors (embeddings, MoE experts, writers of other
mixers) keep aware rounding.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.edit.plan import EditPlan, TensorKind
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import rounding

PROMPTS = 32  # of each kind: a few thousand tokens, ten times the widest column block
READERS = {"attn_output": "attn", "ffn_down": "mlp"}  # writer -> the input the hook names

if TYPE_CHECKING:  # llama-cpp-python is optional: the runtime is imported only when it runs
    from gguf_abliterate.runtime.llama import InputMoments, LlamaModel


def measure_moments(m: LlamaModel, per_kind: int = PROMPTS,
                    progress: Callable[[int], None] = lambda n: None) -> InputMoments:
    """The writers' input moments of a loaded model on `per_kind` harmless and harmful
    direction prompts, eight prompts a pass."""
    bad, good = P.default_prompts("direction")
    prompts = good[:per_kind] + bad[:per_kind]
    with m.input_moments(rounding.column_block) as moments:
        for i in range(0, len(prompts), 8):
            m.next_token_logprobs(prompts[i : i + 8])
            progress(len(prompts[i : i + 8]))
    return moments


def attach_moments(model: Model, plan: EditPlan, progress: Callable[[int], None] = lambda n: None) -> int:
    """Measure the inputs of the plan's dense writers and put their moments in the plan;
    returns how many edits got them. Needs llama-cpp-python (a clear error otherwise)."""
    from gguf_abliterate.runtime.llama import LlamaModel

    with LlamaModel(model.path) as m:
        moments = measure_moments(m, PROMPTS, progress)
    count = 0
    for name, e in list(plan.edits.items()):
        hit = re.fullmatch(r"blk\.(\d+)\.(attn_output|ffn_down)\.weight", name)
        if not (e.aware and e.kind is TensorKind.MATRIX and hit):
            continue
        got = moments.get(READERS[hit[2]], int(hit[1]))
        n_in = int(model.tensors[name].shape[0])
        if got is not None and got.shape[0] * got.shape[1] == n_in and rounding.compensates(e.out_type, n_in):
            plan.edits[name] = replace(e, moments=got)
            count += 1
    return count
