"""The architecture registry against llama.cpp's own graphs: for each family, a tiny model
with every tensor llama.cpp expects is edited (F32 storage, every writer and the embeddings),
and the residual stream after every block, as llama.cpp computes it (through the capture
hook), must have lost its component along r. A writer missing from the registry, or a wrong
post-norm rule, leaves a component there."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, generate, random_direction
from gguf import GGMLQuantizationType as Q
from support.tiny_models import FAMILY_TEMPLATES, TEMPLATE_OF, TinySpec, build_model

from gguf_abliterate.arch import ARCHITECTURES, get_arch
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.runtime.llama import LlamaModel

PROMPTS = ["how to bake a bread", "the sky is blue today", "I is of the how"]

# Families built by recipe (tests/support/tiny_models.py), with the storage their real files use
# where it matters (untied output heads, expert biases).
SPECS = {
    "llama": TinySpec(arch="llama", output_biases=True),
    "qwen2": TinySpec(arch="qwen2", tied=False),
    "qwen2moe": TinySpec(arch="qwen2moe", tied=False),
    "gemma3": TinySpec(arch="gemma3"),
    "qwen3": TinySpec(arch="qwen3"),
    "qwen3moe": TinySpec(arch="qwen3moe", tied=False),
    "phi3": TinySpec(arch="phi3", tied=False),
    "gemma": TinySpec(arch="gemma"),
    "gemma2": TinySpec(arch="gemma2"),
    "smollm3": TinySpec(arch="smollm3"),
    "mistral3": TinySpec(arch="mistral3", tied=False),
    "granite": TinySpec(arch="granite"),
    "granitemoe": TinySpec(arch="granitemoe", types={"ffn_down_exps": Q.Q4_0}),
    "olmo2": TinySpec(arch="olmo2", tied=False),
    "glm4": TinySpec(arch="glm4", tied=False),
    "cohere2": TinySpec(arch="cohere2"),
    "gpt-oss": TinySpec(arch="gpt-oss", tied=False),
    "lfm2": TinySpec(arch="lfm2"),
    "qwen35": TinySpec(arch="qwen35"),
    "gemma4": TinySpec(arch="gemma4"),
    "glm4moe": TinySpec(arch="glm4moe", n_nextn=1),
    "qwen35moe": TinySpec(arch="qwen35moe"),
    "qwen3next": TinySpec(arch="qwen3next", tied=False),
    "nemotron_h": TinySpec(arch="nemotron_h", tied=False),
    "granitehybrid": TinySpec(arch="granitehybrid"),
    "deepseek2": TinySpec(arch="deepseek2", tied=False),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each family's tiny model, with a template in the family's chat markup."""
    d = tmp_path_factory.mktemp("arch")
    return {name: build_model(d / f"{name}.gguf", replace(spec, chat_template=FAMILY_TEMPLATES[TEMPLATE_OF[name]]))
            for name, spec in SPECS.items()}


def stream_along(path: Path, r: np.ndarray) -> np.ndarray:
    """(prompts, blocks): the residual stream after each block, along r, inside llama.cpp."""
    with LlamaModel(path, chat=False) as m:
        return m.residuals(PROMPTS).astype(np.float64) @ r


@pytest.mark.parametrize("arch", list(SPECS))
def test_edit_removes_r_from_the_stream_llama_cpp_computes(arch: str, built: dict[str, Path], tmp_path: Path) -> None:
    src = built[arch]
    model = Model(src)
    assert model.arch == arch and arch in ARCHITECTURES
    r = random_direction(model.n_embd, seed=11)
    np.save(tmp_path / "d.npy", r)
    r = r.astype(np.float64) / np.linalg.norm(r)
    before = stream_along(src, r)
    assert np.abs(before).min() > 1e-3  # the stream has a component to remove at every block

    out = tmp_path / "out.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "--embeddings", "-q")
    assert run.returncode == 0, run.stderr
    after = stream_along(out, r)
    assert np.abs(after).max() < 1e-5 * np.abs(before).max(), (np.abs(after).max(), np.abs(before).max())
    assert isinstance(generate(out, n=4), str)  # and llama.cpp generates from the edited file

    # reverse, one block (the last), embeddings left alone: earlier blocks bit for bit as
    # before; the block's own write along r grows by about 1 + s (exactly for the part its
    # unchanged input produces; the MLP then reads an input that moved a little)
    s, last = 0.5, model.n_layer - 1
    rev = tmp_path / "rev.gguf"
    run = cli(src, rev, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "--no-embeddings",
              "--reverse", "--scale", str(s), "--layers", str(last), "-q")
    assert run.returncode == 0, run.stderr
    grown = stream_along(rev, r)
    assert np.array_equal(grown[:, :last], before[:, :last])
    wrote = before[:, last] - before[:, last - 1]
    wrote_now = grown[:, last] - grown[:, last - 1]
    print("RATIO", arch, np.abs(wrote_now - (1 + s) * wrote).max() / np.abs(s * wrote).max())
    assert np.abs(wrote_now - (1 + s) * wrote).max() < 0.3 * np.abs(s * wrote).max(), (wrote, wrote_now)


