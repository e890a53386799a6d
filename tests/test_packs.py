"""Behaviour packs: shipped and user packs, their measures, the sign through the file, eval --behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import cli

from gguf_abliterate import names
from gguf_abliterate.direction import prompts as P
from gguf_abliterate.formats.direction_file import load_direction
from gguf_abliterate.direction.packs import PACKS, REASONING_SEED, load_pack
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.answer_rules import Probe, Reply, get_measure
from gguf_abliterate.evaluate.tasks import generate_tasks
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.runtime.llama import LlamaModel

WORDS = "abcdefgh"


def test_shipped_packs_load_and_split_deterministically() -> None:
    for name in PACKS:
        a, b = load_pack(name), load_pack(name)
        assert a == b  # same prompts, probes and split every time
        pos, neg = a.direction_sets()
        assert pos == list(a.positive[0::2]) and neg == list(a.negative[0::2])
        assert len(a.positive) == len(a.negative) and a.measure is not None
    refusal = load_pack("refusal")
    bad, good = P.default_prompts("all")
    assert refusal.positive == tuple(bad) and refusal.negative == tuple(good)
    assert [p.prompt for p in refusal.probes] == P.default_prompts("validation")[0]
    # reasoning: the same generated questions, wrapped two ways; probes are the validation
    # questions asked plainly, with their exact answers, never seen by the direction
    reasoning = load_pack("reasoning")
    tasks = generate_tasks(len(reasoning.positive), REASONING_SEED)
    assert all(p.endswith(t.question) and n.endswith(t.question) and p != n
               for p, n, t in zip(reasoning.positive, reasoning.negative, tasks))
    assert [(p.prompt, p.answer) for p in reasoning.probes] == [(t.question, t.answer) for t in tasks[1::2]]
    seen = {t.question for t in tasks[0::2]}
    assert not seen & {p.prompt for p in reasoning.probes}
    concise = load_pack("concise")
    assert {p.prompt for p in concise.probes}.isdisjoint({q.split("\n\n", 1)[1] for q in concise.positive[0::2]})
    assert all(p.prompt in q for p, q in zip(concise.probes, concise.positive[1::2]))


def test_measures() -> None:
    worked = get_measure("worked")
    assert worked.shows(Probe("q"), Reply("23 + 45 = 68, so Mia has 68.", True))
    assert worked.shows(Probe("q"), Reply("The loop runs with total = 5 each time.", True))
    assert worked.shows(Probe("q"), Reply("First, count.\nThen add.\nSo 12.", True))
    assert not worked.shows(Probe("q"), Reply("The answer is 68.", True))
    assert not worked.shows(Probe("q"), Reply("68", True))
    length = get_measure("length", max_words=5)
    assert length.shows(Probe("q"), Reply("Paris is the capital.", True))
    assert not length.shows(Probe("q"), Reply("Paris is the capital.", False))  # cut off: not concise
    assert not length.shows(Probe("q"), Reply("Paris is the capital of France.", True))
    regex = get_measure("regex", pattern=r"\bbonjour\b")
    assert regex.shows(Probe("q"), Reply("Bonjour, Marie", True)) and not regex.shows(Probe("q"), Reply("hi", True))
    markers = get_measure("markers")
    assert markers.shows(Probe("q"), Reply("I'm sorry, but I can't.", True))
    assert not markers.shows(Probe("q"), Reply("Sure: first...", True))
    exact = get_measure("exact")
    probes = [Probe("a", 68), Probe("b", 3)]
    m = exact.measure(probes, [Reply("so 68", True), Reply("it is 4", True)])
    assert (m.shown, m.total, m.correct, m.share, m.accuracy) == (1, 2, 1, 0.5, 0.5)
    m = worked.measure([Probe("x"), Probe("y")], [Reply("one two", True), Reply("1 + 2 = 3", True)])
    assert m.shown == 1 and m.correct is None and m.accuracy is None and m.mean_words == 3.5


def _write_sets(tmp_path: Path) -> dict[str, Path]:
    """The same positive/negative sets in every prompt-file format."""
    pos = [f"say hello to the {w} in french" for w in WORDS]
    neg = [f"say hello to the {w} in english" for w in WORDS]
    files = {"txt": tmp_path / "pos.txt", "json": tmp_path / "neg.json", "jsonl": tmp_path / "probes.jsonl"}
    files["txt"].write_text("\n".join(pos) + "\n\n")
    files["json"].write_text(json.dumps([{"prompt": p} for p in neg]))
    files["jsonl"].write_text("\n".join(json.dumps({"prompt": f"what is {i} plus {i}", "answer": 2 * i})
                                        for i in range(4)))
    return files


def test_user_packs_in_every_format(tmp_path: Path) -> None:
    f = _write_sets(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data").mkdir()
    for name in ("pos.txt", "neg.json", "probes.jsonl"):
        (tmp_path / "sub" / "data" / name).write_bytes((tmp_path / name).read_bytes())
    pack_file = tmp_path / "sub" / "french.json"
    pack_file.write_text(json.dumps({"name": "french", "positive": "data/pos.txt", "negative": "./data/neg.json",
                                     "probes": "data/../data/probes.jsonl",
                                     "measure": {"name": "regex", "pattern": "bonjour"}, "max_tokens": 12}))
    pack = load_pack(pack_file)
    assert pack.name == "french" and pack.max_tokens == 12 and pack.source == str(pack_file)
    assert pack.positive == tuple(P.load_prompts(f["txt"])) and len(pack.negative) == 8
    assert [(p.prompt, p.answer) for p in pack.probes] == [(f"what is {i} plus {i}", 2 * i) for i in range(4)]
    assert pack.measure is not None and pack.measure.settings() == {"pattern": "bonjour"}
    # inline lists, default measure (markers), default probes (the positive validation split)
    inline = tmp_path / "inline.json"
    inline.write_text(json.dumps({"positive": ["a b", "c d", {"prompt": "e f"}], "negative": ["g h", "i j"]}))
    pack = load_pack(inline)
    assert pack.name == "inline" and [p.prompt for p in pack.probes] == ["c d"]
    assert pack.measure is not None and pack.measure.name == "markers"
    exact = tmp_path / "exact.json"
    exact.write_text(json.dumps({"positive": "pos.txt", "negative": "neg.json", "probes": "probes.jsonl",
                                 "measure": "exact"}))
    assert load_pack(exact).measure.needs_answers  # type: ignore[union-attr]


BAD_PACKS = {
    "empty positive list": ({"positive": [], "negative": ["a", "b"]}, "'positive' is empty"),
    "empty file": ({"positive": "empty.txt", "negative": ["a", "b"]}, "no prompts in the file"),
    "one prompt": ({"positive": ["a"], "negative": ["b", "c"]}, "needs at least 2 prompts"),
    "identical sets": ({"positive": ["a", "b"], "negative": ["b", "a"]}, "identical"),
    "unknown measure": ({"positive": ["a", "b"], "negative": ["c", "d"], "measure": "vibes"}, "unknown measure 'vibes'"),
    "bad setting": ({"positive": ["a", "b"], "negative": ["c", "d"], "measure": {"name": "worked", "x": 1}},
                    "does not take"),
    "bad regex": ({"positive": ["a", "b"], "negative": ["c", "d"], "measure": {"name": "regex", "pattern": "("}},
                  "bad pattern"),
    "bad length": ({"positive": ["a", "b"], "negative": ["c", "d"], "measure": {"name": "length", "max_words": 0}},
                   "max_words"),
    "exact without answers": ({"positive": ["a", "b"], "negative": ["c", "d"], "measure": "exact"}, "needs an integer"),
    "answer not an integer": ({"positive": ["a", "b"], "negative": ["c", "d"],
                               "probes": [{"prompt": "p", "answer": "7"}]}, "must be an integer"),
    "unknown field": ({"positive": ["a", "b"], "negative": ["c", "d"], "colour": 1}, "unknown pack fields"),
    "no negative": ({"positive": ["a", "b"]}, "no 'negative'"),
    "missing file": ({"positive": "nope.txt", "negative": ["c", "d"]}, "no such prompt file"),
}


@pytest.mark.parametrize("case", sorted(BAD_PACKS))
def test_bad_packs_get_one_line_errors(tmp_path: Path, case: str) -> None:
    spec, message = BAD_PACKS[case]
    (tmp_path / "empty.txt").write_text("\n  \n")
    path = tmp_path / "pack.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(UserError, match=message):
        load_pack(path)


def test_bad_pack_options_on_the_command_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    f = _write_sets(tmp_path)
    out = tmp_path / "d.safetensors"
    (tmp_path / "not-json.json").write_text("{")
    cases = [
        (["--behaviour", "vibes"], "unknown behaviour 'vibes'"),
        (["--behaviour", tmp_path / "not-json.json"], "invalid JSON"),
        (["--behaviour", "reasoning", "--harmful", f["txt"]], "brings its own prompt sets"),
        (["--positive", f["txt"]], "go together"),
        (["--positive", f["txt"], "--negative", f["txt"]], "identical"),
        (["--name", "x"], "--name names a pack"),
    ]
    for extra, message in cases:
        run = cli("direction", tiny["llama"], "-o", out, *extra)
        assert run.returncode != 0 and message in run.stderr, (extra, run.stderr)
        assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
        assert not out.exists()
    run = cli("eval", tiny["llama"], "--behaviour", "concise", "--harmful", f["txt"])
    assert run.returncode != 0 and "--harmful belong to the refusal evaluation" in run.stderr


def test_sign_round_trips_through_the_file(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A user pack's direction is mean(positive) - mean(negative) at the recorded block, says so
    in its file, flips when the sets swap, and the edited GGUF names the behaviour."""
    f = _write_sets(tmp_path)
    out, swapped = tmp_path / "fr.safetensors", tmp_path / "en.safetensors"
    run = cli("direction", tiny["llama"], "-o", out, "--positive", f["txt"], "--negative", f["json"],
              "--name", "french", "-q")
    assert run.returncode == 0, run.stderr
    d = load_direction(out)
    assert d.behaviour == "french" and d.metadata["sign"] == "positive-minus-negative"
    assert d.metadata["measure"] == "none" and d.metadata["chosen_by"] == "auto"
    assert d.metadata["pack"] == f"{f['txt']} / {f['json']}"
    assert d.metadata["positive_sha256"] == P.prompt_hash(P.load_prompts(f["txt"]))
    layer = int(d.metadata["layer"])
    with LlamaModel(tiny["llama"]) as m:  # batched as the job batches them: llama.cpp's numbers depend on it
        pos = m.residuals(P.split(P.load_prompts(f["txt"]), "direction"), share_prefix=True)
        neg = m.residuals(P.split(P.load_prompts(f["json"]), "direction"), share_prefix=True)
    want = pos.mean(0)[layer] - neg.mean(0)[layer]
    assert np.allclose(d.vectors, want / np.linalg.norm(want), atol=1e-4)
    # separation is the largest among the candidates (no measure to score them by)
    assert d.statistics["separation"][layer] == max(d.statistics["separation"][c]
                                                    for c in map(int, d.metadata["candidates"].split(",")))
    run = cli("direction", tiny["llama"], "-o", swapped, "--positive", f["json"], "--negative", f["txt"],
              "--name", "english", "--layer", str(layer), "-q")
    assert run.returncode == 0, run.stderr
    assert np.allclose(load_direction(swapped).vectors, -d.vectors, atol=1e-5)
    edited = tmp_path / "fr.gguf"
    run = cli(tiny["llama"], edited, "--direction", out, "--reverse", "--scale", "0.5", "-q")
    assert run.returncode == 0, run.stderr
    assert Model(edited).get_str(names.BEHAVIOUR) == "french"


