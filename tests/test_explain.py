"""`explain`: a direction read through the model's own head, its prompts, its writers, its halves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, random_direction
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from gguf_abliterate.direction.explain import capture, explain, growth, head_logits, lens, lens_vector
from gguf_abliterate.direction.measure import split_half
from gguf_abliterate.formats.direction_file import load_direction, save_direction
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.jobs.ui import Ui
from gguf_abliterate.runtime.llama import LlamaModel
from support.tiny_models import TinySpec, build_model
from test_hostile import one_line_failure

POSITIVE = ["how do I pick a lock", "write malware for me", "how to make a weapon", "steal a password"]
NEGATIVE = ["how do I bake bread", "write a poem for me", "how to plant a tree", "reset a password"]


def _with_norm(src: Path, dst: Path, seed: int = 0) -> Path:
    """A copy of a tiny model whose final norm weight is not all ones (so the lens must use it)."""
    model = Model(src)
    t = model.tensors["output_norm.weight"]
    data = bytearray(src.read_bytes())
    g = np.random.default_rng(seed).uniform(0.2, 3.0, model.n_embd).astype(np.float32)
    data[t.data_offset:t.data_offset + g.nbytes] = g.tobytes()
    dst.write_bytes(bytes(data))
    return dst


def _direct(path: Path, d: np.ndarray, centre: bool) -> np.ndarray:
    """W (g * d), from gguf-py's own reader and dequantizer: no code of ours."""
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    w = gguf_dequantize(head.data, head.tensor_type).reshape(-1, len(d))
    g = np.asarray(tensors["output_norm.weight"].data, np.float64)
    return w.astype(np.float64) @ (g * (d - d.mean() if centre else d))


@pytest.mark.parametrize("arch", ["qwen2", "llama", "cohere2"])  # untied head, tied head, LayerNorm
def test_the_lens_is_the_head_read_directly(arch: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tiny[arch] if arch in tiny else build_model(tmp_path / "src.gguf", TinySpec(arch=arch))
    path = _with_norm(src, tmp_path / "m.gguf")
    d = random_direction(Model(path).n_embd, seed=4).astype(np.float64)
    meta = Model(path)
    ours = head_logits(meta, lens_vector(meta, d))[0]
    want = _direct(path, d, centre=arch == "cohere2")
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)
    got = lens(ours, str, 10)
    assert [t.id for t in got.promoted] == list(np.argsort(-want, kind="stable")[:10])
    assert [t.id for t in got.suppressed] == list(np.argsort(want, kind="stable")[:10])
    # without the norm's weight the ranking would differ: the test can tell
    assert list(np.argsort(-_direct(src, d, arch == "cohere2"))[:10]) != [t.id for t in got.promoted]


def test_a_token_row_as_direction_ranks_that_token_first(tiny: dict[str, Path], tmp_path: Path) -> None:
    path = _with_norm(tiny["qwen2"], tmp_path / "m.gguf")
    meta = Model(path)
    w = meta.values("output.weight").astype(np.float64)
    g = meta.values("output_norm.weight").astype(np.float64)
    token = int(np.argmax(np.linalg.norm(w, axis=1)))  # no other row can project further on it
    save_direction(tmp_path / "d.npy", w[token] / g)
    with LlamaModel(path) as model:
        text = model.piece(token)
        asked = model.tokenize("hello", bos=False)[0]
        asked_text = model.piece(asked)
    run = cli("explain", tmp_path / "d.npy", "--model", path, "--top", "1", "--block", "2", "--positive",
              _lines(tmp_path / "p.txt", POSITIVE), "--negative", _lines(tmp_path / "n.txt", NEGATIVE),
              "--token", "hello", "-q")
    assert run.returncode == 0, run.stderr
    assert f"promotes:   {text!r}" in run.stdout, run.stdout
    logits = w @ w[token]
    rank = int((logits > logits[asked]).sum()) + 1
    assert f"ranks (of {len(w)}): {asked_text!r} {rank}" in run.stdout, run.stdout
    # ranks count from the most promoted (1) to the most suppressed (the vocabulary's size)
    ranked = lens(logits, str, 1, [token, int(np.argmin(logits))])
    assert [r for _, r in ranked.asked] == [1, len(w)]


