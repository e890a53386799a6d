"""Ollama's store as input (with a Modelfile beside the output), LM Studio's folder as output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, random_direction

from gguf_abliterate.gguf_io import Model

TEMPLATE = "{{ if .System }}<|system|>{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>"


def _blob(store: Path, data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    (store / "blobs" / digest.replace(":", "-")).write_bytes(data)
    return digest


def make_store(store: Path, gguf: bytes, name: tuple[str, ...] = ("library", "tiny"), tag: str = "latest",
               drop_model_blob: bool = False) -> None:
    layers = [
        ("application/vnd.ollama.image.model", gguf),
        ("application/vnd.ollama.image.template", TEMPLATE.encode()),
        ("application/vnd.ollama.image.system", b"You are terse."),
        ("application/vnd.ollama.image.params", json.dumps({"stop": ["<|user|>", "<|end|>"],
                                                           "temperature": 0.7}).encode()),
    ]
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                           "digest": _blob(store, b"{}"), "size": 2},
                "layers": [{"mediaType": m, "digest": _blob(store, d), "size": len(d)} for m, d in layers]}
    if drop_model_blob:
        (store / "blobs" / manifest["layers"][0]["digest"].replace(":", "-")).unlink()
    path = store.joinpath("manifests", "registry.ollama.ai", *name, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))


def test_ollama_input_and_modelfile(tiny: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "ollama"
    make_store(store, tiny["qwen2"].read_bytes(), tag="q8")
    np.save(tmp_path / "d.npy", random_direction(256))
    out = tmp_path / "out" / "tiny-abl.gguf"
    out.parent.mkdir()
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*")}
    run = cli("--ollama", "tiny:q8", out, "--direction", tmp_path / "d.npy", env={"OLLAMA_MODELS": str(store)})
    assert run.returncode == 0, run.stderr
    assert Model(out).get("abliterate.mode") == "abliterate"
    text = (out.parent / "Modelfile").read_text()
    assert text.startswith("FROM ./tiny-abl.gguf\n")
    assert f'TEMPLATE """{TEMPLATE}"""' in text and 'SYSTEM """You are terse."""' in text
    assert 'PARAMETER stop "<|user|>"' in text and 'PARAMETER stop "<|end|>"' in text
    assert "PARAMETER temperature 0.7" in text
    assert "ollama create" in run.stderr
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in store.rglob("*")} == before  # only read


@pytest.mark.parametrize("case,needle", [
    ("missing model", "not found"),
    ("missing blob", "is missing"),
    ("not gguf", "not a GGUF file"),
])
def test_ollama_errors(case: str, needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "ollama"
    make_store(store, b"PK\x03\x04 zip" if case == "not gguf" else tiny["qwen2"].read_bytes(),
               drop_model_blob=case == "missing blob")
    np.save(tmp_path / "d.npy", random_direction(256))
    name = "nope" if case == "missing model" else "tiny"
    run = cli("--ollama", name, tmp_path / "o.gguf", "--direction", tmp_path / "d.npy",
              env={"OLLAMA_MODELS": str(store)})
    assert run.returncode != 0 and "Traceback" not in run.stderr and needle in run.stderr
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "Modelfile").exists()


def test_lmstudio_output(tiny: dict[str, Path], tmp_path: Path) -> None:
    models = tmp_path / "lms"
    np.save(tmp_path / "d.npy", random_direction(256))
    run = cli(tiny["qwen2"], "tiny-abl.gguf", "--direction", tmp_path / "d.npy", "--lmstudio", "-q",
              env={"LMSTUDIO_MODELS": str(models)}, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    placed = models / "local" / "tiny-abl" / "tiny-abl.gguf"
    assert Model(placed).get("abliterate.mode") == "abliterate"
    assert not (tmp_path / "tiny-abl.gguf").exists()
