"""The optimiser: its schedule math, the exactness of trials run as adapters, the stored file
(baking any trial), and the search's failure modes: Ctrl-C, a corrupt or foreign study, and
two workers sharing one study."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli
from gguf import GGMLQuantizationType as Q
from support.tiny_models import TinySpec, build_model

from gguf_abliterate.formats.direction_file import load_direction, save_schedule
from gguf_abliterate.edit.schedule import Component, EditParams, Kernel, basis, resolve
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.first_token import kl_divergence
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.optimise.adapter import TrialAdapters, apply
from gguf_abliterate.runtime.llama import LlamaModel

PROMPTS = ["Hello, how are you?", "Write a short poem about the sea.", "What is the capital of France?",
           "Explain how a bicycle works."]
FAST = ["--score-prompts", "4", "--confirm-tokens", "4", "--confirm", "2", "--startup-trials", "2", "-q"]


def test_kernel_strengths() -> None:
    k = Kernel(peak=1.2, position=5.0, edge=0.5, width=2.0)
    # 1.2 at the peak, falling linearly to 0.6 two blocks away, 0 beyond
    assert np.allclose(k.weights(9), [0, 0, 0, 0.6, 0.9, 1.2, 0.9, 0.6, 0])
    assert np.allclose(Kernel(0.0, 3, 1, 5).weights(6), 0)  # a component switched off
    assert np.allclose(Kernel(1.0, 2.5, 1.0, 0.4).weights(5), 0)  # no block within 0.4 of 2.5


def test_resolve_blends_and_orthogonalises() -> None:
    rng = np.random.default_rng(0)
    per_block, means = rng.normal(size=(6, 32)), rng.normal(size=(6, 32))
    b = basis(per_block, means)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    k = Kernel(1, 3, 1, 9)
    blended = resolve(EditParams(2.25, False, k, k), per_block, means).directions
    want = unit(0.75 * unit(per_block[2]) + 0.25 * unit(per_block[3]))
    assert np.allclose(blended, want[None, :], atol=1e-6)  # every block the same blend
    own = resolve(EditParams(None, True, k, k), per_block, means).directions
    g = means / np.linalg.norm(means, axis=1, keepdims=True)
    assert np.abs(np.sum(own * g, axis=1)).max() < 1e-6  # orthogonal to each block's harmless mean
    assert np.allclose(own, b[6:], atol=1e-6)
    p = EditParams(1.5, True, Kernel(1.1, 2, 0.2, 3), Kernel(0.0, 4, 1, 2))
    assert EditParams.from_dict(p.to_dict()) == p


def to_f32(src: Path, dst: Path) -> Path:
    """The model with every tensor F32, written by llama.cpp's own quantizer (llama-quantize)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_ALL_F32
    params.allow_requantize = True  # the source is quantized: "requantizing" to F32 only dequantizes
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) == 0
    return dst


def _schedule_file(path: Path, model: Path, trials: list[EditParams], seed: int = 0) -> Path:
    """A result file like optimise writes, with measured-like directions and the given trials."""
    m = Model(model)
    per_block, means = _random_basis(model, seed)
    chosen = resolve(trials[0], per_block, means)
    records = [{"number": i, "params": t.to_dict(), "refusal": 0.1, "kl": 0.01, "objectives": [0.1, 0.01]}
               for i, t in enumerate(trials)]
    save_schedule(path, chosen.directions, {c.value: s for c, s in chosen.strengths.items()}, per_block, means,
                  {"architecture": m.arch, "n_layer": str(m.n_layer), "n_embd": str(m.n_embd)}, records, 0)
    return path


def random_params(n_layer: int, rng: np.random.Generator, experts: bool = False) -> EditParams:
    def kernel() -> Kernel:
        return Kernel(float(rng.uniform(0.5, 1.5)), float(rng.uniform(0, n_layer - 1)), float(rng.uniform(0, 1)),
                      float(rng.uniform(1, n_layer)))

    index = None if rng.random() < 0.5 else float(rng.uniform(0, n_layer - 1))
    return EditParams(index, bool(rng.random() < 0.5), kernel(), kernel(), experts=kernel() if experts else None)


