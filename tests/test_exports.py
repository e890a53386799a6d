"""The edit as a rank-1 LoRA adapter: llama.cpp applies it and gets the float edit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, random_direction

from gguf_abliterate.gguf_io import GGUFFile
from gguf_abliterate.measure import kl_divergence


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
