"""Portability, as far as a Linux machine can show it.

- The real edit (one process and worker processes), `direction` and `eval` run on tiny models
  with the Linux- and Unix-only calls removed from `os` in every process (a `sitecustomize`
  on PYTHONPATH deletes them before anything is imported), and write byte-identical outputs.
- llama.cpp's library is found in folders laid out as llama-cpp-python lays them out on
  macOS, Windows and Linux, and a missing one gets a one-line error naming what was looked for.
- The Ollama store and LM Studio's folder are found per platform.
- No module but `portable.py` uses a call that not every platform has.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, random_direction

from gguf_abliterate.errors import UserError
from gguf_abliterate.export import lmstudio, ollama
from gguf_abliterate.runtime.library import find_ggml_base, library_folders

# Functions a Mac or Windows Python lacks (preadv: some macOS builds; the rest: Windows or macOS).
REMOVED = ("copy_file_range", "pread", "pwrite", "preadv", "pwritev", "sched_getaffinity")


@pytest.fixture(scope="module")
def without_linux_calls(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An environment whose Python processes (children included) lack the REMOVED calls."""
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(
        "import os\n" + "".join(f"if hasattr(os, {n!r}): delattr(os, {n!r})\n" for n in REMOVED))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


def run_cli(args: list[str | Path], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    run = subprocess.run([sys.executable, "-m", "gguf_abliterate", *map(str, args)], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    return run


def test_the_calls_are_really_gone(without_linux_calls: dict[str, str]) -> None:
    code = f"import os; print([n for n in {REMOVED!r} if hasattr(os, n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=without_linux_calls)
    assert out.stdout.strip() == "[]"
    assert all(hasattr(os, n) for n in REMOVED)  # and this Linux has them, so both paths are compared


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_edit_without_linux_calls_is_byte_identical(jobs: str, without_linux_calls: dict[str, str],
                                                    tiny: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(256))
    outs = {}
    for label, env in (("linux", None), ("portable", without_linux_calls)):
        outs[label] = tmp_path / f"{label}.gguf"
        run_cli([tiny["llama-kquant"], outs[label], "--direction", tmp_path / "d.npy", "-j", jobs, "--verify", "-q"],
                env)
    assert outs["linux"].read_bytes() == outs["portable"].read_bytes()


def test_direction_and_eval_without_linux_calls_are_identical(without_linux_calls: dict[str, str],
                                                              tiny: dict[str, Path], tmp_path: Path) -> None:
    """Every tensor and metadata value of the direction file (safetensors writes its header from
    a hash map, so its bytes vary run to run), and every number and answer `eval` reports."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    model = tiny["llama"]
    got: dict[str, tuple[dict[str, np.ndarray], dict[str, str], list[dict[str, object]]]] = {}
    for label, env in (("linux", None), ("portable", without_linux_calls)):
        d = tmp_path / f"{label}.safetensors"
        run_cli(["direction", model, "-o", d, "--layer", "2", "-q"], env)
        edited = tmp_path / f"{label}.gguf"
        run_cli([model, edited, "--direction", d, "-q"], env)
        report = tmp_path / f"{label}.json"
        run_cli(["eval", model, edited, "-n", "2", "--max-tokens", "4", "--json", report, "-q"], env)
        with safe_open(str(d), framework="numpy") as f:
            meta = dict(f.metadata())
        # the statistics beside it: named after the file, and hashed as written (header order varies)
        assert meta.pop("statistics") == f"{label}.statistics.safetensors" and meta.pop("statistics_sha256")
        meta["statistics tensors"] = str(sorted((k, hashlib.sha256(v.tobytes()).hexdigest()) for k, v in
                                                load_file(str(tmp_path / f"{label}.statistics.safetensors")).items()))
        models = [{k: v for k, v in m.items() if k != "path"} for m in json.loads(report.read_text())["models"]]
        got[label] = (load_file(str(d)), meta, models)
    (t1, m1, e1), (t2, m2, e2) = got["linux"], got["portable"]
    assert set(t1) == set(t2) and all(np.array_equal(t1[k], t2[k], equal_nan=True) for k in t1)
    assert m1 == m2
    assert e1 == e2 and e1[1]["kl_vs_base"] is not None


@pytest.mark.parametrize("platform,files,where", [
    ("darwin", ["lib/libllama.dylib", "lib/libggml-base.dylib"], "lib/libggml-base.dylib"),
    ("darwin", ["lib/libllama.so", "lib/libggml-base.so"], "lib/libggml-base.so"),
    ("win32", ["lib/llama.dll", "lib/ggml-base.dll"], "lib/ggml-base.dll"),
    ("win32", ["bin/ggml-base.dll"], "bin/ggml-base.dll"),
    ("linux", ["lib/libllama.so", "lib/libggml-base.so", "lib/libggml-base.so.0"], "lib/libggml-base.so"),
], ids=["macos-dylib", "macos-so", "windows-lib", "windows-bin", "linux"])
def test_library_finder_per_platform(platform: str, files: list[str], where: str, tmp_path: Path) -> None:
    package = tmp_path / "llama_cpp"
    for f in files:
        (package / f).parent.mkdir(parents=True, exist_ok=True)
        (package / f).write_bytes(b"\x7fELF")
    assert find_ggml_base(library_folders(package, None), platform) == package / where


def test_library_finder_prefers_where_libllama_was_loaded(tmp_path: Path) -> None:
    """LLAMA_CPP_LIB_PATH makes llama-cpp-python load its libraries from elsewhere: so do we."""
    package, custom = tmp_path / "llama_cpp", tmp_path / "custom"
    for folder in (package / "lib", custom):
        folder.mkdir(parents=True)
        (folder / "libggml-base.so").write_bytes(b"")
    assert find_ggml_base(library_folders(package, str(custom / "libllama.so")), "linux") == custom / "libggml-base.so"


def test_library_finder_error_names_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        find_ggml_base(library_folders(tmp_path / "llama_cpp", None), "win32")
    message = str(e.value)
    assert "ggml-base.dll or libggml-base.dll" in message and str(tmp_path / "llama_cpp" / "bin") in message
    assert "\n" not in message


@pytest.mark.parametrize("platform", ["linux", "darwin", "win32"])
def test_ollama_store_per_platform(platform: str, tmp_path: Path) -> None:
    home = tmp_path / "home"
    dirs = ollama.ollama_dirs({}, home, platform)
    assert dirs[0] == home / ".ollama" / "models"
    assert (ollama.LINUX_SERVICE_STORE in dirs) == (platform == "linux")
    assert ollama.ollama_dir({}, home, platform) == home / ".ollama" / "models"  # none exists: the user's
    (home / ".ollama" / "models").mkdir(parents=True)
    assert ollama.ollama_dir({}, home, platform) == home / ".ollama" / "models"
    custom = tmp_path / "elsewhere"
    assert ollama.ollama_dir({"OLLAMA_MODELS": str(custom)}, home, platform) == custom


@pytest.mark.parametrize("layout,expected", [
    ([], ".lmstudio/models"),
    ([".lmstudio/models"], ".lmstudio/models"),
    ([".cache/lm-studio/models"], ".cache/lm-studio/models"),
    ([".lmstudio/models", ".cache/lm-studio/models"], ".lmstudio/models"),
])
def test_lmstudio_folder(layout: list[str], expected: str, tmp_path: Path) -> None:
    for d in layout:
        (tmp_path / d).mkdir(parents=True)
    assert lmstudio.lmstudio_dir({}, tmp_path) == tmp_path / expected
    assert lmstudio.lmstudio_dir({"LMSTUDIO_MODELS": "/x"}, tmp_path) == Path("/x")


# -- the scan ----------------------------------------------------------------------------------

# calls and modules that not every platform has, or that misbehave on one (os.open is text
# mode on Windows unless given O_BINARY; SIGTERM is never delivered to a handler there)
UNPORTABLE_CALLS = {
    "os": {"copy_file_range", "pread", "pwrite", "preadv", "pwritev", "sendfile", "posix_fadvise",
           "sched_getaffinity", "sched_setaffinity", "fork", "forkpty", "getuid", "geteuid", "getpgid", "setsid",
           "killpg", "mkfifo", "fchmod", "fchown", "chown", "open", "O_BINARY", "statvfs", "wait4", "getloadavg"},
    "signal": {"SIGTERM", "SIGKILL", "SIGHUP", "SIGALRM", "SIGUSR1", "SIGUSR2", "SIGCHLD", "alarm", "setitimer",
               "pthread_kill"},
}
UNPORTABLE_MODULES = {"fcntl", "resource", "termios", "pwd", "grp", "posix", "tty", "pty"}
LIBRARY_SUFFIXES = (".so", ".dylib", ".dll")


def unportable_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.attr in UNPORTABLE_CALLS.get(node.value.id, ())):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Import):
            found += [f"line {node.lineno}: import {a.name}" for a in node.names if a.name in UNPORTABLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module in UNPORTABLE_MODULES | set(UNPORTABLE_CALLS):
            names = {a.name for a in node.names}
            if node.module in UNPORTABLE_MODULES or names & UNPORTABLE_CALLS[node.module]:
                found.append(f"line {node.lineno}: from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.endswith(LIBRARY_SUFFIXES):
            found.append(f"line {node.lineno}: library file name {node.value!r}")
    return found


SOURCES = sorted(p for p in (ROOT / "gguf_abliterate").rglob("*.py") if p.name != "portable.py")


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_platform_specific_call_outside_portable(path: Path) -> None:
    assert unportable_uses(path) == []


def test_the_scan_finds_what_it_looks_for(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os, signal, fcntl\nos.pread(0, 1, 0)\nsignal.signal(signal.SIGTERM, None)\n"
                     "from os import sched_getaffinity\nLIB = 'libggml-base.so'\n")
    assert len(unportable_uses(probe)) == 5
