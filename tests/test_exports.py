"""The edit as a rank-1 LoRA adapter: llama.cpp applies it and gets the float edit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, random_direction

from gguf_abliterate.evaluate.first_token import kl_divergence
from gguf_abliterate.gguf_io import GGUFFile


def _logprobs(model: Path, lora: Path | None, prompts: list[str]) -> np.ndarray:
    import llama_cpp

    llm = llama_cpp.Llama(str(model), lora_path=None if lora is None else str(lora), n_ctx=128, n_threads=2,
                          verbose=False, logits_all=True)
    try:
        out = []
        for p in prompts:
            llm.reset()
            toks = llm.tokenize(p.encode())
            llm.eval(toks)
            logits = np.array(llm.scores[len(toks) - 1], dtype=np.float64)
            out.append(logits - np.logaddexp.reduce(logits))
        return np.stack(out)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_lora_adapter_reproduces_the_float_edit(arch: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tiny[arch]
    np.save(tmp_path / "d.npy", random_direction(256, seed=4))
    adapter, f32 = tmp_path / "a.gguf", tmp_path / "f32.gguf"
    run = cli(src, adapter, "--direction", tmp_path / "d.npy", "--format", "lora", "--no-embeddings")
    assert run.returncode == 0, run.stderr
    assert adapter.stat().st_size < src.stat().st_size / 20
    meta = GGUFFile(adapter)
    assert meta.get("general.type") == "adapter" and meta.get("adapter.type") == "lora"
    assert "blk.0.attn_output.weight.lora_a" in meta.tensors
    assert cli(src, f32, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "--no-embeddings",
               "-q").returncode == 0
    prompts = ["how to bake a bread", "the sky is blue today"]
    base = _logprobs(src, None, prompts)
    with_lora = _logprobs(src, adapter, prompts)
    edited = _logprobs(f32, None, prompts)
    # tiny random models put nearly all mass on one token, so compare log-probabilities directly
    # (llama.cpp quantizes activations for quantized weights, so base+adapter and the F32-stored
    # edit differ by that rounding; the change each makes must agree)
    d_lora, d_edit = (with_lora - base).ravel(), (edited - base).ravel()
    cos = float(d_lora @ d_edit / np.linalg.norm(d_lora) / np.linalg.norm(d_edit))
    print(arch, np.abs(d_lora).max(), cos)
    assert np.abs(d_lora).max() > 0.1  # the adapter does something
    assert kl_divergence(edited, with_lora) <= 1e-3
    if arch != "llama":  # llama's fixture has output biases, which an adapter cannot edit
        assert cos > 0.95


def test_control_vector_shifts_exactly_the_chosen_block(tiny: dict[str, Path], tmp_path: Path) -> None:
    from gguf_abliterate.formats.direction_file import save_direction
    from gguf_abliterate.runtime.llama import LlamaModel

    src = tiny["qwen2"]
    rows = np.stack([random_direction(256, seed=20 + i) for i in range(4)])
    save_direction(tmp_path / "d.safetensors", rows[2], {"layer": "2"},
                   {"directions": rows, "diff_norm": np.array([1, 2, 3, 4], np.float32)})
    out = tmp_path / "cv.gguf"
    run = cli("cvector", tmp_path / "d.safetensors", out, "--model", src, "--layers", "2", "--scale", "0.5")
    assert run.returncode == 0, run.stderr
    cv = GGUFFile(out)
    assert cv.get("general.architecture") == "controlvector" and cv.get("controlvector.model_hint") == "qwen2"
    assert list(cv.tensors) == ["direction.2"]
    v = np.array(cv.map[cv.tensors["direction.2"].data_offset:][:1024].view(np.float32))
    want = 0.5 * 3 * rows[2] / np.linalg.norm(rows[2])
    assert np.allclose(v, want, atol=1e-6)
    prompts = ["how to bake a bread", "the sky"]
    with LlamaModel(src, chat=False) as m:
        before = m.residuals(prompts)
        m.set_control_vector({2: v})
        after = m.residuals(prompts)
    assert np.abs(after[:, :2] - before[:, :2]).max() == 0  # earlier blocks untouched
    assert np.allclose(after[:, 2] - before[:, 2], v[None, :], atol=1e-4)  # exactly v at block 2
    run = cli("cvector", tmp_path / "d.safetensors", tmp_path / "x.gguf", "--model", src, "--layers", "0")
    assert run.returncode != 0 and "block 0" in run.stderr


# llama-nobias: a llama fixture without output biases (an adapter cannot edit biases)
@pytest.mark.parametrize("arch", ["llama-nobias", "qwen2", "gemma3"])
def test_lora_hidden_states_match_the_float_edit(arch: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    """Through the capture hook: with the adapter, the component along r of every block's
    output matches the F32-stored edit's within 1% (relative to how far the edit moved it)."""
    from gguf_abliterate.runtime.llama import LlamaModel

    src = tiny[arch]
    r = random_direction(256, seed=4)
    np.save(tmp_path / "d.npy", r)
    r = r / np.linalg.norm(r)
    adapter, f32 = tmp_path / "a.gguf", tmp_path / "f32.gguf"
    assert cli(src, adapter, "--direction", tmp_path / "d.npy", "--format", "lora", "-q").returncode == 0
    assert cli(src, f32, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "--no-embeddings",
               "-q").returncode == 0
    prompts = ["how to bake a bread", "the sky is blue today"]
    with LlamaModel(f32, chat=False) as m:
        edited = m.residuals(prompts) @ r
    with LlamaModel(src, chat=False) as m:
        base = m.residuals(prompts) @ r
        m.set_lora(adapter)
        with_lora = m.residuals(prompts) @ r
    moved = np.abs(edited - base).max()
    assert moved > 0.1
    assert np.abs(with_lora - edited).max() <= 0.01 * moved, (np.abs(with_lora - edited).max(), moved)