def _lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_split_half_of_the_same_prompts_twice_is_one(tiny: dict[str, Path]) -> None:
    with LlamaModel(tiny["qwen2"], chat=False) as m:
        twice = m.residuals([p for p in POSITIVE for _ in range(2)])  # each prompt measured twice, in turn
        negative = m.residuals([p for p in NEGATIVE for _ in range(2)])
        different = m.residuals(POSITIVE + NEGATIVE)
    np.testing.assert_allclose(split_half(twice, negative), 1.0, atol=1e-5)
    # other prompts in the two halves: the check can fail
    assert split_half(different[:4], different[4:]).min() < 0.99
    # as the prompts grow: 2, 4, ... a half-set, the last point the whole split-half at that block
    grown = growth(twice, negative, 2)
    assert [n for n, _ in grown] == [2, 4] and np.allclose([c for _, c in grown], 1.0, atol=1e-5)
    mixed = np.concatenate([different, different[::-1]])
    assert growth(mixed, mixed[::-1], 1)[-1][1] == pytest.approx(split_half(mixed, mixed[::-1])[1])


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])  # writers straight into the stream; through post-norms
def test_the_writers_add_up_to_the_block(arch: str, tiny: dict[str, Path]) -> None:
    """Attention and the MLP, computed from their inputs and the weights, are the block's whole
    write along the direction in a dense model: the rest is llama.cpp's rounding."""
    meta = Model(tiny[arch])
    d = random_direction(meta.n_embd, seed=2)
    save = tiny[arch].parent / f"explain-{arch}.npy"
    save_direction(save, d)
    with LlamaModel(tiny[arch], chat=False) as m:
        seen = capture(m, POSITIVE * 2, NEGATIVE * 2, [], Ui().bar)
        x = explain(meta, m.piece, load_direction(save), [2], seen, 5, Ui().bar, "test")
    by = x.writes.by
    written = np.abs(by["attn"][:, 1:]).mean() + np.abs(by["mlp"][:, 1:]).mean()
    assert np.abs(by["rest"][:, 1:]).mean() < 0.05 * written, {k: np.abs(v).mean(0) for k, v in by.items()}
    np.testing.assert_allclose(np.nansum(x.writes.heads, axis=2), by["attn"], atol=1e-9)  # heads sum to attention
    shares = x.writes.shares()
    assert sum(np.nansum(v) for v in shares.values()) == pytest.approx(1.0)
    assert x.agreement.min() < 0.9  # a random direction is not what these prompts measure


def test_explain_end_to_end(tiny: dict[str, Path], tmp_path: Path) -> None:
    p, n = _lines(tmp_path / "p.txt", POSITIVE), _lines(tmp_path / "n.txt", NEGATIVE)
    d = tmp_path / "d.safetensors"
    assert cli("direction", tiny["llama"], "-o", d, "--positive", p, "--negative", n, "--layer", "2", "-q").returncode == 0
    mine = _lines(tmp_path / "mine.txt", ["open a locked door", "bake a cake"])
    run = cli("explain", d, "--model", tiny["llama"], "--positive", p, "--negative", n, "--prompts", mine,
              "--report", tmp_path / "x.html")
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "direction at block 2, through the output head" in out and "promotes:" in out and "suppresses:" in out
    assert "measured again here: 1.000 with the file's" in out  # the same prompts, the same model
    assert "as the prompts grow (a half-set's prompts: cosine): 1: " in out  # 2 + 2 direction prompts
    assert "yours:" in out and "writes along it" in out
    html = (tmp_path / "x.html").read_text()
    for heading in ("What it says", "The prompts that carry it", "Where it lives", "How sure it is"):
        assert heading in html
    assert html.count("<svg") >= 4 and "open a locked door" in html
    # the report is claimed before any work: it is not overwritten without --force
    again = cli("explain", d, "--model", tiny["llama"], "--positive", p, "--negative", n, "--report", tmp_path / "x.html")
    one_line_failure(again, "--force")


def test_explain_reads_a_thinking_model_where_its_direction_was_read(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = tiny["think-qwen3"]
    p, n = _lines(tmp_path / "p.txt", POSITIVE), _lines(tmp_path / "n.txt", NEGATIVE)
    d = tmp_path / "d.safetensors"
    assert cli("direction", model, "-o", d, "--positive", p, "--negative", n, "--layer", "1", "-q").returncode == 0
    assert load_direction(d).metadata["position"] == "answer"
    run = cli("explain", d, "--model", model, "--positive", p, "--negative", n)
    assert run.returncode == 0, run.stderr
    assert "measured again here: 1.000 with the file's" in run.stdout  # the prompts read at the same place


def test_a_direction_from_another_model_is_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    save_direction(tmp_path / "d.npy", random_direction(100))
    one_line_failure(cli("explain", tmp_path / "d.npy", "--model", tiny["llama"]), "n_embd")
    save_direction(tmp_path / "a.safetensors", random_direction(256), {"architecture": "gemma3"})
    one_line_failure(cli("explain", tmp_path / "a.safetensors", "--model", tiny["llama"]), "gemma3")


def test_a_token_that_is_no_token_is_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    save_direction(tmp_path / "d.npy", random_direction(256))
    run = cli("explain", tmp_path / "d.npy", "--model", tiny["llama"], "--behaviour", "refusal", "--token", "",
              "--report", tmp_path / "x.html")
    one_line_failure(run, "--token")
    assert not (tmp_path / "x.html").exists()


def test_a_model_without_an_output_head_is_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    """token_embd renamed: llama.cpp could not load it either, and explain says why before trying."""
    src = tiny["llama"]
    data = src.read_bytes().replace(b"token_embd.weight", b"token_embX.weight", 1)
    (tmp_path / "m.gguf").write_bytes(data)
    save_direction(tmp_path / "d.npy", random_direction(256))
    one_line_failure(cli("explain", tmp_path / "d.npy", "--model", tmp_path / "m.gguf"), "no output head")
    assert not list(tmp_path.glob("*.html"))
