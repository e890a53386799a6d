"""Directions from the GGUF itself: capture through llama.cpp's hook, difference of means, layer choice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from safetensors import safe_open

from gguf_abliterate.direction import prompts as P
from gguf_abliterate.formats.direction_file import load_direction
from gguf_abliterate.direction.measure import _clear_leader, agreement, difference_of_means, planned_prompts, rungs
from gguf_abliterate.evaluate.first_token import kl_divergence
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.runtime.llama import LlamaModel


def test_elimination_rungs_and_their_cost() -> None:
    """Rungs double from 2 probes to the count asked, harmless prompts in proportion (at least
    one); a count under 4 is one rung (every candidate on every prompt); the planned cost halves
    the candidates at each rung, down to two finalists."""
    assert rungs(32, 32) == [(2, 2), (4, 4), (8, 8), (16, 16), (32, 32)]
    assert rungs(20, 10) == [(2, 1), (5, 2), (10, 5), (20, 10)]
    assert rungs(4, 16) == [(2, 8), (4, 16)] and rungs(3, 3) == [(3, 3)]
    assert planned_prompts(17, 32, 32) == 17 * 4 + 8 * 4 + 4 * 8 + 2 * 16 + 2 * 32  # the better half, two finalists at least
    assert planned_prompts(5, 3, 7) == 5 * 10


def test_the_elimination_stops_only_for_a_clear_leader() -> None:
    """More prompts are not needed once the leader's paired advantage over every other
    finalist exceeds twice its standard error and its KL is within the cap by as much."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 16)
    kls = {c: np.full(16, 0.01) for c in (1, 2, 3)}
    clear = {1: base * 0.1, 2: base * 0.1 + 0.3 + rng.normal(0, 0.05, 16), 3: base}
    assert _clear_leader([1, 2, 3], clear, kls, 1.0, 0.1)
    noise = rng.normal(0, 0.05, 16)
    close = {1: base * 0.1, 2: base * 0.1 + noise - noise.mean(), 3: base}  # as good on average
    assert not _clear_leader([1, 2, 3], close, kls, 1.0, 0.1)
    assert not _clear_leader([1, 2, 3], clear, {**kls, 1: np.linspace(0.07, 0.12, 16)}, 1.0, 0.1)
    assert _clear_leader([3, 2, 1], {1: base * 0.1, 2: base * 0.1 + 0.3, 3: base + 0.5}, kls, -1.0, 0.1)  # steering: higher wins


def test_default_prompt_sets() -> None:
    bad, good = P.default_prompts("all")
    assert len(bad) >= 128 and len(good) >= 128
    assert len(set(bad)) == len(bad) and len(set(good)) == len(good) and not set(bad) & set(good)
    d_bad, v_bad = P.default_prompts("direction")[0], P.default_prompts("validation")[0]
    assert sorted(d_bad + v_bad) == sorted(bad) and not set(d_bad) & set(v_bad)
    # similar length and form, so the direction is about content, not shape
    assert abs(np.mean([len(p) for p in bad]) - np.mean([len(p) for p in good])) < 10


@pytest.mark.parametrize("fmt", ["txt", "json", "jsonl", "json-objects"])
def test_user_prompt_files(fmt: str, tmp_path: Path) -> None:
    prompts = ["first prompt", "second one", "third"]
    path = tmp_path / f"p.{fmt.split('-')[0]}"
    if fmt == "txt":
        path.write_text("\n".join(prompts[:2]) + "\n\n" + prompts[2] + "\n")
    elif fmt == "json":
        path.write_text(json.dumps(prompts))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps({"prompt": p, "id": i}) for i, p in enumerate(prompts)))
    else:
        path.write_text(json.dumps([{"prompt": p} for p in prompts]))
    assert P.load_prompts(path) == prompts


def test_capture_matches_batched_and_single(tiny: dict[str, Path]) -> None:
    """Residuals of a prompt do not depend on which other prompts share its decode."""
    prompts = ["how to bake bread", "the sky is blue", "a b c d e f g"]
    with LlamaModel(tiny["qwen2"], chat=False, n_seq=4) as m:
        batched = m.residuals(prompts)
        single = np.stack([m.residuals([p])[0] for p in prompts])
        assert batched.shape == (3, 4, 256)
        assert np.abs(batched).max() > 0
        cos = np.sum(batched * single, -1) / np.linalg.norm(batched, axis=-1) / np.linalg.norm(single, axis=-1)
        assert cos.min() > 0.999
        base = m.next_token_logprobs(prompts)
        assert np.allclose(np.exp(base).sum(axis=1), 1, atol=1e-4)
        assert kl_divergence(base, base) == pytest.approx(0, abs=1e-9)
        r = np.random.default_rng(0).normal(size=256).astype(np.float32)
        r /= np.linalg.norm(r)
        assert kl_divergence(base, m.next_token_logprobs(prompts, ablate=r)) > 1e-4
        # ablation really removes r from the residual stream it hooks
        m._ablate = r
        try:
            ablated = m.residuals(prompts)
        finally:
            m._ablate = None
        assert np.abs(ablated @ r).max() < 1e-3 * np.abs(batched @ r).max()


