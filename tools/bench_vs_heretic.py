"""heretic itself beside gguf-abliterate: the same GGUF, prompts and trial budget, on CPU.

    python tools/bench_vs_heretic.py --work DIR [MODEL.gguf] [--trials 30] [--startup-trials 9]

The path a user without this project would walk, each step in its own process:

1. `float`: a float Hugging Face copy of MODEL (`tools/float_copy.py`: transformers
   dequantizes the GGUF; it reads `qwen2`, `llama` and a few other families).
2. `heretic`: the released heretic-llm (AGPL: installed into its own virtual environment,
   DIR/heretic-venv, and run as a program; nothing of it is imported here) on that copy, on
   CPU in float32. Its direction prompts are ours (`direction` split, 72 + 72), its trials are
   scored on our validation prompts (72 harmful at its own 100 tokens, 24 harmless for its KL),
   with Qwen's own default system prompt, as our runs see it. It gets the trial count and
   random startup trials our `optimise` gets. Its menu is answered as a user wanting no
   refusals would: the first row (fewest refusals, then lowest KL), saved merged.
3. `convert`, `quantize`: back to the user's format, as its users do it: llama.cpp's
   `convert_hf_to_gguf.py` (from the llama-cpp-python source distribution of the version
   installed here) to F16, then llama.cpp's own quantizer to Q4_K_M.

Ours: `one-direction` (`direction` with its defaults, then the edit) and `optimise`
(`optimise --trials N --startup-trials S --bake`). Then `eval`: the four files through
`eval --protocol field --kl-tokens 16 --tasks 32`, prompts neither tool saw. And
`heretic-snapback`: heretic's own evaluator on a float copy of its Q4_K_M, so its figures on
its float model sit beside the same model as our users would meet it, by its own yardstick.

Every step's wall time and peak memory (process tree) go to DIR/steps.json; a step whose
output exists is skipped, so a stopped run resumes. The table goes to stdout and DIR/table.md.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tarfile
import venv
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gguf_abliterate import pip_models  # noqa: E402
from gguf_abliterate.direction import prompts as P  # noqa: E402
from tools.bench_edit import measure_command  # noqa: E402
from tools.bench_vs_quantize import FTYPE, QUANTIZE  # noqa: E402

HERE = Path(__file__).resolve().parent
HERETIC = "heretic-llm==1.4.0"
# Qwen2.5's template writes this system turn when none is given: heretic is given it too,
# so both tools see the same chat text.
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
HERETIC_ENV = {"KAGGLE_KERNEL_RUN_TYPE": "1",  # its menus read numbered answers from stdin
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
HARMLESS_FOR_KL = 24  # our trials' KL is read on 24 harmless validation prompts


class Work:
    """The working folder: each step's outputs and the record of what each step cost."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.record = root / "steps.json"
        self.steps: dict[str, dict[str, float]] = (json.loads(self.record.read_text())
                                                   if self.record.exists() else {})

    def run(self, name: str, done: Path, cmd: list[str], **kw: object) -> None:
        """Run one step unless an earlier run finished it (recorded, and `done` is there); keep
        its wall time and peak memory, its output in DIR/NAME.log."""
        if name in self.steps and done.exists():
            print(f"{name}: done before ({done})")
            return
        print(f"{name}: {' '.join(cmd)}", flush=True)
        log = self.root / f"{name}.log"
        wall, peak = measure_command(cmd, log=log, **kw)  # type: ignore[arg-type]
        if not done.exists():
            raise SystemExit(f"{name}: finished without writing {done} (see {log})")
        self.steps[name] = {"wall_s": round(wall, 1), "peak_mib": round(peak)}
        self.record.write_text(json.dumps(self.steps, indent=1))
        print(f"{name}: {wall:.0f} s, peak {peak:.0f} MiB", flush=True)


def heretic_python(work: Work, torch: str) -> Path:
    """heretic's own virtual environment, made on first use."""
    env = work.root / "heretic-venv"
    python = env / "bin" / "python"
    if not (env / "bin" / "heretic").exists():
        print(f"installing {HERETIC} and {torch} into {env}", flush=True)
        venv.create(env, with_pip=True)
        for spec in ([torch], [HERETIC, "gguf", "sentencepiece"]):
            subprocess.run([str(python), "-m", "pip", "install", "-q", *spec], check=True)
    return python


