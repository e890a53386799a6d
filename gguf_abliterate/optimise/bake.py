"""Baking a search result's chosen trial, as `gguf-abliterate MODEL OUT --direction RESULT` does.

A trial runs exactly as an adapter, but the baked file requantizes every writer it edits into
the writer's own type. Aware rounding keeps the removed component out, yet every weight still
moves by up to half a quantization step, and on a prompt the edit only just tipped that is
enough to bring the refusal back (measured: one of 72 harmful validation prompts on both
Qwen2.5-Coder 0.5B and 1.5B, with picks whose adapters refused none). So the search confirms its
pick once more on the file the user will run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from gguf_abliterate.direction.file import load_direction
from gguf_abliterate.edit.execute import apply_edit, output_nbytes
from gguf_abliterate.edit.moments import attach_moments, given_statistics, resolve_rounding
from gguf_abliterate.edit.options import EditOptions, Rounding
from gguf_abliterate.edit.plan import plan_edit
from gguf_abliterate.edit.schedule import scheduled_edit
from gguf_abliterate.gguf_io import Model


def bake_chosen(model: Model, result: Path, out_path: Path, progress: Callable[..., Any]) -> None:
    """Write RESULT's chosen trial into `out_path` with the edit command's defaults (each
    writer in its own type, rounding `auto`): the very bytes that command would write, but as one
    file even for a split model."""
    direction = load_direction(result)
    sched = scheduled_edit(direction)
    assert sched is not None, f"{result} holds no schedule"
    given, _ = given_statistics(model, direction, result, None)
    rounding, stored = resolve_rounding(Rounding.AUTO, given, model)
    opts = EditOptions(rounding=rounding)
    plan = plan_edit(model, opts, strengths=sched.strengths, method=sched.method)
    if stored is not None:
        attach_moments(model, plan, stored)
    with progress(total=output_nbytes(model, plan), desc="baking the pick", unit="B", unit_scale=True) as bar:
        apply_edit(model, plan, sched.direction, opts, out_path, on_bytes=bar.update, merge=True,
                   schedule={"trial": sched.trial, "method": sched.method.value})