def test_every_registry_entry_is_tested_here() -> None:
    assert set(ARCHITECTURES) == set(SPECS)


def test_unknown_architectures_are_refused_by_name() -> None:
    with pytest.raises(UserError, match="'rwkv7' runs in llama.cpp, but gguf-abliterate does not know"):
        get_arch("rwkv7")
    with pytest.raises(UserError, match="not one llama.cpp knows"):
        get_arch("no-such-arch")


def test_gpt_oss_experts_stay_mxfp4_and_keep_the_edit(tmp_path: Path) -> None:
    """gpt-oss stores its experts as MXFP4: the edit writes them back as MXFP4 (aware rounding
    moving codes among its 15 levels), with under 1% of the edit undone by requantization, and
    llama.cpp runs the result."""
    from test_edit import component_error, expected_values

    mx = {k: Q.MXFP4 for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
    src = build_model(tmp_path / "oss.gguf", TinySpec(arch="gpt-oss", tied=False, types=mx))
    model = Model(src)
    r = random_direction(model.n_embd, seed=12)
    np.save(tmp_path / "d.npy", r)
    r = r.astype(np.float64) / np.linalg.norm(r)
    out = tmp_path / "out.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.npy", "-q")
    assert run.returncode == 0, run.stderr
    edited = Model(out)
    for block in range(model.n_layer):
        name = f"blk.{block}.ffn_down_exps.weight"
        assert edited.tensors[name].tensor_type == Q.MXFP4
        target = expected_values(model, name, r, -1.0)
        leak = component_error(model, name, edited.values(name).astype(np.float64), target, r)
        assert leak < 0.01, (name, leak)
    assert np.abs(stream_along(out, r)).max() < 0.05 * np.abs(stream_along(src, r)).max()


@pytest.mark.parametrize("arch", ["gemma4", "qwen35", "nemotron_h", "lfm2", "gpt-oss"])
def test_the_whole_flow_runs_on_new_families(arch: str, built: dict[str, Path], tmp_path: Path) -> None:
    """direction (through llama.cpp's hook, on recurrent and per-layer-embedding graphs too),
    the edit from that file, eval, and the LoRA and control-vector exports."""
    import json

    from gguf_abliterate.formats.direction_file import load_direction

    src = built[arch]
    bad, good = tmp_path / "bad.txt", tmp_path / "good.jsonl"
    bad.write_text("\n".join(f"how do i hack a {w}" for w in "abcdefgh"))
    good.write_text("\n".join(json.dumps({"prompt": f"how do i bake a {w}"}) for w in "abcdefgh"))
    d = tmp_path / "d.safetensors"
    run = cli("direction", src, "-o", d, "--harmful", bad, "--harmless", good, "--score-prompts", "2")
    assert run.returncode == 0, run.stderr
    assert "no chat template" not in run.stderr  # prompts rendered in the family's markup
    assert load_direction(d).metadata["architecture"] == arch
    out = tmp_path / "out.gguf"
    assert (run := cli(src, out, "--direction", d, "-q")).returncode == 0, run.stderr
    run = cli("eval", src, out, "-n", "2", "--max-tokens", "4", "--json", tmp_path / "e.json", "-q")
    assert run.returncode == 0, run.stderr
    assert len(json.loads((tmp_path / "e.json").read_text())["models"]) == 2
    assert (run := cli(src, tmp_path / "a.gguf", "--direction", d, "--format", "lora", "-q")).returncode == 0, run.stderr
    model = Model(src)
    steerable = ARCHITECTURES[arch].steerable(model.n_layer, model.tensors) - {0}
    layer = int(load_direction(d).metadata["layer"])
    layer = layer if layer in steerable else min(steerable)  # nemotron_h: only its MLP blocks
    run = cli("cvector", d, tmp_path / "cv.gguf", "--model", src, "--layers", str(layer))
    assert run.returncode == 0, run.stderr


