"""gptq rounding's input statistics: written by `direction` beside its output and found through
the direction file, measured (and cached) by `--rounding gptq`; the default rounding (`auto`)
uses them exactly when the edit is given them, never because of what a cache holds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from conftest import cli, random_direction

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.formats.direction_file import load_direction
from gguf_abliterate.formats.statistics_file import MEASURED, cached_measurement, load_statistics
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.gguf_io.model import model_digest
from gguf_abliterate.quants.rounding import column_block
from gguf_abliterate.runtime.llama import LlamaModel
from gguf_abliterate.pip_models import sha256

WRITERS = ("attn_output", "ffn_down")


def prompt_files(tmp_path: Path) -> tuple[Path, Path]:
    bad, good = tmp_path / "bad.txt", tmp_path / "good.txt"
    bad.write_text("\n".join(f"how do i hack a {w}" for w in "abcdefgh"))
    good.write_text("\n".join(f"how do i bake a {w}" for w in "abcdefgh"))
    return bad, good


def edit(src: Path, out: Path, direction: Path, *args: str | Path) -> Model:
    run = cli(src, out, "--direction", direction, "--embeddings", *args)
    assert run.returncode == 0, run.stderr
    return Model(out)


def writers_equal(a: Model, b: Model) -> list[bool]:
    return [np.array_equal(a.raw(f"blk.{i}.{w}.weight"), b.raw(f"blk.{i}.{w}.weight"))
            for i in range(a.n_layer) for w in WRITERS]


def test_direction_writes_the_statistics_beside_it_and_the_default_edit_rounds_by_them(
        tiny: dict[str, Path], tmp_path: Path, own_moments_cache: Path) -> None:
    """`direction -o r.safetensors` writes r.statistics.safetensors, the moments of its own
    prompt passes (what the hook sums on them), named with their sha256 in r; an edit with r
    rounds gptq by them, byte for byte what `--rounding gptq --statistics` writes, and records
    them; --rounding aware is still aware, and the cache is never written."""
    src = tiny["llama-kquant"]
    bad, good = prompt_files(tmp_path)
    r = tmp_path / "r.safetensors"
    run = cli("direction", src, "-o", r, "--harmful", bad, "--harmless", good, "--layer", "1")
    assert run.returncode == 0, run.stderr
    stats = tmp_path / "r.statistics.safetensors"
    assert f"wrote {stats}" in run.stderr and not list(own_moments_cache.iterdir())
    meta = load_direction(r).metadata
    assert meta["statistics"] == stats.name and meta["statistics_sha256"] == sha256(stats)
    stored = load_statistics(stats, Model(src))
    assert stored.source == "direction (refusal, 8 prompts)"
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

    after = cli(src, tmp_path / "after.gguf", "--direction", r, "--embeddings")
    assert after.returncode == 0, after.stderr
    n = Model(src).n_layer
    assert f"gptq rounding: {2 * n} of {2 * n + 1} edited tensors" in after.stderr
    assert "direction (refusal, 8 prompts)" in after.stderr
    auto = Model(tmp_path / "after.gguf")
    assert auto.get("abliterate.rounding") == "gptq"
    assert auto.get("abliterate.statistics") == stored.recorded()
    assert stored.recorded().startswith("direction (refusal, 8 prompts), ") and stored.measured not in stored.recorded()
    report = json.loads(auto.get("abliterate.requant_report"))
    assert all(report[q]["leak_worst"] < 0.01 for q in ("Q4_K", "Q6_K"))
    aware = edit(src, tmp_path / "aware.gguf", r, "--rounding", "aware")
    assert not any(writers_equal(auto, aware)) and aware.get("abliterate.statistics") is None
    named = edit(src, tmp_path / "named.gguf", r, "--rounding", "gptq", "--statistics", stats)
    assert all(writers_equal(auto, named))
    assert not list(own_moments_cache.iterdir())
    # the statistics belong to their model: another file refuses them, and r's record, if the
    # file beside it goes missing, is said and not used
    other = cli(tiny["llama"], tmp_path / "other.gguf", "--direction", r, "--statistics", stats)
    assert other.returncode == 1 and "input statistics of another model" in other.stderr
    stats.rename(tmp_path / "elsewhere.safetensors")
    missing = cli(src, tmp_path / "missing.gguf", "--direction", r, "--embeddings")
    assert missing.returncode == 0 and "names input statistics that cannot be used" in missing.stderr
    assert all(writers_equal(Model(tmp_path / "missing.gguf"), aware))


def test_the_cache_saves_time_and_changes_no_byte(tiny: dict[str, Path], tmp_path: Path,
                                                  own_moments_cache: Path) -> None:
    """The same command on the same files writes the same bytes whatever the cache holds: the
    default edit with a bare direction rounds aware with an empty and with a filled cache, and
    `--rounding gptq` measures (and caches) the one fixed way, then reuses the cache for the
    same bytes; a cache entry from another source is measured over."""
    src = tiny["llama-kquant"]
    d = tmp_path / "d.npy"
    np.save(d, random_direction(256, seed=5))
    empty = edit(src, tmp_path / "empty.gguf", d)
    assert empty.get("abliterate.rounding") == "aware"
    first = cli(src, tmp_path / "first.gguf", "--direction", d, "--embeddings", "--rounding", "gptq")
    assert first.returncode == 0 and MEASURED in first.stderr, first.stderr
    stored = cached_measurement(Model(src))
    assert stored is not None and stored.source == MEASURED
    edit(src, tmp_path / "filled.gguf", d)
    assert (tmp_path / "filled.gguf").read_bytes() == (tmp_path / "empty.gguf").read_bytes()
    again = edit(src, tmp_path / "again.gguf", d, "--rounding", "gptq")
    assert all(writers_equal(Model(tmp_path / "first.gguf"), again)) and again.get("abliterate.rounding") == "gptq"
    # a cache written by an older version (no model digest, another source) is not used
    (cached,) = own_moments_cache.iterdir()
    assert cached.name == f"{sha256(src)}.safetensors" == f"{model_digest(Model(src))}.safetensors"
    bad, good = prompt_files(tmp_path)
    assert cli("direction", src, "-o", tmp_path / "r.safetensors", "--harmful", bad, "--harmless", good,
               "--layer", "1").returncode == 0
    shutil.copy(tmp_path / "r.statistics.safetensors", cached)
    assert cached_measurement(Model(src)) is None
    third = edit(src, tmp_path / "third.gguf", d, "--rounding", "gptq")
    assert all(writers_equal(Model(tmp_path / "first.gguf"), third))


def test_a_damaged_cache_is_a_clear_error(tiny: dict[str, Path], tmp_path: Path, own_moments_cache: Path) -> None:
    src = tiny["llama-kquant"]
    (own_moments_cache / f"{sha256(src)}.safetensors").write_bytes(b"not a safetensors file")
    np.save(tmp_path / "d.npy", random_direction(256))
    run = cli(src, tmp_path / "out.gguf", "--direction", tmp_path / "d.npy", "--rounding", "gptq")
    assert run.returncode != 0 and "damaged cached input statistics" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out.gguf").exists()
    # the default edit and an adapter never read the cache
    for extra in ([], ["--format", "lora"]):
        other = cli(src, tmp_path / f"a{len(extra)}.gguf", "--direction", tmp_path / "d.npy", *extra)
        assert other.returncode == 0, other.stderr


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