def test_a_shared_prefix_stands_for_every_prompt_that_shares_it(tiny: dict[str, Path]) -> None:
    """Capturing with the chat template's system turn computed once gives the residuals and
    writer statistics of computing it for every prompt (as close as llama.cpp's batching
    allows): sums over tokens count the prefix once per prompt."""
    from gguf_abliterate.quants.rounding import column_block

    ask = "Answer in one careful line, as a patient teacher would, to a curious reader: "
    prompts = [ask + p for p in ("how to bake bread", "the sky is blue", "a b c d e f g", "tell me about rivers")]
    with LlamaModel(tiny["qwen2"], n_seq=4) as m:
        got = {}
        for shared in (False, True):
            with m.mlp_inputs() as mlp, m.input_moments(column_block) as moments:
                k0 = m.forwarded
                got[shared] = (m.residuals(prompts, share_prefix=shared), mlp.means(), moments.means(),
                               moments.tokens, m.forwarded - k0)
        (r0, mlp0, mom0, tok0, fwd0), (r1, mlp1, mom1, tok1, fwd1) = got[False], got[True]
        assert fwd1 < 0.8 * fwd0  # the system turn was computed once
        assert tok1 == tok0  # ... and counted for every prompt
        cos = np.sum(r0 * r1, -1) / np.linalg.norm(r0, axis=-1) / np.linalg.norm(r1, axis=-1)
        assert cos.min() > 0.999
        assert np.abs(mlp1 - mlp0).max() <= 0.02 * np.abs(mlp0).max()
        for key in mom0:
            assert np.abs(mom1[key] - mom0[key]).max() <= 0.02 * np.abs(mom0[key]).max(), key
        with m.writer_inputs(8), pytest.raises(ValueError):  # rows kept one by one cannot be weighted
            m.residuals(prompts, share_prefix=True)


def test_difference_of_means_sign_and_norm() -> None:
    rng = np.random.default_rng(0)
    r = rng.normal(size=(3, 16))
    harmless = rng.normal(size=(20, 3, 16)).astype(np.float32)
    harmful = (rng.normal(size=(20, 3, 16)) + 4 * r).astype(np.float32)
    stats = difference_of_means(harmful, harmless)
    assert np.allclose(np.linalg.norm(stats.directions, axis=-1), 1, atol=1e-6)
    want = harmful.mean(0) - harmless.mean(0)
    assert np.allclose(stats.directions, want / np.linalg.norm(want, axis=-1, keepdims=True), atol=1e-6)
    assert (stats.separation > 2).all()  # harmful projects higher: the sign is harmful minus harmless


def test_layer_choice_by_elimination(tmp_path: Path) -> None:
    """On 10 blocks (6 candidates) and 16 scoring prompts: every candidate is scored on 2
    prompts, the better half on 4, and so on, each rung's finalists being the best of the rung
    before by the choice's own rule; the chosen block is the best finalist."""
    from support.tiny_models import CHATML, TinySpec, build_model

    model = build_model(tmp_path / "deep.gguf", TinySpec(n_layer=10, chat_template=CHATML))
    out = tmp_path / "d.safetensors"
    run = cli("direction", model, "-o", out, "--score-prompts", "16", "--max-kl", "10")
    assert run.returncode == 0, run.stderr
    d = load_direction(out)
    candidates = [int(c) for c in d.metadata["candidates"].split(",")]
    scored = dict(zip(candidates, (int(n) for n in d.metadata["scored_prompts"].split(","))))
    assert len(candidates) == 6 and set(scored.values()) <= {2, 4, 8, 16}
    finalists = [c for c in candidates if scored[c] == max(scored.values())]
    if max(scored.values()) < 16:  # stopped early: the leader was clearly ahead
        assert len(finalists) >= 1
    else:
        assert sorted(scored.values()) == [2, 2, 2, 4, 16, 16]  # 6 -> 3 -> 2 (two finalists go on to 8, then 16)
    assert "by elimination" in run.stderr and "(eliminated)" in run.stderr
    layer = int(d.metadata["layer"])
    assert layer == min(finalists, key=lambda c: (d.statistics["layer_score"][c], d.statistics["kl"][c]))
    assert "time: residuals" in run.stderr and ", probes " in run.stderr and ", layers " in run.stderr


