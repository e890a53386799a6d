"""The `abliterate.*` keys an edited file records: what was done, with what, by which version."""

from __future__ import annotations

import json

from gguf_abliterate import __version__, names
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.edit.options import EditOptions, format_layers
from gguf_abliterate.edit.plan import EditPlan


def provenance(plan: EditPlan, opts: EditOptions, direction: Direction,
               schedule: dict[str, object] | None = None) -> dict[str, str | bool | int | float]:
    """The keys, in the order they are written; `schedule` describes a scheduled edit."""
    kv: dict[str, str | bool | int | float] = {
        names.MODE: "steer" if opts.steer is not None else "reverse" if opts.reverse else "abliterate",
        names.SCALE: float(opts.steer if opts.steer is not None else opts.scale),
        names.LAYERS: format_layers(plan.layers),
        names.EMBEDDINGS: names.TOKEN_EMBD in plan.edits,
        names.TENSOR_COUNT: len(plan.edits),
        names.DIRECTION_SHA256: direction.sha256,
        names.TOOL_VERSION: __version__,
    }
    if "layer" in direction.metadata:
        kv[names.DIRECTION_LAYER] = direction.metadata["layer"]
    if direction.behaviour is not None:
        kv[names.BEHAVIOUR] = direction.behaviour
    if opts.requant_type is not None:
        kv[names.REQUANT_TYPE] = opts.requant_type.name
    kv[names.ROUNDING] = opts.rounding.value
    if plan.statistics is not None:
        kv[names.STATISTICS] = plan.statistics
    if opts.size_budget is not None:
        kv[names.SIZE_BUDGET] = float(opts.size_budget)
    if schedule is not None:
        kv[names.SCHEDULE] = json.dumps(schedule)
    return kv