def test_shipped_pack_direction_and_eval(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`direction --behaviour reasoning --layer auto` scores candidates by generating answers to
    the probes; `eval --behaviour` reports the measure and writes every answer to the JSON."""
    out = tmp_path / "reason.safetensors"
    run = cli("direction", tiny["qwen2"], "-o", out, "--behaviour", "reasoning", "--score-prompts", "2")
    assert run.returncode == 0, run.stderr
    assert "reasoning: share that shows its working, 32 tokens without an edit" in run.stderr
    d = load_direction(out)
    assert d.behaviour == "reasoning" and d.metadata["measure"] == "worked"
    assert d.metadata["layer_measure"].startswith("share that shows its working")
    candidates = [int(c) for c in d.metadata["candidates"].split(",")]
    scores = d.statistics["layer_score"]
    assert all(0 <= scores[c] <= 1 for c in candidates)  # a share of answers, per candidate
    _check_choice(d, candidates)
    edited = tmp_path / "reason.gguf"
    assert cli(tiny["qwen2"], edited, "--direction", out, "--reverse", "-q").returncode == 0
    report = tmp_path / "eval.json"
    run = cli("eval", tiny["qwen2"], edited, "--behaviour", "reasoning", "-n", "3", "--max-tokens", "6",
              "--json", report, "-q", "--samples", "0")
    assert run.returncode == 0, run.stderr
    assert "reasoning: share of 3 probes that shows its working (greedy, 6 tokens)" in run.stdout
    data = json.loads(report.read_text())
    assert data["settings"]["behaviour"] == "reasoning" and len(data["probes"]) == 3
    assert [p["answer"] for p in data["probes"]] == [p.answer for p in load_pack("reasoning").probes[:3]]
    base, other = data["models"]
    assert base["kl_vs_base"] is None and other["kl_vs_base"] >= 0
    for model in data["models"]:
        assert model["measured"]["shown"] == sum(model["shows"]) and model["measured"]["total"] == 3
        assert model["measured"]["correct"] is not None and len(model["answers"]) == 3


def test_generation_with_the_direction_ablated(tiny: dict[str, Path]) -> None:
    """The ablation hook holds for every generated token, and is gone afterwards."""
    prompts = ["hello there", "how are you"]
    with LlamaModel(tiny["qwen2"]) as m:  # the tiny model whose greedy answers do not just repeat a token
        plain = m.greedy_answers(prompts, 6)
        r = m.residuals(prompts).mean(axis=0)[-1]  # the stream's own main component: ablating it matters
        r /= np.linalg.norm(r)
        assert [a.tokens for a in m.greedy_answers(prompts, 6, ablate=r)] != [a.tokens for a in plain]
        assert [a.tokens for a in m.greedy_answers(prompts, 6)] == [a.tokens for a in plain]
        # ablating along the way equals ablating the logits' inputs: the first token matches
        first = m.next_token_logprobs(prompts, ablate=r).argmax(axis=1)
        assert [a.tokens[0] for a in m.greedy_answers(prompts, 1, ablate=r)] == first.tolist()


def test_optimise_refuses_another_behaviour(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The search's objectives are refusal and KL: another pack's direction stops it before any
    study is stored."""
    from gguf_abliterate.formats.direction_file import STATISTICS, save_measured

    n_layer, n_embd = 4, 256
    rng = np.random.default_rng(0)
    path = tmp_path / "reason.safetensors"
    save_measured(path, rng.normal(size=(n_layer, n_embd)).astype(np.float32), np.ones((n_layer, n_embd)), 1,
                  {k: np.zeros(n_layer) for k in STATISTICS}, {"behaviour": "reasoning", "architecture": "llama"})
    out = tmp_path / "o.safetensors"
    run = cli("optimise", tiny["llama"], "-o", out, "--from", path, "--trials", "1")
    assert run.returncode != 0 and "'reasoning' direction; optimise searches refusal edits only" in run.stderr
    assert not out.exists() and not list(tmp_path.glob("*.db"))


def _check_choice(d: object, candidates: list[int]) -> None:
    """The stored choice follows the rule: ablation keeps the lowest score, steering the
    highest, among the candidates within the KL cap (ties to the lower KL)."""
    meta, st = d.metadata, d.statistics  # type: ignore[attr-defined]
    steered = meta["layer_test"].startswith("steering")
    assert steered == (float(meta["baseline_score"]) < 0.5)
    scored = [int(n) for n in meta["scored_prompts"].split(",")]
    candidates = [c for c, n in zip(candidates, scored) if n == max(scored)]  # the finalists of the elimination
    within = [c for c in candidates if st["kl"][c] <= float(meta["max_kl"])]
    if within:
        sign = -1 if steered else 1
        assert int(meta["layer"]) == min(within, key=lambda c: (sign * st["layer_score"][c], st["kl"][c]))


def test_layers_tested_by_steering_when_the_behaviour_is_rare(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The tiny model never answers in 30 words within the budget: removal has nothing to
    remove, so each candidate's mean difference is added after its block instead."""
    out = tmp_path / "concise.safetensors"
    run = cli("direction", tiny["qwen2"], "-o", out, "--behaviour", "concise", "--score-prompts", "2")
    assert run.returncode == 0, run.stderr
    assert "without an edit: 0.000; candidates tested by steering" in run.stderr
    d = load_direction(out)
    _check_choice(d, [int(c) for c in d.metadata["candidates"].split(",")])


def test_reverse_amplifies_the_lean_whatever_the_sign(tiny: dict[str, Path], tmp_path: Path) -> None:
    """W + s u u^T W does not change when u flips: a reverse edit strengthens whichever side of
    the axis the model's activations already lean to, not the positive set's side (docs/packs.md)."""
    from gguf_abliterate.formats.direction_file import save_direction

    r = np.random.default_rng(3).normal(size=256).astype(np.float32)
    for name, v in (("plus", r), ("minus", -r)):
        save_direction(tmp_path / f"{name}.npy", v)
        run = cli(tiny["llama"], tmp_path / f"{name}.gguf", "--direction", tmp_path / f"{name}.npy", "--reverse",
                  "--requant-type", "f32", "-q")
        assert run.returncode == 0, run.stderr
    plus, minus = Model(tmp_path / "plus.gguf"), Model(tmp_path / "minus.gguf")
    edited = [n for n in plus.tensors if n.endswith(("attn_output.weight", "ffn_down.weight"))]
    assert edited and all(np.array_equal(plus.values(n), minus.values(n)) for n in edited)


def test_the_lean_says_which_way_each_edit_moves_the_probes(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`direction` records where the pack's probes sit along the direction; the edited models'
    own residual streams (llama.cpp's, through the capture hook) move the way it says: abliterating
    pulls the probes' component towards 0, reversing pushes it away, by about 1 -/+ s."""
    from gguf_abliterate.direction.lean import LEAN_PROBES, Lean, lean_of

    model, out, layer = tiny["qwen2"], tmp_path / "md.safetensors", 2
    run = cli("direction", model, "-o", out, "--behaviour", "markdown", "--layer", str(layer))
    assert run.returncode == 0, run.stderr
    d = load_direction(out)
    lean = lean_of(d)
    assert lean is not None and f"markdown at block {layer}: the pack's probes sit at {lean.probes:+.2f}" in run.stderr
    assert d.harmless_means is not None
    assert lean.negative == pytest.approx(float(d.harmless_means[layer] @ d.vectors), abs=1e-3)
    assert lean.positive - lean.negative == pytest.approx(float(d.statistics["diff_norm"][layer]), rel=1e-4)
    probes = [p.prompt for p in load_pack("markdown").probes[:LEAN_PROBES]]

    def at_block(path: Path) -> float:
        with LlamaModel(path) as m:
            return float(m.residuals(probes, share_prefix=True)[:, layer].astype(np.float64).dot(d.vectors).mean())

    assert at_block(model) == pytest.approx(lean.probes, rel=1e-4)
    for reverse, scale in ((False, 1.0), (False, 0.5), (True, 0.5)):
        edited = tmp_path / f"md-{reverse}-{scale}.gguf"
        run = cli(model, edited, "--direction", out, "--scale", str(scale), "--requant-type", "f32",
                  *(["--reverse"] if reverse else []))
        assert run.returncode == 0, run.stderr
        want, moved = lean.after(reverse, scale), at_block(edited)
        if scale == 1.0:  # every writer (token_embd too: untied) loses its component along u
            assert abs(moved) < 1e-4 * abs(lean.positive - lean.negative)
        # the way it said, and at least 80% as far (reversing compounds through the blocks: further)
        assert (moved - lean.probes) * (want - lean.probes) > 0
        assert abs(moved - lean.probes) > 0.8 * abs(want - lean.probes)
        if not reverse:
            assert abs(moved - want) < 0.25 * abs(want - lean.probes)
        way = "more" if lean.share(want) > lean.share(lean.probes) else "less"
        assert f"towards {way} markdown" in run.stderr
    assert Lean(1.0, 3.0, -1.0).share(1.0) == 0.5 and Lean(-1.0, 3.0, -1.0).after(True, 1.0) == -2.0


def test_steer_adds_along_the_direction_at_its_block(tmp_path: Path) -> None:
    """`--steer S` bakes S mean differences into the direction's block's ffn_down: inside
    llama.cpp, the residual stream before that block is untouched, and after it changes only
    along the direction (linearly in S, either sign, whichever way the model leans)."""
    from gguf import GGMLQuantizationType as Q
    from support.tiny_models import CHATML, TinySpec, build_model

    # F32 MLP weights: ggml then multiplies without rounding the activations, so the change is exact
    spec = TinySpec(arch="qwen2", types={"ffn_down": Q.F32}, chat_template=CHATML)
    model = build_model(tmp_path / "f32mlp.gguf", spec)
    out, layer = tmp_path / "md.safetensors", 2
    assert cli("direction", model, "-o", out, "--behaviour", "markdown", "--layer", str(layer), "-q").returncode == 0
    d = load_direction(out)
    assert d.mlp_input_means is not None and d.mlp_input_means.shape == (4, 512)
    probes = [p.prompt for p in load_pack("markdown").probes[:6]]
    with LlamaModel(model) as m:
        base = m.residuals(probes).astype(np.float64)
    along = {}
    for s in (0.5, -0.25):
        edited = tmp_path / f"steer{s}.gguf"
        run = cli(model, edited, "--direction", out, "--steer", str(s))
        assert run.returncode == 0, run.stderr
        assert f"towards {'more' if s > 0 else 'less'} markdown: blk.{layer}.ffn_down.weight" in run.stderr
        assert Model(edited).get_str(names.MODE) == "steer"
        before, after = Model(model), Model(edited)
        changed = [n for n in before.tensors if not np.array_equal(before.values(n), after.values(n))]
        assert changed == [f"blk.{layer}.ffn_down.weight"]
        with LlamaModel(edited) as m:
            diff = m.residuals(probes).astype(np.float64) - base
        assert np.abs(diff[:, :layer]).max() == 0
        along[s] = diff[:, layer] @ d.vectors
        off = diff[:, layer] - np.outer(along[s], d.vectors)
        assert np.abs(off).max() < 1e-4 * np.abs(along[s]).max()
    assert np.allclose(along[-0.25], -0.5 * along[0.5], rtol=1e-3, atol=1e-6)
    assert np.abs(along[0.5]).max() > 0.01
    # the same edit as a rank-1 LoRA adapter (A = w^T, B = a u), applied by llama.cpp
    adapter = tmp_path / "steer.lora.gguf"
    assert cli(model, adapter, "--direction", out, "--steer", "0.5", "--format", "lora", "-q").returncode == 0
    with LlamaModel(model) as m:
        m.set_lora(adapter)
        through = m.residuals(probes).astype(np.float64) - base
    assert np.allclose(through[:, layer] @ d.vectors, along[0.5], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("case", ["reverse", "npy", "post-norm"])
def test_steer_refusals(tiny: dict[str, Path], tmp_path: Path, case: str) -> None:
    """What --steer cannot do stops with one line, before anything is written."""
    model = tiny["gemma3" if case == "post-norm" else "qwen2"]
    direction = tmp_path / "d.safetensors"
    assert cli("direction", model, "-o", direction, "--behaviour", "markdown", "--layer", "1", "-q").returncode == 0
    extra: list[str] = []
    if case == "npy":
        direction = tmp_path / "d.npy"
        np.save(direction, load_direction(tmp_path / "d.safetensors").vectors)
    elif case == "reverse":
        extra = ["--reverse"]
    out = tmp_path / "out.gguf"
    run = cli(model, out, "--direction", direction, "--steer", "0.3", *extra)
    want = {"reverse": "--steer adds one vector at the direction's block, in its MLP down projection: drop --reverse",
            "npy": "--steer needs a .safetensors direction file from `direction`",
            "post-norm": "gemma3 normalises each MLP output before adding it to the residual stream"}[case]
    assert run.returncode != 0 and want in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not out.exists()
