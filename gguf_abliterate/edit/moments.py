"""Rounding by input statistics: which rounding an edit uses, and the moments its writers get.

`auto` is `gptq` exactly when the edit is given statistics of this model (the direction file
names them, or `--statistics FILE`), else `aware`; `rounding.keep_edit_compensated` then
weighs each dense writer's rounding errors by what it reads. Embeddings, MoE experts and
writers of other mixers keep aware rounding. The edited file records the statistics it used
(`abliterate.statistics`).
"""

from __future__ import annotations

import re
from dataclasses import replace

from gguf_abliterate.edit.options import Rounding
from gguf_abliterate.edit.plan import EditPlan, TensorKind
from gguf_abliterate.formats.statistics_file import READERS, StoredMoments, cached_measurement
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import rounding


def resolve_rounding(rounding: Rounding, given: StoredMoments | None,
                     model: Model) -> tuple[Rounding, StoredMoments | None]:
    """AUTO becomes GPTQ when the edit is given statistics, else AWARE; GPTQ comes with the
    given statistics, else the cached measurement (None: it must be measured)."""
    if rounding is Rounding.AUTO:
        return (Rounding.AWARE, None) if given is None else (Rounding.GPTQ, given)
    if rounding is Rounding.GPTQ:
        return rounding, given or cached_measurement(model)
    return rounding, None


def attach_moments(model: Model, plan: EditPlan, stored: StoredMoments) -> int:
    """Put the stored moments of the plan's dense writers in the plan; returns how many
    edits got them."""
    count = 0
    for name, e in list(plan.edits.items()):
        hit = re.fullmatch(r"blk\.(\d+)\.(attn_output|ffn_down)\.weight", name)
        if not (e.aware and e.kind is TensorKind.MATRIX and hit):
            continue
        got = stored.get(READERS[hit[2]], int(hit[1]))
        n_in = int(model.tensors[name].shape[0])
        if got is not None and got.shape[0] * got.shape[1] == n_in and rounding.compensates(e.out_type, n_in):
            plan.edits[name] = replace(e, moments=got)
            count += 1
    if count:
        plan.statistics = stored.recorded()
    return count
