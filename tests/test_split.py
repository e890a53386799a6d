"""Split models (llama.cpp's gguf-split layout): in, out as the same parts, or merged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, generate, random_direction
from gguf import GGMLQuantizationType as Q
from support.tiny_models import TinySpec, build_model

from gguf_abliterate.gguf_io import GGUFFile, Model


@pytest.fixture(scope="module")
def split_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinySpec(arch="llama", types={"attn_output": Q.Q4_0, "ffn_down": Q.Q8_0}, split_max_tensors=16)
    first = build_model(tmp_path_factory.mktemp("split") / "tiny.gguf", spec)
    assert first.name == "tiny-00001-of-00003.gguf"
    return first


def test_split_in_split_out(split_model: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(256))
    src = Model(split_model)
    assert src.is_split and len(src.parts) == 3
    # any part names the model
    run = cli(split_model.with_name("tiny-00002-of-00003.gguf"), tmp_path / "out.gguf",
              "--direction", tmp_path / "d.npy", "-q", "--verify")
    assert run.returncode == 0, run.stderr
    outs = sorted(p.name for p in tmp_path.glob("out*.gguf"))
    assert outs == [f"out-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    out = Model(tmp_path / "out-00001-of-00003.gguf")
    for i, (a, b) in enumerate(zip(src.parts, out.parts)):
        assert list(a.tensors) == list(b.tensors), i
        assert b.get("split.no") == i and b.get("split.count") == 3
        assert b.get("split.tensors.count") == len(src.tensors)
    assert out.get("abliterate.mode") == "abliterate" and out.parts[1].get("abliterate.mode") is None
    edited = {f"blk.{b}.{k}.weight" for b in range(4) for k in ("attn_output", "ffn_down")}
    for name in src.tensors:
        same = np.array_equal(src.raw(name), out.raw(name))
        assert same == (name not in edited), name
    assert isinstance(generate(tmp_path / "out-00001-of-00003.gguf"), str)  # llama.cpp finds the parts


def test_merge(split_model: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(256))
    out = tmp_path / "merged.gguf"
    run = cli(split_model, out, "--direction", tmp_path / "d.npy", "--merge", "-q")
    assert run.returncode == 0, run.stderr
    merged, src = Model(out), Model(split_model)
    assert not merged.is_split and list(merged.tensors) == list(src.tensors)
    assert GGUFFile(out).get("split.count") is None
    assert isinstance(generate(out), str)


def test_split_errors(split_model: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(256))
    parts = tmp_path / "parts"
    parts.mkdir()
    for p in split_model.parent.glob("tiny-0000*-of-00003.gguf"):
        if "00003-of" not in p.name:
            (parts / p.name).write_bytes(p.read_bytes())
    run = cli(parts / "tiny-00001-of-00003.gguf", tmp_path / "out.gguf", "--direction", tmp_path / "d.npy")
    assert run.returncode != 0 and "tiny-00003-of-00003.gguf: no such file" in run.stderr
    renamed = tmp_path / "renamed.gguf"
    renamed.write_bytes(split_model.read_bytes())
    run = cli(renamed, tmp_path / "out.gguf", "--direction", tmp_path / "d.npy")
    assert run.returncode != 0 and "other parts cannot be found" in run.stderr
    (tmp_path / "o-00002-of-00003.gguf").write_bytes(b"mine")
    run = cli(split_model, tmp_path / "o.gguf", "--direction", tmp_path / "d.npy")
    assert run.returncode != 0 and "o-00002-of-00003.gguf exists" in run.stderr
    assert not (tmp_path / "o-00001-of-00003.gguf").exists()
    assert (tmp_path / "o-00002-of-00003.gguf").read_bytes() == b"mine"
    run = cli(split_model, tmp_path / "x-00001-of-00002.gguf", "--direction", tmp_path / "d.npy")
    assert run.returncode != 0 and "has 3 parts" in run.stderr
