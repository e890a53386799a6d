"""The package's shape: each stage imports only from the stages below it.

Floors, from the ground (DESIGN.md): the pure ground modules, then the codecs, GGUF files,
running models, measuring them, directions, the edit, its exports, the search, reports, the
jobs (one request -> one result per workflow) and the command line on top. Every import of a project module, at module level or inside a function, must go to the
same floor or lower, so data flows one way and a stage can be read without the ones above it.
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

FLOORS = {
    "errors": 0, "names": 0, "portable": 0, "interrupt": 0, "textfile": 0,
    "arch": 1, "zoo": 1,
    "quants": 2,
    "gguf_io": 3,
    "runtime": 4,
    "evaluate": 5,
    "direction": 6,
    "edit": 7,
    "export": 8,
    "optimise": 9,
    "report": 10,
    "jobs": 11,
    "cli": 12, "__main__": 12,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def floor(module: str) -> int:
    """The floor of `gguf_abliterate.<stage>...`; the package root itself is the version only."""
    parts = module.split(".")
    if len(parts) == 1:
        return 0
    return FLOORS[parts[1]]


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


def test_every_stage_has_a_floor() -> None:
    stages = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in SOURCES}
    assert stages - {"__init__"} == set(FLOORS)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_upward(path: Path) -> None:
    own = floor(module_name(path))
    upward = [f"line {line}: {mod} (floor {floor(mod)})" for line, mod in project_imports(path) if floor(mod) > own]
    assert not upward, f"{module_name(path)} (floor {own}) imports from above: {upward}"


def test_the_checker_sees_upward_imports(tmp_path: Path) -> None:
    bad = PACKAGE / "quants" / "_probe_upward.py"
    bad.write_text("def f():\n    from gguf_abliterate.edit.plan import plan_edit\n")
    try:
        assert [m for _, m in project_imports(bad)] == ["gguf_abliterate.edit.plan"]
        assert floor("gguf_abliterate.edit.plan") > floor(module_name(bad))
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