@pytest.mark.parametrize("name", ["llama-nobias", "gemma3", "smollm2"])
def test_trials_run_exactly_the_edit_a_bake_writes(name: str, tiny: dict[str, Path], smollm2: Path,
                                                   tmp_path: Path) -> None:
    """A trial's adapter inside llama.cpp computes exactly the edit that a bake with
    --requant-type f32 writes, for random trials (plain and post-norm archs).

    Exactly where the numerics allow: on the model converted whole to F32 (llama.cpp's own
    quantizer), the trial's first-token distribution is the bake's (KL <= 1e-3, same argmax).
    On a quantized file llama.cpp quantizes the activations entering every quantized matrix,
    so any perturbation, however small, shows as a KL of about 0.004 on SmolLM2 Q4_1 (the
    existing LoRA export against its F32 bake shows the same, at any strength); there the test
    only bounds the gap by what converting the model to F32 changes.
    """
    _trials_match_bakes(smollm2 if name == "smollm2" else tiny[name], tmp_path)


MXFP4_EXPERTS = {k: Q.MXFP4 for k in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")}
MOE = {"qwen3moe": TinySpec(arch="qwen3moe", tied=False),
       "gpt-oss": TinySpec(arch="gpt-oss", tied=False, types=MXFP4_EXPERTS),  # biases everywhere
       "gemma4": TinySpec(arch="gemma4"),  # experts through post_ffw_norm_2, then post_ffw_norm
       "qwen35moe": TinySpec(arch="qwen35moe"),  # and a gated shared expert
       "glm4moe": TinySpec(arch="glm4moe", n_nextn=1)}


@pytest.mark.parametrize("name", MOE)
def test_moe_trials_run_exactly_the_edit_a_bake_writes(name: str, tmp_path: Path) -> None:
    """On mixture-of-experts models a trial projects each MoE block's weighted expert sum inside
    llama.cpp's graph (and gpt-oss's biased attention output), with the experts' own strength:
    exactly the bake's edit of every expert stack, its biases and the shared expert."""
    model = build_model(tmp_path / f"{name}.gguf", MOE[name])
    adapters = TrialAdapters(Model(model), *_random_basis(model))
    assert adapters.experts and not adapters.biased
    edit = adapters.edit(resolve(random_params(Model(model).n_layer, np.random.default_rng(1), True),
                                 *_random_basis(model)))
    assert any(k.startswith("ffn_moe_out-") for k in edit.projections)
    assert not any("exps" in k for k in edit.pieces)
    _trials_match_bakes(model, tmp_path, experts=True)


def _random_basis(model: Path, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The measured-like directions and harmless means `_schedule_file` stores."""
    m = Model(model)
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(m.n_layer, m.n_embd)).astype(np.float32),
            rng.normal(size=(m.n_layer, m.n_embd)).astype(np.float32))


def _trials_match_bakes(model: Path, tmp_path: Path, experts: bool = False) -> None:
    n_layer = Model(model).n_layer
    rng = np.random.default_rng(7)
    trials = [random_params(n_layer, rng, experts) for _ in range(3)]
    result = _schedule_file(tmp_path / "edit.safetensors", model, trials)
    d = load_direction(result)
    reference = to_f32(model, tmp_path / "f32.gguf")  # the same weights, every tensor F32

    def under_trials(path: Path) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
        adapters = TrialAdapters(Model(path), d.per_block, d.harmless_means)
        with LlamaModel(path) as m:
            base = m.residuals(PROMPTS)
            out = []
            for t in trials:
                apply(m, adapters.edit(resolve(t, d.per_block, d.harmless_means)))
                out.append((m.next_token_logprobs(PROMPTS), m.residuals(PROMPTS)))
        return base, out

    base_res, exact = under_trials(reference)
    _, on_file = under_trials(model)
    with LlamaModel(model) as m:
        original = m.next_token_logprobs(PROMPTS)
    with LlamaModel(reference) as m:
        floor = kl_divergence(m.next_token_logprobs(PROMPTS), original)
    for number, ((trial_lp, trial_res), (file_lp, _)) in enumerate(zip(exact, on_file)):
        baked, baked_file = tmp_path / f"baked{number}.gguf", tmp_path / f"baked-file{number}.gguf"
        for src, dst in ((reference, baked), (model, baked_file)):
            run = cli(src, dst, "--direction", result, "--trial", number, "--requant-type", "f32", "-q")
            assert run.returncode == 0, run.stderr
        with LlamaModel(baked) as m:
            baked_lp, baked_res = m.next_token_logprobs(PROMPTS), m.residuals(PROMPTS)
        assert kl_divergence(baked_lp, trial_lp) <= 1e-3
        assert np.array_equal(baked_lp.argmax(1), trial_lp.argmax(1))
        with LlamaModel(baked_file) as m:
            assert kl_divergence(m.next_token_logprobs(PROMPTS), file_lp) <= 2 * floor + 1e-3
        # and the edit is not nothing: the component of the residual stream along each block's
        # direction moved, and the trial's is the bake's (the logits of a tiny random model are
        # too peaked to show it)
        r = resolve(trials[number], d.per_block, d.harmless_means).directions
        comp = {k: np.einsum("pld,ld->pl", v, r) for k, v in
                (("trial", trial_res), ("baked", baked_res), ("base", base_res))}
        moved = np.abs(comp["base"] - comp["baked"]).max()
        assert moved > 0.05 and np.abs(comp["trial"] - comp["baked"]).max() <= 0.01 * moved
        baked.unlink()
        baked_file.unlink()


def test_result_file_bakes_the_chosen_and_any_trial(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = tiny["llama-nobias"]
    rng = np.random.default_rng(3)
    trials = [random_params(4, rng) for _ in range(3)]
    result = _schedule_file(tmp_path / "edit.safetensors", model, trials)
    d = load_direction(result)
    assert len(d.trials) == 3 and set(d.strengths) == {"attn", "mlp"} and d.per_layer
    outs = {}
    for label, extra in (("chosen", []), ("t0", ["--trial", "0"]), ("t2", ["--trial", "2"])):
        outs[label] = tmp_path / f"{label}.gguf"
        run = cli(model, outs[label], "--direction", result, *extra)
        assert run.returncode == 0, run.stderr
        assert "scheduled edit" in run.stderr
    assert outs["chosen"].read_bytes() == outs["t0"].read_bytes()  # the chosen trial is trial 0
    assert outs["t2"].read_bytes() != outs["t0"].read_bytes()
    meta = Model(outs["t2"])
    assert '"trial": 2' in meta.get("abliterate.schedule")
    # blocks with strength 0 are copied untouched
    s = resolve(trials[2], d.per_block, d.harmless_means).strengths
    src = Model(model)
    for block in range(4):
        name = f"blk.{block}.attn_output.weight"
        same = np.array_equal(meta.raw(name), src.raw(name))
        assert same == (s[Component.ATTN][block] == 0)


@pytest.mark.parametrize("args,needle", [
    (["--trial", "9"], "--trial 9: the file holds trials 0-2"),
    (["--embeddings"], "leaves token_embd alone"),
])
def test_result_file_errors(args: list[str], needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    result = _schedule_file(tmp_path / "edit.safetensors", tiny["llama-nobias"], [random_params(4, rng) for _ in range(3)])
    run = cli(tiny["llama-nobias"], tmp_path / "out.gguf", "--direction", result, *args)
    assert run.returncode != 0 and needle in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "out.gguf").exists()
    other = cli(tiny["qwen2"], tmp_path / "out.gguf", "--direction", result)  # a file from another model
    assert other.returncode != 0 and "made for a llama model, not qwen2" in other.stderr


def test_plain_direction_has_no_trials(tiny: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.ones(256, np.float32))
    run = cli(tiny["llama"], tmp_path / "o.gguf", "--direction", tmp_path / "d.npy", "--trial", "0")
    assert run.returncode != 0 and "holds no search trials" in run.stderr


@pytest.mark.real
def test_optimise_confirms_with_a_judge(tiny: dict[str, Path], smollm2: Path, tmp_path: Path) -> None:
    """--judge: the front is confirmed by the judge's labels, and the pick rule says so."""
    out = tmp_path / "edit.safetensors"
    run = cli("optimise", tiny["llama-nobias"], "-o", out, "--trials", "3", "--judge", smollm2, "--confirm-prompts", "8",
              *FAST)
    assert run.returncode == 0, run.stderr
    assert f"judge {smollm2.name}) on 8 harmful" in load_direction(out).metadata["pick_rule"]


def test_optimise_end_to_end(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The real search on a tiny model: a result file that bakes, every trial recorded, the
    study stored beside it and resumable; and the clean errors around it."""
    model, out = tiny["llama-nobias"], tmp_path / "edit.safetensors"
    run = cli("optimise", model, "-o", out, "--trials", "5", "--confirm-prompts", "5", *FAST)
    assert run.returncode == 0, run.stderr
    d = load_direction(out)
    assert sorted(t["number"] for t in d.trials) == list(range(5))
    assert d.metadata["confirm_prompts"] == "5" and "on 5 harmful validation prompts" in d.metadata["pick_rule"]
    first = sorted(d.trials, key=lambda t: t["number"])[:2]  # the seeds: plain, then orthogonalised
    assert [t["params"]["orthogonal"] for t in first] == [False, True]
    assert all(t["params"]["attn"]["peak"] == t["params"]["mlp"]["edge"] == 1.0 for t in first)
    assert d.metadata["chosen_trial"].isdigit() and (tmp_path / "edit.study.db").is_file()
    assert cli(model, tmp_path / "baked.gguf", "--direction", out, "-q").returncode == 0
    again = cli("optimise", model, "-o", out, "--trials", "5", "--force", *FAST)
    assert again.returncode != 0 and "--resume to continue it" in again.stderr
    resumed = cli("optimise", model, "-o", out, "--trials", "7", "--resume", "--force", *FAST)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(t["number"] for t in load_direction(out).trials) == list(range(7))
    taken = cli("optimise", model, "-o", tmp_path / "y.safetensors", "--storage",
                f"sqlite:///{tmp_path / 'edit.study.db'}?timeout=5", *FAST)  # a URL the file check misses
    assert taken.returncode != 0 and "already holds a study" in taken.stderr and "Traceback" not in taken.stderr
    foreign = cli("optimise", tiny["qwen2"], "-o", tmp_path / "x.safetensors", "--storage",
                  f"sqlite:///{tmp_path / 'edit.study.db'}", "--resume", *FAST)
    assert foreign.returncode != 0 and "made for another model" in foreign.stderr


@pytest.mark.parametrize("args,needle", [
    (["--fix", "attn.colour=1"], "expected NAME=VALUE"),
    (["--fix", "orthogonal=maybe"], "bad value for orthogonal"),
    (["-o", "out.npy"], "write a .safetensors file"),
    ([], "give -o OUTPUT.safetensors"),
    (["-o", "o.safetensors", "--resume"], "--resume: no study at"),
    (["-o", "o.safetensors", "--bake", "o.bin"], "name it .gguf"),
])
def test_optimise_bad_options(args: list[str], needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    run = cli("optimise", tiny["llama-nobias"], *args, "-q", cwd=tmp_path)
    assert run.returncode != 0 and needle in run.stderr and "Traceback" not in run.stderr


def test_corrupt_study_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "edit.study.db").write_bytes(b"this is not a database" * 100)
    run = cli("optimise", tiny["llama-nobias"], "-o", tmp_path / "edit.safetensors", "--resume", *FAST)
    assert run.returncode != 0 and "not a readable study database" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert (tmp_path / "edit.study.db").read_bytes() == b"this is not a database" * 100
    assert not (tmp_path / "edit.safetensors").exists()


def _finished_trials(db: Path) -> list[tuple[int, str]]:
    """(number, worker pid) of the study's complete trials, read straight from Optuna's tables."""
    if not db.exists():
        return []
    with sqlite3.connect(db) as c:
        try:
            rows = c.execute("SELECT t.number, a.value_json FROM trials t LEFT JOIN trial_user_attributes a "
                             "ON a.trial_id = t.trial_id AND a.key = 'worker' WHERE t.state = 'COMPLETE'").fetchall()
        except sqlite3.OperationalError:
            return []
    return sorted(rows)


def _optimise(*args: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "gguf_abliterate", "optimise", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_keeps_the_finished_trials(tiny: dict[str, Path], tmp_path: Path) -> None:
    out, db = tmp_path / "edit.safetensors", tmp_path / "edit.study.db"
    p = _optimise(tiny["llama-nobias"], "-o", out, "--trials", "100000", "--patience", "100000", *FAST)
    deadline = time.monotonic() + 120
    while len(_finished_trials(db)) < 3 and time.monotonic() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err  # the best so far is written, and the exit says the search did not finish
    assert "Traceback" not in err and "holds the best so far" in err
    d = load_direction(out)
    assert len(d.trials) >= 3 and "unconfirmed" in d.metadata["pick_rule"]
    assert [f for f in os.listdir(tmp_path) if f.endswith(".partial")] == []


def test_two_workers_share_one_study(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A study made, then continued by two processes at once (one resuming, one joining):
    together they finish exactly the requested trials, none lost or run twice."""
    model, out, db = tiny["llama-nobias"], tmp_path / "edit.safetensors", tmp_path / "edit.study.db"
    assert cli("optimise", model, "-o", out, "--trials", "2", *FAST).returncode == 0
    url = f"sqlite:///{db}"
    main = _optimise(model, "-o", out, "--trials", "40", "--resume", "--force", "--patience", "1000", *FAST)
    worker = _optimise(model, "--join", url, "--trials", "40", "--patience", "1000", *FAST)
    for p in (main, worker):
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    finished = _finished_trials(db)
    numbers = [n for n, _ in finished]
    assert len(finished) == 40 and len(set(numbers)) == 40
    assert len({w for _, w in finished[2:]}) == 2  # both processes ran trials
    assert sorted(t["number"] for t in load_direction(out).trials) == numbers


def test_bisection_finds_the_lowest_kl_trial_that_passes() -> None:
    from gguf_abliterate.optimise.study import TrialRecord, lowest_passing

    front = [TrialRecord(i, {}, 0.3 - 0.02 * i, 0.01 + 0.001 * i, (0.3 - 0.02 * i, 0.01 + 0.001 * i))
             for i in range(12)]  # by KL: refusal falls as KL rises
    for first_pass in range(12):
        calls: list[int] = []

        def passes(r: TrialRecord) -> bool:
            calls.append(r.number)
            return r.number >= first_pass

        assert lowest_passing(front, passes, 8).number == first_pass
        assert len(calls) <= 4 and len(set(calls)) == len(calls)  # log2(12 + "none"), none twice
    calls = []
    assert lowest_passing(front, lambda r: bool(calls.append(r.number)), 8) is None and len(calls) <= 4
    assert lowest_passing(front, lambda r: r.number >= 3, 2).number == 3  # budget spent: best found (6, then 3)
    assert lowest_passing(front, lambda r: r.number >= 11, 2) is None  # budget spent before any passed
    assert lowest_passing([], lambda r: True, 5) is None and lowest_passing(front, lambda r: True, 0) is None


def test_a_trial_behind_the_front_on_its_first_prompts_stops_there() -> None:
    """`behind`: a trial stops after its first harmless prompts only when a finished, fully
    scored trial refusing no more had a KL on those same prompts REACH_MARGIN times lower; the
    KL it records then keeps it behind that trial on the front."""
    from gguf_abliterate.optimise.study import REACH_MARGIN, TrialRecord, behind, pareto_front

    done = TrialRecord(0, {}, 0.1, 0.02, (0.1, 0.02), kl_first=0.01)
    estimate = behind([done], 0.2, 0.01 * REACH_MARGIN * 1.2)
    assert estimate == pytest.approx(0.02 * REACH_MARGIN * 1.2)
    late = TrialRecord(1, {}, 0.2, estimate, (0.2, estimate), kl_first=0.012, pruned=True)
    assert pareto_front([done, late]) == [done]
    assert behind([done], 0.05, 0.1) is None  # it refuses less: it may still be on the front
    assert behind([done], 0.2, 0.01 * REACH_MARGIN * 0.9) is None  # within the margin: scored whole
    assert behind([replace(done, pruned=True)], 0.2, 0.1) is None  # estimates are no evidence
    assert behind([replace(done, kl_first=None)], 0.2, 0.1) is None  # a study from before: nothing to pair


def test_a_trial_is_read_in_two_parts(smollm2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With more than FIRST scoring prompts a trial reads the first FIRST of each kind, then the
    rest: read whole, its objectives are those of one pass over all of them (up to llama.cpp's
    batching noise). It stops after the first harmful prompts if their refusal ratio is above
    PRUNE_REFUSAL, and after the first harmless ones if `reach` says it cannot reach the front
    (recording the KL `reach` estimates), and then decodes fewer tokens."""
    from gguf_abliterate.direction import prompts as P
    from gguf_abliterate.evaluate.first_token import refusal_mass
    from gguf_abliterate.optimise import scorer as S

    model = smollm2  # a tiny random model's refusal openings have a probability of 1e-25
    bad, good = (p[:12] for p in P.default_prompts("validation"))
    per_block, means = _random_basis(model)
    edit = TrialAdapters(Model(model), per_block, means).edit(
        resolve(random_params(Model(model).n_layer, np.random.default_rng(3)), per_block, means))
    monkeypatch.setattr(S, "GUARD", np.inf)  # a tiny random model's refusal mass moves at random
    with LlamaModel(model, n_batch=4096, n_seq=64) as m:
        scorer = S.TrialScorer(m, bad, good)
        apply(m, edit)
        ratio = refusal_mass(m.next_token_logprobs(bad, share_prefix=True), scorer.ids) / scorer.base_refusal
        kl = scorer.kl()
        apply(m, None)
        monkeypatch.setattr(S, "PRUNE_REFUSAL", np.inf)
        k0 = LlamaModel.decoded
        whole = scorer.score(edit)
        whole_tokens = LlamaModel.decoded - k0
        assert not whole.pruned and whole.refusal == pytest.approx(ratio, rel=1e-2) and ratio != pytest.approx(1.0)
        assert whole.kl == pytest.approx(kl, rel=5e-2) and kl > 1e-3 and whole.kl_first is not None and whole.kl_first > 0
        behind = scorer.score(edit, lambda refusal, kl_first: 7.0)
        assert behind.pruned and behind.kl == 7.0 and behind.kl_first == pytest.approx(whole.kl_first, rel=1e-2)
        assert behind.refusal == pytest.approx(whole.refusal, rel=1e-2)
        monkeypatch.setattr(S, "PRUNE_REFUSAL", -1.0)
        k0 = LlamaModel.decoded
        early = scorer.score(edit)
        assert early.pruned and early.kl is None and early.objectives == (early.refusal, 1 + early.refusal)
        assert LlamaModel.decoded - k0 < whole_tokens / 2


def test_a_settled_answer_stops_growing(tiny: dict[str, Path]) -> None:
    """`greedy_answers(settled=...)`: an answer stops at the first token after which `settled`
    holds (a confirmation stops a refusal at its marker), cut rather than finished; an answer
    it never holds for is the one generated without it, token for token."""
    with LlamaModel(tiny["llama-chat"], n_seq=8) as m:
        k0 = LlamaModel.decoded
        whole = m.greedy_answers(PROMPTS, 6)
        k1 = LlamaModel.decoded
        target = m.text(whole[0].tokens[:2])
        cut = m.greedy_answers(PROMPTS, 6, settled=lambda text: text == target)
        fewer = LlamaModel.decoded - k1 < k1 - k0
        expected = []
        for a in whole:
            stop = next((k for k in range(1, len(a.tokens) + 1) if m.text(a.tokens[:k]) == target), None)
            expected.append(a.tokens if stop is None else a.tokens[:stop])
    assert [a.tokens for a in cut] == expected and cut[0].tokens == whole[0].tokens[:2] and not cut[0].finished
    assert fewer


def test_seeds_are_the_single_direction_edit() -> None:
    """The search's first trials: the direction of the block `direction` chose (else mid-range),
    every writer from 0.1 (L-1) up at strength 1, plain and orthogonalised; fixed parameters left out."""
    from gguf_abliterate.optimise.space import seeds

    plain, orthogonal = seeds(28, {}, 13)
    assert plain["direction_index"] == 13.0 and not plain["orthogonal"] and orthogonal["orthogonal"]
    kernel = Kernel(**{f: plain[f"attn.{f}"] for f in ("peak", "position", "edge", "width")})
    assert np.array_equal(kernel.weights(28), (np.arange(28) >= 3).astype(np.float32))
    assert {k.split(".")[0] for k in plain} == {"direction_scope", "direction_index", "orthogonal", "attn", "mlp"}
    assert seeds(28, {}, None)[0]["direction_index"] == pytest.approx(0.6 * 27)
    assert seeds(28, {}, 2)[0]["direction_index"] == pytest.approx(0.4 * 27)  # within the space
    fixed = seeds(28, {"orthogonal": True, "attn.peak": 0.5, "direction_index": None}, 13, experts=True)
    assert len(fixed) == 1 and not {"orthogonal", "attn.peak", "direction_index", "direction_scope"} & set(fixed[0])
    assert fixed[0]["experts.edge"] == 1.0


def test_optimise_bakes_and_confirms_the_pick(tiny: dict[str, Path], tmp_path: Path) -> None:
    """--bake keeps the checked bake: the very bytes the edit command writes from the result
    file (both rounding by the input statistics the --from direction wrote, which the result
    names); the result records the bake's refusals and says the pick was confirmed baked; no
    temporary bake is left behind."""
    model, out, kept = tiny["llama-nobias"], tmp_path / "edit.safetensors", tmp_path / "kept.gguf"
    measured = tmp_path.parent / f"{tmp_path.name}-measured"  # direction and its statistics, elsewhere
    measured.mkdir()
    assert cli("direction", model, "-o", measured / "d.safetensors", "--layer", "1", "-q").returncode == 0
    run = cli("optimise", model, "-o", out, "--trials", "3", "--bake", kept, "--from", measured / "d.safetensors",
              *FAST)
    assert run.returncode == 0, run.stderr
    d = load_direction(out)
    chosen = int(d.metadata["chosen_trial"])
    top = Model(model).n_layer - 1  # the seeds take the direction of the block `direction` was told
    assert next(t for t in d.trials if t["number"] == 0)["params"]["direction_index"] == np.clip(1, 0.4 * top, 0.9 * top)
    assert next(t for t in d.trials if t["number"] == chosen)["baked_refusals"] is not None
    assert "confirmed baked into the file's own types" in d.metadata["pick_rule"]
    assert cli(model, tmp_path / "again.gguf", "--direction", out, "-q").returncode == 0
    assert kept.read_bytes() == (tmp_path / "again.gguf").read_bytes()
    assert Model(kept).get("abliterate.rounding") == "gptq"
    assert d.metadata["statistics"] == f"../{measured.name}/d.statistics.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.gguf", "edit.safetensors", "edit.study.db",
                                                          "kept.gguf"]
    exists = cli("optimise", model, "-o", tmp_path / "new.safetensors", "--bake", kept, *FAST)
    assert exists.returncode != 0 and "kept.gguf exists" in exists.stderr
    none = cli("optimise", model, "-o", tmp_path / "new.safetensors", "--bake", tmp_path / "n.gguf",
               "--bake-checks", "0", *FAST)
    assert none.returncode != 0 and "drop --bake-checks 0" in none.stderr and not (tmp_path / "n.gguf").exists()


def test_blocks_without_a_measured_difference_borrow_a_direction_and_stay_unedited() -> None:
    """LFM2's first blocks (short convolutions seeing only the chat template's last tokens)
    measure a zero difference: per block they take the nearest measured direction at strength
    0; a blend of measured blocks is unaffected."""
    rng = np.random.default_rng(0)
    per_block = rng.normal(size=(6, 16)).astype(np.float32)
    per_block[:2] = 0
    means = rng.normal(size=(6, 16)).astype(np.float32)
    flat = Kernel(1.0, 2.5, 1.0, 10.0)
    s = resolve(EditParams(None, False, flat, flat), per_block, means)
    assert np.allclose(np.linalg.norm(s.directions, axis=1), 1)
    assert np.allclose(s.directions[0], s.directions[2]) and np.allclose(s.directions[1], s.directions[2])
    for w in s.strengths.values():
        assert list(w[:2]) == [0, 0] and (w[2:] > 0).all()
    blended = resolve(EditParams(3.5, False, flat, flat), per_block, means)
    assert (blended.strengths[Component.ATTN] > 0).all()
    with pytest.raises(UserError, match="all zero"):
        resolve(EditParams(None, False, flat, flat), np.zeros_like(per_block), means)


def test_optimise_on_a_moe_model_bakes_its_experts_in_their_own_type(tmp_path: Path) -> None:
    """The search runs end to end on gpt-oss with MXFP4 experts: each trial searches the experts'
    own kernel, --bake keeps the expert stacks MXFP4 with under 1% of the edit undone (the same
    bound as the plain edit), the kept bake is what the edit command writes, and --trial N bakes
    any trial; the report shows each trial's experts kernel."""
    from test_edit import component_error, expected_values

    model = build_model(tmp_path / "oss.gguf", MOE["gpt-oss"])
    out, kept = tmp_path / "edit.safetensors", tmp_path / "kept.gguf"
    run = cli("optimise", model, "-o", out, "--trials", "3", "--bake", kept, "--report", tmp_path / "r.html", *FAST)
    assert run.returncode == 0, run.stderr
    d = load_direction(out)
    assert all(t["params"].get("experts") for t in d.trials) and "experts" in d.strengths
    assert "/ experts " in (tmp_path / "r.html").read_text(encoding="utf-8")  # the report shows the experts' kernel
    assert cli(model, tmp_path / "again.gguf", "--direction", out, "-q").returncode == 0
    assert kept.read_bytes() == (tmp_path / "again.gguf").read_bytes()
    source, baked = Model(model), Model(kept)
    strengths = d.strengths["experts"]
    assert strengths.max() > 0
    for block in np.flatnonzero(strengths):
        name = f"blk.{block}.ffn_down_exps.weight"
        assert baked.tensors[name].tensor_type == Q.MXFP4
        r = d.vectors[block].astype(np.float64)
        target = expected_values(source, name, r, -float(strengths[block]))
        assert component_error(source, name, baked.values(name).astype(np.float64), target, r) < 0.01
    for t in d.trials:
        number = str(t["number"])
        run = cli(model, tmp_path / f"t{number}.gguf", "--direction", out, "--trial", number, "-q")
        assert run.returncode == 0, run.stderr


def test_a_projection_on_a_node_the_graph_lacks_is_an_error(tiny: dict[str, Path]) -> None:
    """A registry node name llama.cpp does not use would leave a trial unedited: one clear error."""
    with LlamaModel(tiny["llama-nobias"]) as m:
        m.set_projections({"no_such_node-0": (np.ones(m.n_embd, np.float32) / m.n_embd ** 0.5, 1.0)})
        with pytest.raises(UserError, match="no node no_such_node-0"):
            m.next_token_logprobs(PROMPTS[:1])
        m.set_projections(None)
        assert np.isfinite(m.next_token_logprobs(PROMPTS[:1])).all()