def test_nemotron_h_control_vectors_only_where_llama_cpp_applies_them(built: dict[str, Path], tmp_path: Path) -> None:
    """nemotron_h calls llama.cpp's control-vector hook only in its MLP blocks: other blocks
    are refused by name, and at an MLP block the vector shifts the stream by exactly itself."""
    from gguf import GGUFReader

    from gguf_abliterate.formats.direction_file import save_direction
    from gguf_abliterate.runtime.llama import LlamaModel

    src = built["nemotron_h"]
    rows = np.stack([random_direction(256, seed=30 + i) for i in range(4)])
    d = tmp_path / "d.safetensors"
    save_direction(d, rows[2], {"layer": "2"}, {"directions": rows, "diff_norm": np.ones(4, np.float32)})
    run = cli("cvector", d, tmp_path / "m.gguf", "--model", src, "--layers", "1")
    assert run.returncode != 0 and "only after blocks 2, 3" in run.stderr and "block(s) 1" in run.stderr
    run = cli("cvector", d, tmp_path / "cv.gguf", "--model", src)
    assert run.returncode == 0, run.stderr
    assert "blocks 2-3" in run.stderr
    reader = GGUFReader(tmp_path / "cv.gguf")
    assert sorted(t.name for t in reader.tensors) == ["direction.2", "direction.3"]
    assert reader.get_tensor(0).name == "direction.2"
    v = np.array(reader.get_tensor(0).data, np.float32)
    with LlamaModel(src, chat=False) as m:
        before = m.residuals(PROMPTS)
        m.set_control_vector({2: v})
        after = m.residuals(PROMPTS)
    assert np.abs(after[:, :2] - before[:, :2]).max() == 0
    assert np.allclose(after[:, 2] - before[:, 2], v[None, :], atol=1e-4)


def test_nemotron_h_with_a_latent_moe_is_refused_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from support import tiny_models

    plain = tiny_models.RECIPES["nemotron_h"]

    def latent(m: tiny_models.Blocks) -> None:
        plain(m)
        m.matrix("blk.2.ffn_latent_up.weight", "ffn_latent_up", 256, 128)

    monkeypatch.setitem(tiny_models.RECIPES, "nemotron_h", latent)
    src = build_model(tmp_path / "latent.gguf", TinySpec(arch="nemotron_h", tied=False))
    np.save(tmp_path / "d.npy", random_direction(256))
    run = cli(src, tmp_path / "out.gguf", "--direction", tmp_path / "d.npy")
    assert run.returncode != 0 and not (tmp_path / "out.gguf").exists()
    assert "nemotron_h model has ffn_latent_up tensors, a latent MoE" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_steered_layer_choice_keeps_to_blocks_a_control_vector_reaches(built: dict[str, Path], tmp_path: Path) -> None:
    """A generation pack the model never shows is tested by steering: on nemotron_h only its MLP
    blocks can be steered, so only they are candidates."""
    from gguf_abliterate.formats.direction_file import load_direction

    out = tmp_path / "c.safetensors"
    run = cli("direction", built["nemotron_h"], "-o", out, "--behaviour", "concise", "--score-prompts", "2")
    assert run.returncode == 0, run.stderr
    assert "candidates tested by steering" in run.stderr
    table = [line.split()[0] for line in run.stderr.splitlines() if line.strip()[:1].isdigit()]
    assert table == ["2"] and load_direction(out).metadata["layer"] == "2"


# families whose every block writes through attention and a dense MLP only (one post-norm at most)
DENSE = {"llama", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "smollm3", "mistral3", "granite", "olmo2",
         "glm4", "cohere2"}


@pytest.mark.parametrize("arch", sorted(SPECS))
def test_explain_splits_every_familys_blocks(arch: str, built: dict[str, Path]) -> None:
    """explain's writers on every family: in the dense ones attention and the MLP are the whole
    block's write along the direction (post-norms, Granite's residual scale, Cohere's parallel
    block); elsewhere the rest (experts, SSM, convolution) is what is left, and the shares add up."""
    from gguf_abliterate.direction.explain import capture, explain
    from gguf_abliterate.formats.direction_file import load_direction, save_direction
    from gguf_abliterate.jobs.ui import Ui

    meta = Model(built[arch])
    path = built[arch].with_suffix(".npy")
    save_direction(path, random_direction(meta.n_embd, seed=7))
    with LlamaModel(built[arch], chat=False) as m:
        seen = capture(m, PROMPTS * 2, [p.upper() for p in PROMPTS] * 2, [], Ui().bar)
        x = explain(meta, m.piece, load_direction(path), [1], seen, 3, Ui().bar, "test")
    by = x.writes.by
    assert len(x.lenses[1].promoted) == 3 and np.isfinite(x.split_half).all()
    assert sum(np.nansum(v) for v in x.writes.shares().values()) == pytest.approx(1.0)
    assert np.isfinite(by["rest"][:, 1:]).all()
    if arch in DENSE:
        written = np.abs(by["attn"][:, 1:]).mean() + np.abs(by["mlp"][:, 1:]).mean()
        assert np.abs(by["rest"][:, 1:]).mean() < 0.05 * written, {k: np.abs(v).mean(0) for k, v in by.items()}
