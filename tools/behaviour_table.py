"""What each behaviour pack's edit buys and costs, on one model: the behaviour table of docs/results.md.

For every pack: `direction --behaviour PACK` (layer auto), then for each scale the abliterated
and the reversed model and for each strength the steered one (`--steer`), baked into the
file's own types, each measured against the original
by `eval --behaviour PACK`'s measure (the share of probes whose greedy answers show the
behaviour), the first-token KL on the harmless validation prompts and the exact-answer task
accuracy. Edited files are made one at a time and deleted once measured; every result is kept
in OUT/PACK.json, so an interrupted run resumes where it stopped.

    python tools/behaviour_table.py MODEL -o OUT [--packs refusal,reasoning,concise]
        [--scales 0.25,0.5,1] [--steers 0.1,0.25,0.5] [--probes N] [--kl-prompts N] [--tasks N]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_abliterate.direction import prompts as P  # noqa: E402
from gguf_abliterate.formats.direction_file import load_direction  # noqa: E402
from gguf_abliterate.direction.lean import Lean, lean_of, measure_lean  # noqa: E402
from gguf_abliterate.direction.packs import PACKS, Pack, load_pack  # noqa: E402
from gguf_abliterate.evaluate.costs import EvalSettings  # noqa: E402
from gguf_abliterate.evaluate.report import evaluate_behaviour  # noqa: E402
from gguf_abliterate.evaluate.tasks import generate_tasks  # noqa: E402
from gguf_abliterate.jobs.direction import DirectionRequest, run_direction  # noqa: E402
from gguf_abliterate.jobs.edit import EditRequest, run_edit  # noqa: E402
from gguf_abliterate.runtime.llama import LlamaModel  # noqa: E402


def run_pack(model: Path, out: Path, name: str, scales: list[float], steers: list[float], probes: int | None,
             kl_prompts: int, tasks: int) -> dict[str, object]:
    """Direction, edits and measures for one pack; cached in OUT/NAME.json."""
    cache = out / f"{name}.json"
    pack = load_pack(name)
    if cache.is_file():
        result = json.loads(cache.read_text())
        if "lean" not in result:  # measured before directions recorded their lean
            result["lean"] = asdict(pack_lean(model, pack, out / f"{name}.safetensors"))
            cache.write_text(json.dumps(result, indent=1))
        return result
    assert pack.measure is not None
    direction = out / f"{name}.safetensors"
    started = time.monotonic()
    if not direction.is_file():
        run_direction(DirectionRequest(model=model, output=direction, pack=pack))
    direction_seconds = time.monotonic() - started
    runs = ([("original", 0.0)] + [(mode, s) for s in scales for mode in ("abliterate", "reverse")]
            + [("steer", s) for s in steers])
    edit_seconds: dict[str, float] = {}

    def models() -> Iterator[Path]:
        """Each model in turn, made just before it is measured; the last edit deleted."""
        made: Path | None = None
        for mode, scale in runs:
            if made is not None:
                made.unlink(missing_ok=True)
            if mode == "original":
                yield model
                continue
            made = out / f"{name}-{mode}-{scale:g}.gguf"
            t = time.monotonic()
            if mode == "steer":
                run_edit(EditRequest(input=model, output=made, direction=direction, steer=scale, force=True))
            else:
                run_edit(EditRequest(input=model, output=made, direction=direction, reverse=mode == "reverse",
                                     scale=scale, force=True))
            edit_seconds[f"{mode} {scale:g}"] = time.monotonic() - t
            yield made
        if made is not None:
            made.unlink(missing_ok=True)

    harmless = P.default_prompts("validation")[1][:kl_prompts]
    settings = EvalSettings(tasks=tuple(generate_tasks(tasks)) if tasks else ())
    chosen = list(pack.probes[:probes])
    reports = evaluate_behaviour(models(), chosen, pack.measure, pack.max_tokens, harmless, settings)
    meta = load_direction(direction).metadata
    result = {"lean": asdict(pack_lean(model, pack, direction)), "pack": name, "measure": pack.measure.describe(),
              "probes": len(chosen), "max_tokens": pack.max_tokens,
              "kl_prompts": len(harmless), "tasks": tasks, "layer": meta.get("layer"),
              "direction_seconds": round(direction_seconds), "edit_seconds": edit_seconds,
              "rows": [{"mode": mode, "scale": scale, **asdict(r)} for (mode, scale), r in zip(runs, reports)]}
    cache.write_text(json.dumps(result, indent=1))
    return result


def pack_lean(model: Path, pack: Pack, direction_path: Path) -> Lean:
    """The lean the direction file records, or (for files made before it did) measured now."""
    direction = load_direction(direction_path)
    lean = lean_of(direction)
    if lean is None:
        layer = int(direction.metadata["layer"])
        assert direction.harmless_means is not None
        with LlamaModel(model) as m:
            lean = measure_lean(m, [p.prompt for p in pack.probes], direction.vectors, layer,
                                direction.harmless_means[layer], float(direction.statistics["diff_norm"][layer]))
    return lean


def table(results: list[dict[str, object]], model: str) -> str:
    """The markdown table: one row per pack, mode and scale."""
    lines = [f"**{model}**", "",
             "| pack (measure, probes) | edit | lean | shows | accuracy / mean words | KL | tasks |",
             "|---|---|---|---|---|---|---|"]
    for res in results:
        head = f"{res['pack']} ({res['measure']}, {res['probes']}; block {res['layer']})".replace("|", "\\|")
        lean = Lean(**res["lean"])  # type: ignore[arg-type]
        for row in res["rows"]:  # type: ignore[attr-defined]
            m = row["measured"]
            edit = "original" if row["mode"] == "original" else f"{row['mode']} x{row['scale']:g}"
            detail = f"{m['correct']}/{m['total']}" if m["correct"] is not None else f"{m['mean_words']:.0f} words"
            kl = "-" if row["kl_vs_base"] is None else f"{row['kl_vs_base']:.4f}"
            acc = "-" if row["task_accuracy"] is None else f"{round(row['task_accuracy'] * res['tasks'])}/{res['tasks']}"
            where = lean.share(lean.after_steer(row["scale"]) if row["mode"] == "steer"
                               else lean.after(row["mode"] == "reverse", row["scale"]))
            lines.append(f"| {head} | {edit} | {where:.0%} | {m['shown']}/{m['total']} | {detail} | {kl} | {acc} |")
            head = ""
    kl_n = {r["kl_prompts"] for r in results}
    lines += ["", f"KL: first-token KL(original || edit) on {', '.join(map(str, kl_n))} harmless validation prompts; "
              "tasks: generated exact-answer questions (eval --tasks, seed 0), 48 tokens each; greedy answers. "
              "Lean: where the probes sit along the direction at its block, to first order, as a share of the way "
              "from the negative prompts' mean (0%) to the positive's (100%) (`direction/lean.py`)."]
    return "\n".join(lines)


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--packs", default=",".join(PACKS), show_default=True)
@click.option("--scales", default="0.25,0.5,1", show_default=True, help="Abliterate and reverse at each.")
@click.option("--steers", default="0.1,0.25,0.5", show_default=True, help="--steer at each ('' for none).")
@click.option("--probes", type=int, default=None, help="First N probes of each pack (default: all).")
@click.option("--kl-prompts", type=int, default=72, show_default=True)
@click.option("--tasks", type=int, default=32, show_default=True)
def main(model: Path, out: Path, packs: str, scales: str, steers: str, probes: int | None, kl_prompts: int,
         tasks: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results = [run_pack(model, out, name, _floats(scales), _floats(steers), probes, kl_prompts, tasks)
               for name in packs.split(",")]
    text = table(results, model.name)
    (out / "table.md").write_text(text + "\n")
    click.echo(text)


def _floats(text: str) -> list[float]:
    return [float(s) for s in text.split(",") if s.strip()]


if __name__ == "__main__":
    main()
