"""The package's shape: two branches on a common ground, joined at the top.

- The ground: pure modules (errors, names, portability, text files, the architecture table,
  the models pip can fetch), the quant codecs, GGUF files, and our own file formats
  (direction and statistics files).
- The file branch: the edit and its exports. It reads GGUF and our formats and writes them;
  it never runs a model, so llama-cpp-python and torch stay out of an edit.
- The model branch: running models in llama.cpp, measuring them, directions.
- The search uses both, the reports show what both made, the jobs run whole workflows (one
  request -> one result), and the command line parses and prints.

`ALLOWED` is that graph: each stage and the stages it may import directly; a stage may also
import whatever those may. Every import of a project module, at module level or inside a
function, must follow it, so data flows one way and a stage can be read without the stages
that use it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gguf_abliterate"

GROUND = {"errors", "names", "portable", "interrupt", "textfile"}  # may import one another
ALLOWED: dict[str, set[str]] = {
    "arch": set(), "pip_models": set(),
    "quants": set(),
    "gguf_io": {"quants", "pip_models"},
    "formats": {"gguf_io"},
    # the file branch
    "edit": {"formats", "arch"},
    "export": {"edit"},
    # the model branch
    "runtime": {"gguf_io", "arch"},
    "evaluate": {"runtime"},
    "direction": {"evaluate", "formats"},
    # where the branches meet
    "optimise": {"direction", "export"},
    "report": {"optimise"},
    "jobs": {"report"},
    "cli": {"jobs"}, "__main__": {"cli"},
}
MODEL_BRANCH = {"runtime", "evaluate", "direction"}


def reach(stage: str) -> set[str]:
    """Every stage `stage` may import: the ground, its allowed stages and theirs, transitively."""
    seen: set[str] = set()
    todo = [stage]
    while todo:
        for s in ALLOWED.get(todo.pop(), set()) - seen:
            seen.add(s)
            todo.append(s)
    return seen | GROUND


def stage_of(module: str) -> str:
    """The stage of `gguf_abliterate.<stage>...`; the package root itself is the version only."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every gguf_abliterate module the file imports, anywhere in it."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("gguf_abliterate")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gguf_abliterate"):
            for a in node.names:  # `from gguf_abliterate import quants` imports a stage
                sub = f"{node.module}.{a.name}"
                found.append((node.lineno, sub if _is_module(sub) else node.module))
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_stage_is_in_the_graph() -> None:
    stages = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in SOURCES}
    assert stages - {"__init__"} == set(ALLOWED) | GROUND


def test_the_graph_has_no_cycle() -> None:
    assert not [s for s in ALLOWED if s in reach(s)]


def test_the_file_branch_never_reaches_the_model_branch() -> None:
    assert not (reach("export") | reach("formats")) & MODEL_BRANCH


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_graph(path: Path) -> None:
    own = stage_of(module_name(path))
    allowed = reach(own) | {own}
    wrong = [f"line {line}: {mod}" for line, mod in project_imports(path) if stage_of(mod) not in allowed]
    assert not wrong, f"{module_name(path)} ({own}) imports outside {sorted(allowed)}: {wrong}"


def test_the_checker_sees_a_wrong_import() -> None:
    bad = PACKAGE / "edit" / "_probe_wrong.py"
    bad.write_text("def f():\n    from gguf_abliterate.runtime.llama import LlamaModel\n")
    try:
        assert [m for _, m in project_imports(bad)] == ["gguf_abliterate.runtime.llama"]
        assert stage_of("gguf_abliterate.runtime.llama") not in reach(stage_of(module_name(bad)))
    finally:
        bad.unlink()


def test_the_pure_edit_path_loads_no_model_runtime(tiny: dict[str, Path], tmp_path: Path) -> None:
    """An edit, run through the command, never imports llama-cpp-python or torch."""
    np.save(tmp_path / "d.npy", np.ones(256, np.float32))
    code = (
        "import sys; from gguf_abliterate.cli import cli\n"
        "try:\n    cli(sys.argv[1:], standalone_mode=False)\n"
        "finally:\n    print(' '.join(m for m in ('llama_cpp', 'torch') if m in sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tiny["llama"]), str(tmp_path / "out.gguf"),
                          "--direction", str(tmp_path / "d.npy"), "-q"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out.gguf").is_file()
    assert run.stdout.strip() == ""