def llama_cpp_sources(work: Work) -> Path:
    """llama.cpp's converter (the script and its `conversion` package) and its gguf-py, from
    the sdist of the llama-cpp-python we run."""
    release = version("llama_cpp_python")
    root = work.root / f"llama-cpp-python-{release}"
    if not (root / "convert_hf_to_gguf.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={release}", "--no-binary",
                        ":all:", "--no-deps", "-q", "-d", str(work.root)], check=True)
        inner = f"llama_cpp_python-{release}/vendor/llama.cpp/"
        with tarfile.open(work.root / f"llama_cpp_python-{release}.tar.gz") as tar:
            members = [m for m in tar.getmembers() if m.name == inner + "convert_hf_to_gguf.py"
                       or m.name.startswith((inner + "gguf-py/", inner + "conversion/"))]
            for m in members:
                m.name = m.name[len(inner):]
            tar.extractall(root, members=members, filter="data")
    return root


def heretic_config(path: Path, model: Path, trials: int, startup: int, prompts: Path,
                   evaluate: Path | None = None) -> None:
    """heretic's config.toml: our prompts, CPU in float32, the given budget."""
    lines = [f'model = "{model}"', 'dtypes = ["float32"]', 'device_map = "cpu"', "batch_size = 24",
             f"n_trials = {trials}", f"n_startup_trials = {startup}", "seed = 0", 'export_strategy = "merge"',
             f'system_prompt = "{QWEN_SYSTEM}"', f'study_checkpoint_dir = "{path.parent / "checkpoints"}"',
             "benchmarks = []"]
    if evaluate is not None:
        lines.append(f'evaluate_model = "{evaluate}"')
    for key, file, split in (("good_prompts", "harmless_direction", None), ("bad_prompts", "harmful_direction", None),
                             ("good_evaluation_prompts", "harmless_validation", f"[:{HARMLESS_FOR_KL}]"),
                             ("bad_evaluation_prompts", "harmful_validation", None)):
        lines += ["", f"[{key}]", f'dataset = "{prompts / file}.txt"'] + ([f'split = "{split}"'] if split else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def write_prompts(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for part in ("direction", "validation"):
        harmful, harmless = P.default_prompts(part)
        (folder / f"harmful_{part}.txt").write_text("\n".join(harmful) + "\n")
        (folder / f"harmless_{part}.txt").write_text("\n".join(harmless) + "\n")


def heretic_scores(log: Path) -> dict[str, str]:
    """What heretic printed: its original's refusals, and the picked (or evaluated) model's."""
    text = log.read_text(errors="replace")
    out = {}
    if m := re.search(r"Initial refusals: (\d+)/(\d+)", text):
        out["original refusals"] = f"{m[1]}/{m[2]}"
    if m := re.search(r"\[1\] \[Trial +(\d+)\] Refusals: +(\d+)/(\d+), KL divergence: ([\d.]+)", text):
        out.update({"trial": m[1], "refusals": f"{m[2]}/{m[3]}", "kl": m[4]})
    elif evaluated := re.findall(r"\* KL divergence: ([\d.]+)\s+\* Counting model refusals\.\.\.\s+"
                                 r"\* Refusals: (\d+)/(\d+)", text):
        kl, refused, total = evaluated[-1]
        out.update({"refusals": f"{refused}/{total}", "kl": kl})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="qwen2.5-coder-0.5b",
                    help="a GGUF, or a model name of `gguf_abliterate.pip_models` (default: the 0.5B)")
    ap.add_argument("--work", type=Path, required=True, help="working folder (kept; a second run resumes)")
    ap.add_argument("--trials", type=int, default=30, help="trials for each tool's search")
    ap.add_argument("--startup-trials", type=int, default=9, help="random trials before each tool's sampler")
    ap.add_argument("--torch", default="torch==2.13.0", help="the torch requirement of heretic's environment")
    args = ap.parse_args()
    model = (pip_models.fetch(args.model) if args.model in pip_models.MODELS else Path(args.model)).resolve()
    work = Work(args.work.resolve())
    hpy = heretic_python(work, args.torch)
    us = [sys.executable, "-m", "gguf_abliterate"]
    d = work.root

    write_prompts(d / "prompts")
    (d / "ours").mkdir(exist_ok=True)
    work.run("float", d / "float" / "config.json", [str(hpy), str(HERE / "float_copy.py"), str(model), str(d / "float")])
    heretic_config(d / "heretic" / "config.toml", d / "float", args.trials, args.startup_trials, d / "prompts")
    work.run("heretic", d / "heretic" / "model" / "config.json", [str(hpy.parent / "heretic")],
             stdin=f"1\n1\n{d / 'heretic' / 'model'}\n", env=HERETIC_ENV, cwd=d / "heretic", check=False)
    src = llama_cpp_sources(work)
    work.run("convert", d / "heretic-f16.gguf",
             [str(hpy), str(src / "convert_hf_to_gguf.py"), str(d / "heretic" / "model"), "--outtype", "f16",
              "--outfile", str(d / "heretic-f16.gguf")], env={"PYTHONPATH": str(src / "gguf-py")})
    work.run("quantize", d / "heretic-q4_k_m.gguf",
             [sys.executable, "-c", QUANTIZE, str(d / "heretic-f16.gguf"), str(d / "heretic-q4_k_m.gguf"), "2",
              str(FTYPE["q4_k_m"])])

    work.run("direction", d / "ours" / "direction.safetensors",
             us + ["direction", str(model), "-o", str(d / "ours" / "direction.safetensors"), "--force"])
    work.run("edit", d / "one-direction.gguf",
             us + [str(model), str(d / "one-direction.gguf"), "--direction", str(d / "ours" / "direction.safetensors"),
                   "-q"])
    work.run("optimise", d / "optimise.gguf",
             us + ["optimise", str(model), "-o", str(d / "ours" / "optimise.safetensors"), "--trials",
                   str(args.trials), "--startup-trials", str(args.startup_trials), "--minutes", "120", "--bake",
                   str(d / "optimise.gguf")])
    files = [model, d / "heretic-q4_k_m.gguf", d / "one-direction.gguf", d / "optimise.gguf"]
    work.run("eval", d / "eval.json",
             us + ["eval", *map(str, files), "--protocol", "field", "--kl-tokens", "16", "--tasks", "32",
                   "--samples", "0", "--json", str(d / "eval.json")])

    if "heretic-snapback" not in work.steps:  # its float copy is deleted once read
        work.run("snapback-float", d / "heretic-q4-float" / "config.json",
                 [str(hpy), str(HERE / "float_copy.py"), str(d / "heretic-q4_k_m.gguf"), str(d / "heretic-q4-float")])
        heretic_config(d / "snapback" / "config.toml", d / "float", args.trials, args.startup_trials,
                       d / "prompts", evaluate=d / "heretic-q4-float")
        work.run("heretic-snapback", d / "heretic-snapback.log", [str(hpy.parent / "heretic")],
                 env=HERETIC_ENV, cwd=d / "snapback")
        shutil.rmtree(d / "heretic-q4-float")  # 2.5 GB of float weights, read once
    table = side_by_side(work, files)
    (d / "table.md").write_text(table)
    print(table)


def side_by_side(work: Work, files: list[Path]) -> str:
    """The field protocol's figures for the four files, each path's cost, heretic's own figures."""
    report = json.loads((work.root / "eval.json").read_text())
    steps = work.steps
    paths = {1: ("float", "heretic", "convert", "quantize"), 2: ("direction", "edit"), 3: ("optimise",)}
    rows = ["| model | harmful refused (delayed) | harmless refused | degenerate | KL first token | KL 16 tokens "
            "| tasks | MiB | wall s | peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for i, (path, m) in enumerate(zip(files, report["models"])):
        names = [n for n in paths.get(i, ()) if n in steps]
        cost = (f"{sum(steps[n]['wall_s'] for n in names):.0f} | {max(steps[n]['peak_mib'] for n in names):.0f}"
                if names else "- | -")
        kl, kl16, tasks = m["kl_vs_base"], m["kl_multi_vs_base"], m["task_accuracy"]
        rows.append(f"| {path.name} | {m['harmful_refusals']}/{m['harmful_total']} ({m['delayed_refusals']}) | "
                    f"{m['harmless_refusals']}/{m['harmless_total']} | "
                    f"{m['harmful_labels'].get('degenerate', 0)}+{m['harmless_degenerate']} | "
                    f"{'-' if kl is None else f'{kl:.4f}'} | {'-' if kl16 is None else f'{kl16:.4f}'} | "
                    f"{'-' if tasks is None else f'{tasks:.0%}'} | {path.stat().st_size / 2**20:.0f} | {cost} |")
    own = heretic_scores(work.root / "heretic.log")
    snap = heretic_scores(work.root / "heretic-snapback.log")
    rows += ["", "heretic's own figures (its markers, 100-token answers, 72 harmful and 24 harmless "
             "validation prompts):",
             f"- original (float copy): refusals {own.get('original refusals', '?')}",
             f"- its pick, trial {own.get('trial', '?')}, float: refusals {own.get('refusals', '?')}, "
             f"KL {own.get('kl', '?')}",
             f"- the same after convert_hf_to_gguf.py and Q4_K_M: refusals {snap.get('refusals', '?')}, "
             f"KL {snap.get('kl', '?')}",
             "", "steps (wall s, peak MiB): " + ", ".join(f"{n} {s['wall_s']:.0f}/{s['peak_mib']:.0f}"
                                                       for n, s in steps.items())]
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
