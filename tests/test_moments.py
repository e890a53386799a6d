"""gptq rounding's input statistics: cached per model by `direction` and by `--rounding gptq`,
and the default rounding (`auto`) that uses them when they are there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import cli, random_direction

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.edit.moments import load_moments
from gguf_abliterate.gguf_io.model import model_digest
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants.rounding import column_block
from gguf_abliterate.runtime.llama import LlamaModel
from gguf_abliterate.zoo import sha256

WRITERS = ("attn_output", "ffn_down")


def prompt_files(tmp_path: Path) -> tuple[Path, Path]:
    bad, good = tmp_path / "bad.txt", tmp_path / "good.txt"
    bad.write_text("\n".join(f"how do i hack a {w}" for w in "abcdefgh"))
    good.write_text("\n".join(f"how do i bake a {w}" for w in "abcdefgh"))
    return bad, good


def edit(src: Path, out: Path, direction: Path, *args: str) -> Model:
    run = cli(src, out, "--direction", direction, "--embeddings", *args)
    assert run.returncode == 0, run.stderr
    return Model(out)


def writers_equal(a: Model, b: Model) -> list[bool]:
    return [np.array_equal(a.raw(f"blk.{i}.{w}.weight"), b.raw(f"blk.{i}.{w}.weight"))
            for i in range(a.n_layer) for w in WRITERS]


def test_direction_caches_the_moments_and_the_default_edit_rounds_by_them(
        tiny: dict[str, Path], tmp_path: Path, own_moments_cache: Path) -> None:
    """Before `direction`, the default edit is aware rounding (and says how to get better);
    `direction` stores the moments of its own prompt passes under the model's sha256, equal
    to what the hook sums on those prompts; after it, the default edit is gptq rounding with
    them, byte for byte what `--rounding gptq` writes, and `--rounding aware` still is aware."""
    src = tiny["llama-kquant"]
    np.save(tmp_path / "d.npy", random_direction(256, seed=4))
    d = tmp_path / "d.npy"
    before = cli(src, tmp_path / "before.gguf", "--direction", d, "--embeddings")
    assert before.returncode == 0 and "no input statistics of this model are cached" in before.stderr, before.stderr
    assert Model(tmp_path / "before.gguf").get("abliterate.rounding") == "aware"
    aware = edit(src, tmp_path / "aware.gguf", d, "--rounding", "aware")
    assert all(writers_equal(Model(tmp_path / "before.gguf"), aware))

    bad, good = prompt_files(tmp_path)
    run = cli("direction", src, "-o", tmp_path / "r.safetensors", "--harmful", bad, "--harmless", good,
              "--layer", "1")
    assert run.returncode == 0, run.stderr
    assert "cached the writers' input statistics" in run.stderr
    (cached,) = own_moments_cache.iterdir()
    assert cached.name == f"{sha256(src)}.safetensors" == f"{model_digest(Model(src))}.safetensors"
    stored = load_moments(Model(src))
    assert stored is not None and stored.source == "direction (refusal, 8 prompts)"
    with LlamaModel(src, chat=False) as m, m.input_moments(column_block) as hooked:
        m.residuals(P.split(P.load_prompts(bad), "direction"))
        m.residuals(P.split(P.load_prompts(good), "direction"))
    assert stored.tokens == hooked.tokens > 8
    for kind in ("attn", "mlp"):
        for b in range(Model(src).n_layer):
            got, want = stored.get(kind, b), hooked.get(kind, b)
            assert got is not None and want is not None and got.shape == want.shape
            assert np.allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max()), (kind, b)
            assert np.array_equal(got, got.transpose(0, 2, 1))

    after = cli(src, tmp_path / "after.gguf", "--direction", d, "--embeddings")
    assert after.returncode == 0, after.stderr
    n = Model(src).n_layer
    assert f"gptq rounding: {2 * n} of {2 * n + 1} edited tensors" in after.stderr
    assert "direction (refusal, 8 prompts)" in after.stderr
    auto = Model(tmp_path / "after.gguf")
    assert auto.get("abliterate.rounding") == "gptq"
    assert not any(writers_equal(auto, aware))
    report = json.loads(auto.get("abliterate.requant_report"))
    assert all(report[q]["leak_worst"] < 0.01 for q in ("Q4_K", "Q6_K"))
    gptq = edit(src, tmp_path / "gptq.gguf", d, "--rounding", "gptq")
    assert all(writers_equal(auto, gptq))
    assert all(writers_equal(edit(src, tmp_path / "aware2.gguf", d, "--rounding", "aware"), aware))
    # the cache is per model: another file rounds aware
    other = cli(tiny["llama"], tmp_path / "other.gguf", "--direction", d)
    assert other.returncode == 0 and "no input statistics" in other.stderr, other.stderr


def test_gptq_measures_once_and_a_cached_measurement_rounds_the_same(
        tiny: dict[str, Path], tmp_path: Path, own_moments_cache: Path) -> None:
    """`--rounding gptq` without cached moments measures and caches them; the next default
    edit uses the cache and writes the same bytes (fresh and cached moments are the same numbers)."""
    src = tiny["llama-kquant"]
    np.save(tmp_path / "d.npy", random_direction(256, seed=5))
    first = cli(src, tmp_path / "first.gguf", "--direction", tmp_path / "d.npy", "--rounding", "gptq")
    assert first.returncode == 0, first.stderr
    assert "edit --rounding gptq (64 prompts)" in first.stderr
    stored = load_moments(Model(src))
    assert stored is not None and stored.source == "edit --rounding gptq (64 prompts)"
    again = cli(src, tmp_path / "again.gguf", "--direction", tmp_path / "d.npy")
    assert again.returncode == 0 and "edit --rounding gptq (64 prompts)" in again.stderr, again.stderr
    a, b = Model(tmp_path / "first.gguf"), Model(tmp_path / "again.gguf")
    assert all(writers_equal(a, b)) and b.get("abliterate.rounding") == "gptq"


def test_a_damaged_cache_is_a_clear_error(tiny: dict[str, Path], tmp_path: Path, own_moments_cache: Path) -> None:
    src = tiny["llama-kquant"]
    (own_moments_cache / f"{sha256(src)}.safetensors").write_bytes(b"not a safetensors file")
    np.save(tmp_path / "d.npy", random_direction(256))
    run = cli(src, tmp_path / "out.gguf", "--direction", tmp_path / "d.npy")
    assert run.returncode != 0 and "damaged cached input statistics" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out.gguf").exists()
    # an adapter stores no rounded weights: it never reads the cache
    lora = cli(src, tmp_path / "a.gguf", "--direction", tmp_path / "d.npy", "--format", "lora")
    assert lora.returncode == 0, lora.stderr


def test_statistics_of_a_broken_model_blame_the_model_and_are_not_cached(
        tiny: dict[str, Path], tmp_path: Path, own_moments_cache: Path) -> None:
    """A NaN block scale in block 0's ffn_down makes llama.cpp compute NaN inputs for every
    later writer: the measurement says the model is broken, caches nothing, writes nothing,
    and a second run says the same (not that the cache is damaged)."""
    src = tmp_path / "broken.gguf"
    data = bytearray(tiny["llama-kquant"].read_bytes())
    t = Model(tiny["llama-kquant"]).tensors["blk.0.ffn_down.weight"]
    data[t.data_offset + 208 : t.data_offset + 210] = np.float16(np.nan).tobytes()  # Q6_K's d: a block's last 2 bytes
    src.write_bytes(data)
    np.save(tmp_path / "d.npy", random_direction(256))
    for _ in range(2):
        run = cli(src, tmp_path / "out.gguf", "--direction", tmp_path / "d.npy", "--rounding", "gptq")
        assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
        assert "NaN or Inf in the inputs of blk.1.attn_output.weight and 5 more" in run.stderr, run.stderr
        assert "the model file is broken" in run.stderr
        assert not (tmp_path / "out.gguf").exists() and not any(own_moments_cache.iterdir())