def test_split_half_agreement_of_the_capture() -> None:
    """1 when every pair moves the same way, about 0 when the pairs are noise, and in between
    for a shared direction under noise, growing with the pairs."""
    rng = np.random.default_rng(1)
    u = rng.normal(size=(1, 3, 64))
    same = np.repeat(u, 40, axis=0)
    assert agreement(same, np.zeros_like(same), [0, 1, 2]) == pytest.approx(1.0)
    noise = rng.normal(size=(400, 3, 64))
    assert abs(agreement(noise[:200], noise[200:], [0, 1, 2])) < 0.3
    shifted = noise + 0.3 * u
    assert agreement(shifted[:40], noise[200:240], [0, 1, 2]) < agreement(shifted[:200], noise[200:], [0, 1, 2]) < 1
    assert np.isnan(agreement(same[:1], same[:1], [0]))


def test_capture_stops_once_the_direction_converged(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Two large sets that differ the same way in every pair (their last words): the capture
    stops at the first check, 32 + 32 prompts, says so, and the file records it."""
    from gguf_abliterate.direction.measure import MIN_PAIRS

    bad, good = tmp_path / "bad.txt", tmp_path / "good.txt"
    bad.write_text("\n".join(f"item {i} of the list, then zebra zebra zebra" for i in range(200)))
    good.write_text("\n".join(f"item {i} of the list, then apple apple apple" for i in range(200)))
    out = tmp_path / "d.safetensors"
    run = cli("direction", tiny["llama-chat"], "-o", out, "--harmful", bad, "--harmless", good,
              "--layer", "1")
    assert run.returncode == 0, run.stderr
    assert f"the direction converged at {MIN_PAIRS} + {MIN_PAIRS} prompts" in run.stderr
    d = load_direction(out)
    assert d.metadata["direction_prompts"] == f"{MIN_PAIRS}+{MIN_PAIRS}" and float(d.metadata["split_half"]) >= 0.98


def test_direction_command_on_tiny_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    bad, good = tmp_path / "bad.txt", tmp_path / "good.jsonl"
    bad.write_text("\n".join(f"how do i hack a {w}" for w in "abcdefgh"))
    good.write_text("\n".join(json.dumps({"prompt": f"how do i bake a {w}"}) for w in "abcdefgh"))
    out = tmp_path / "d.safetensors"
    run = cli("direction", tiny["llama"], "-o", out, "--harmful", bad, "--harmless", good, "--score-prompts", "2")
    assert run.returncode == 0, run.stderr
    assert "no chat template" in run.stderr and "<- chosen" in run.stderr
    d = load_direction(out)
    assert d.vectors.shape == (256,) and np.isclose(np.linalg.norm(d.vectors), 1, atol=1e-5)
    layer = int(d.metadata["layer"])
    assert d.metadata["architecture"] == "llama" and d.metadata["sign"] == "positive-minus-negative"
    assert d.behaviour == "refusal" and d.metadata["measure"] == "markers"
    assert d.metadata["positive_sha256"] == P.prompt_hash(P.load_prompts(bad))
    assert d.metadata["negative_sha256"] == P.prompt_hash(P.load_prompts(good))
    with safe_open(str(out), framework="numpy") as f:
        directions = f.get_tensor("directions")
        kl = f.get_tensor("kl")
    assert directions.shape == (4, 256) and np.array_equal(directions[layer], d.vectors)
    assert np.isfinite(kl[layer])
    # the direction is exactly the difference of means of the captured residuals
    with LlamaModel(tiny["llama"], chat=False) as m:
        stats = difference_of_means(m.residuals(P.split(P.load_prompts(bad), "direction")),
                                    m.residuals(P.split(P.load_prompts(good), "direction")))
    assert np.allclose(stats.directions[layer], d.vectors, atol=1e-5)
    # and it feeds the edit
    edited = tmp_path / "out.gguf"
    assert cli(tiny["llama"], edited, "--direction", out, "-q").returncode == 0
    assert Model(edited).get("abliterate.direction_layer") == str(layer)
    # no candidate within --max-kl: the least disruptive layer is taken, with a note
    run = cli("direction", tiny["llama"], "-o", out, "--harmful", bad, "--harmless", good, "--score-prompts", "2",
              "--max-kl", "0", "--force")
    assert run.returncode == 0 and "no candidate kept the KL" in run.stderr, run.stderr
    with safe_open(str(out), framework="numpy") as f:
        kl = f.get_tensor("kl")
    candidates = [int(c) for c in load_direction(out).metadata["candidates"].split(",")]
    assert int(load_direction(out).metadata["layer"]) == min(candidates, key=lambda c: kl[c])


@pytest.mark.parametrize("args,needle", [
    (["--layer", "99"], "block number 0-3"),
    (["--harmful", "EMPTY"], "no prompts"),
    (["--harmful", "LONG"], "more than the context"),
    (["-o", "x.txt"], ".npy or .safetensors"),
])
def test_direction_errors(args: list[str], needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "long.txt").write_text(("word " * 3000 + "\n") * 2)
    args = [{"EMPTY": str(tmp_path / "empty.txt"), "LONG": str(tmp_path / "long.txt")}.get(a, a) for a in args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "d.npy")]
    run = cli("direction", tiny["llama"], *args, cwd=tmp_path)
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert needle in run.stderr.strip().splitlines()[-1], run.stderr
    assert not (tmp_path / "d.npy").exists()


@pytest.mark.real
def test_direction_on_smollm2(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "d.npy"
    run = cli("direction", smollm2, "-o", out, "--layer", "15", "-q")
    assert run.returncode == 0, run.stderr
    v = np.load(out)
    assert v.shape == (576,) and np.isclose(np.linalg.norm(v), 1, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_torch_engine_agrees_with_llama_cpp(arch: str, tiny: dict[str, Path]) -> None:
    from gguf_abliterate.runtime.torch_pass import TorchModel

    prompts = ["how to bake a bread", "the sky is blue today", "i"]
    with LlamaModel(tiny[arch], chat=False) as m:
        encoded = m.encode(prompts)
        ref = m.residuals(prompts)
    got = TorchModel(Model(tiny[arch])).last_token_residuals(encoded)
    cos = np.sum(ref * got, -1) / np.linalg.norm(ref, axis=-1) / np.linalg.norm(got, axis=-1)
    assert cos.shape == (3, 4) and cos.min() >= 0.999, cos


def test_direction_command_torch_engine(tiny: dict[str, Path], tmp_path: Path) -> None:
    outs = {}
    for engine in ("llama", "torch"):
        outs[engine] = tmp_path / f"{engine}.safetensors"
        run = cli("direction", tiny["gemma3"], "-o", outs[engine], "--layer", "2", "--engine", engine, "-q")
        assert run.returncode == 0, run.stderr
    a, b = load_direction(outs["llama"]), load_direction(outs["torch"])
    assert b.metadata["engine"] == "torch" and a.metadata["engine"] == "llama"
    assert float(a.vectors @ b.vectors) >= 0.999


def test_direction_on_a_model_llama_cpp_cannot_load(tmp_path: Path) -> None:
    from test_errors import _unsupported_arch

    bad = _unsupported_arch(tmp_path / "rwkv.gguf")
    run = cli("direction", bad, "-o", tmp_path / "d.npy")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert "llama.cpp could not load this model" in run.stderr
    assert not (tmp_path / "d.npy").exists()


def test_non_finite_residuals_are_refused_with_the_blocks() -> None:
    """A model that overflows on the prompts (NaN after some block) gets an error naming the
    blocks, not a direction file full of NaN."""
    from gguf_abliterate.errors import UserError

    good = np.random.default_rng(0).normal(size=(3, 4, 8)).astype(np.float32)
    bad = good.copy()
    bad[1, 2:, 5] = np.nan
    with pytest.raises(UserError, match=r"after block\(s\) 2, 3 on these prompts"):
        difference_of_means(bad, good)
    assert np.isfinite(difference_of_means(good, good + 1).directions).all()


def test_writer_inputs_are_what_the_writers_read(tiny: dict[str, Path]) -> None:
    """Each block adds W_o x_attn + W_down x_mlp to the residual stream (llama, no biases): the
    inputs the hook keeps, multiplied by the file's own weights, account for that step."""
    path = tiny["llama-nobias"]
    f = Model(path)
    with LlamaModel(path) as m, m.writer_inputs(limit=64) as inputs:
        prompts = ["A short prompt about the sea."]
        stream = m.residuals(prompts)[0]
        n_tokens = len(m.encode(prompts)[0])
    for b in range(1, f.n_layer):
        x_attn, x_mlp = inputs.get("attn", b), inputs.get("mlp", b)
        assert x_attn is not None and x_mlp is not None
        if b < f.n_layer - 1:  # llama.cpp keeps only the output token's rows in the last block
            assert len(x_attn) == len(x_mlp) == n_tokens
        step = f.values(f"blk.{b}.attn_output.weight") @ x_attn[-1] + f.values(f"blk.{b}.ffn_down.weight") @ x_mlp[-1]
        want = stream[b] - stream[b - 1]
        assert np.linalg.norm(step - want) < 0.03 * np.linalg.norm(want), b
    with LlamaModel(path) as m, m.writer_inputs(limit=3) as small:
        m.residuals(["A short prompt about the sea.", "Another prompt, a little longer than that one."])
    assert all(len(small.get(kind, b)) == 3 for kind in ("attn", "mlp") for b in range(f.n_layer - 1))
