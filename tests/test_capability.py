"""Capability edits: problem generators checked by independent solvers, splits that never mix,
the paired statistics against hand-computed cases, the residual and head means over an answer's
tokens, head-restricted edits (only the chosen heads' columns change, and the edit equals its
adapter inside llama.cpp), and bad input as one line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import cli
from support.tiny_models import TinySpec, build_model
from gguf import GGMLQuantizationType

from gguf_abliterate.edit.options import EditOptions, parse_heads
from gguf_abliterate.edit.plan import plan_edit
from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.capability import Paired, mcnemar_exact, wilson
from gguf_abliterate.evaluate.problems import FAMILIES, SPLITS, answer_value, generate, load_problems
from gguf_abliterate.gguf_io import Model

# -- the generators, against solvers written apart from them ----------------------------------

WORDS = {"doubles": 2, "triples": 3}


def solve_arithmetic(q: str) -> int:
    """Reads the story sentence by sentence, as a person would."""
    sentences = re.findall(r"[^.?]+[.?]", q)
    value = int(re.search(r"\d+", sentences[0])[0])
    for s in sentences[1:-1]:
        n = [int(x) for x in re.findall(r"\d+", s)]
        if "equally into" in s:
            value //= n[0]
        elif "equally with" in s:
            value //= n[0] + 1
        elif any(w in s for w in WORDS):
            value *= next(k for w, k in WORDS.items() if w in s)
        elif any(w in s for w in ("gives away", "loses", "sells")):
            value -= n[0]
        else:
            value += n[0]
    return value


def solve_percent(q: str) -> int:
    n = [int(x) for x in re.findall(r"\d+", q)]
    if "walk to school" in q:
        return round(n[0] * (100 - n[1]) / 100)
    if "% off" in q:
        return round(n[0] * (100 - n[1]) / 100)
    if "film lasts" in q:
        return (n[0] * 60 + n[1]) * n[2]
    if "grams of flour" in q:
        return n[1] * 1000 - n[0] * n[2]
    if "cyclist" in q:
        return round(n[0] * n[1] / 60)
    return round(n[0] * (100 + n[1]) / 100) - n[2]


def solve_code(q: str) -> int:
    code = q.split("```python\n")[1].split("```")[0]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(code, {})
    return int(out.getvalue().split()[-1])


SOLVERS = {"arithmetic": solve_arithmetic, "percent": solve_percent, "code": solve_code}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generated_answers_match_an_independent_solver(family: str) -> None:
    problems = [p for split in SPLITS for p in generate(family, split, 120, seed=3)]
    assert {p.family for p in problems} == {family}
    wrong = [(p.question, p.answer) for p in problems if SOLVERS[family](p.question) != p.answer]
    assert not wrong, wrong[:3]
    assert all(p.answer >= 0 for p in problems if family != "code")


def test_splits_never_share_a_problem_whatever_the_seed() -> None:
    for family in FAMILIES:
        seen: dict[str, str] = {}
        for seed in range(3):
            for split in SPLITS:
                for p in generate(family, split, 60, seed):
                    assert seen.setdefault(p.question, split) == split, (family, p.question)
                    assert p.split == split


def test_generation_is_repeatable_and_distinct() -> None:
    a, b = generate("arithmetic", "heldout", 50, 7), generate("arithmetic", "heldout", 50, 7)
    assert a == b and len({p.question for p in a}) == 50
    assert generate("arithmetic", "heldout", 50, 8) != a


def test_answer_reading() -> None:
    assert answer_value("12 + 5 = 17\nAnswer: 17") == 17
    assert answer_value("Answer: 1,250 apples, then 3 more lines 4") == 1250
    assert answer_value("**Answer:** 42") == 42
    assert answer_value("so the result is 8.") == 8
    assert answer_value("no number") is None


# -- the statistics, against hand-computed cases -----------------------------------------------

def test_wilson_interval_hand_computed() -> None:
    # 40/100: centre (0.4 + 1.96^2/200) / (1 + 1.96^2/100) = 0.40370; half 1.96 sqrt(0.0024 + 1.96^2/40000)
    # / 1.038416 = 0.09430
    lo, hi = wilson(40, 100)
    assert lo == pytest.approx(0.3094, abs=2e-4) and hi == pytest.approx(0.4980, abs=2e-4)
    assert wilson(0, 10)[0] == 0.0 and wilson(0, 10)[1] == pytest.approx(0.2775, abs=2e-4)
    assert wilson(0, 0) == (0.0, 1.0)


def test_mcnemar_exact_hand_computed() -> None:
    # 1 gained, 9 lost: 2 * (C(10,0) + C(10,1)) / 2^10 = 22/1024
    assert mcnemar_exact(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_exact(9, 1) == pytest.approx(22 / 1024)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)
    p = Paired.of([True, True, False, False, True], [True, False, True, True, True])
    assert (p.gained, p.lost) == (2, 1) and p.p_value == 1.0
    assert math.isclose(mcnemar_exact(30, 12), 2 * sum(math.comb(42, i) for i in range(13)) / 2 ** 42)


# -- problem files ----------------------------------------------------------------------------

def test_problem_file_split_and_bad_lines(tmp_path: Path) -> None:
    f = tmp_path / "mine.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "answer": 2 * i} for i in range(200)]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    held = load_problems(f, "heldout")
    direction = load_problems(f, "direction")
    assert held and direction and not {p.question for p in held} & {p.question for p in direction}
    assert all(p.family == "mine" for p in held)
    for text, why in (('{"question": "x"}', "question and an answer"), ('{"question": "x", "answer": 1.5}', "integer"),
                      ("not json", "question and an answer"), ("", "no problems")):
        f.write_text(text + "\n")
        with pytest.raises(UserError, match=why):
            load_problems(f, "heldout")


def test_unknown_family_and_split() -> None:
    with pytest.raises(UserError, match="families are arithmetic, percent, code"):
        generate("algebra", "heldout", 1)
    with pytest.raises(UserError, match="splits are"):
        generate("arithmetic", "train", 1)


# -- inside llama.cpp ------------------------------------------------------------------------------

def test_answer_means_equal_the_residual_at_each_answer_token(tiny: dict[str, Path]) -> None:
    """A one-token continuation's mean is the residual at that token, read another way: the
    prompt with the token appended, at its last token (`residuals`)."""
    from gguf_abliterate.runtime.llama import LlamaModel

    with LlamaModel(tiny["qwen2"], chat=False) as m:
        prompt, words = "one two three", [" a", " b", " c"]  # one token each in the tiny vocabulary
        base = m.tokenize(prompt)
        texts = [prompt + "".join(words[: k + 1]) for k in range(len(words))]
        more = m.tokenize(texts[-1])[len(base):]
        assert [m.tokenize(t) for t in texts] == [base + more[: k + 1] for k in range(len(more))]  # same tokens
        ends = np.stack([m.residuals([t])[0] for t in texts])  # (k, n_layer, n_embd): at each answer token
        means, heads = m.answer_means([prompt], [more])
        assert len(more) > 1
        assert np.allclose(means[0, :-1], ends.mean(axis=0)[:-1], atol=1e-3)
        assert np.allclose(means[0, -1], ends[-1, -1], atol=1e-3)  # the last block: llama.cpp keeps the last token
        assert not np.allclose(means[0, 1], ends[-1, 1], atol=1e-3)  # a mean, not the last token
        first, _ = m.answer_means([prompt], [more[:1]])
        assert np.allclose(first[0], ends[0], atol=1e-3)
        assert heads.shape == (1, m.n_layer, 256)  # four heads of 64, side by side


# -- head-restricted edits ---------------------------------------------------------------------

def test_head_restricted_edit_changes_only_those_columns(tiny: dict[str, Path], tmp_path: Path) -> None:
    src = build_model(tmp_path / "f32.gguf", TinySpec(arch="qwen2", tied=False, default_type=GGMLQuantizationType.F32))
    d = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32)
    np.save(tmp_path / "d.npy", d)
    out = tmp_path / "out.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.npy", "--heads", "1.2,3.0")
    assert run.returncode == 0, run.stderr
    assert "head-restricted edit" in run.stderr
    a, b = Model(src), Model(out)
    for name in a.tensors:
        before, after = a.values(name), b.values(name)
        if name in ("blk.1.attn_output.weight", "blk.3.attn_output.weight"):
            head = 2 if name.startswith("blk.1") else 0
            cols = np.r_[head * 64 : (head + 1) * 64]
            rest = np.setdiff1d(np.arange(256), cols)
            assert np.array_equal(before[:, rest], after[:, rest]), name
            u = d[int(name[4])] / np.linalg.norm(d[int(name[4])])
            assert np.abs(u @ after[:, cols]).max() < 1e-5 < np.abs(u @ before[:, cols]).max()
        else:
            assert np.array_equal(before, after), name


def test_head_restricted_edit_equals_its_adapter(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The baked F32 edit and its LoRA export give the same next-token distributions in llama.cpp."""
    from gguf_abliterate.runtime.llama import LlamaModel

    d = np.random.default_rng(1).normal(size=(4, 256)).astype(np.float32)
    np.save(tmp_path / "d.npy", d)
    baked, lora = tmp_path / "baked.gguf", tmp_path / "edit.lora.gguf"
    for args in ((tiny["qwen2"], baked, "--requant-type", "f32"), (tiny["qwen2"], lora, "--format", "lora")):
        run = cli(*args, "--direction", tmp_path / "d.npy", "--heads", "0.1,2.3", "--scale", "3")
        assert run.returncode == 0, run.stderr
    prompts = ["hello there", "one two three four"]
    with LlamaModel(tiny["qwen2"], chat=False) as m:
        plain = m.next_token_logprobs(prompts)
        m.set_lora(lora)
        adapted = m.next_token_logprobs(prompts)
    with LlamaModel(baked, chat=False) as m:
        direct = m.next_token_logprobs(prompts)
    from gguf_abliterate.evaluate.first_token import kl_divergence

    assert kl_divergence(direct, adapted) < 1e-3 < kl_divergence(plain, adapted)


def test_bad_heads_are_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", np.ones(256, np.float32))
    for heads, why in (("1.9", "block 1 has heads 0-3"), ("7.0", "blocks 0-3"), ("1-2", "block.head pairs")):
        run = cli(tiny["qwen2"], tmp_path / "o.gguf", "--direction", tmp_path / "d.npy", "--heads", heads)
        assert run.returncode == 1 and why in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert not (tmp_path / "o.gguf").exists()
    run = cli(tiny["qwen2"], tmp_path / "o.gguf", "--direction", tmp_path / "d.npy", "--heads", "1.0", "--steer", "0.2")
    assert run.returncode == 1 and "--heads" in run.stderr


def test_plan_with_heads_edits_nothing_else(tiny: dict[str, Path]) -> None:
    model = Model(tiny["llama"])  # llama with output biases: the bias is not a head's
    plan = plan_edit(model, EditOptions(), heads=parse_heads("0.0,0.3,2.1"))
    assert sorted(plan.edits) == ["blk.0.attn_output.weight", "blk.2.attn_output.weight"]
    assert plan.edits["blk.0.attn_output.weight"].columns == ((0, 64), (192, 256))
    assert plan.edits["blk.2.attn_output.weight"].columns == ((64, 128),)


# -- the direction and the evaluation, end to end ------------------------------------------------

def test_capability_direction_reads_right_minus_wrong_and_picks_writing_heads(tiny: dict[str, Path]) -> None:
    """On the model's own answers, labelled by a mask: the block directions are the unit mean
    differences of the answer-averaged residuals, and each chosen head's score is its write
    along the failure side, recomputed here from the weights."""
    from gguf_abliterate.direction.capability import Labelled, label, measure
    from gguf_abliterate.evaluate.problems import generate
    from gguf_abliterate.runtime.llama import LlamaModel

    problems = generate("arithmetic", "direction", 20)
    with LlamaModel(tiny["qwen2"]) as m:
        answers = label(m, problems, 6).answers
        right = np.arange(20) % 2 == 0
        found = measure(m, Model(tiny["qwen2"]), Labelled(problems, answers, right), n_heads=3)
        residual, heads_out = m.answer_means([p.prompt for p in problems], [a.tokens for a in answers])
    diff = residual[right].mean(axis=0) - residual[~right].mean(axis=0)
    assert np.allclose(found.directions, diff / np.linalg.norm(diff, axis=1, keepdims=True), atol=1e-4)
    weights = Model(tiny["qwen2"])
    fail = heads_out[~right].mean(axis=0)
    for block, chosen in found.heads.items():
        w = weights.values(f"blk.{block}.attn_output.weight")
        for h in chosen:
            score = -found.directions[block] @ w[:, h * 64:(h + 1) * 64] @ fail[block, h * 64:(h + 1) * 64]
            assert score == pytest.approx(found.head_scores[block, h], rel=1e-3, abs=1e-5)
    assert sum(len(h) for h in found.heads.values()) == 3
    best = np.sort(found.head_scores, axis=None)[-3:]
    assert {round(float(found.head_scores[b, h]), 6) for b, hs in found.heads.items() for h in hs} \
        == {round(float(x), 6) for x in best}


def test_capability_commands_on_a_tiny_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`eval --capability` runs end to end and keeps every answer; `direction --capability` on a
    model that solves nothing says so in one line and writes nothing."""
    f = tmp_path / "sums.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": 2 * i}) for i in range(80)))
    out = tmp_path / "eval.json"
    run = cli("eval", tiny["qwen2"], tiny["qwen2"], "--capability", f, "--problems", "6", "--max-tokens", "4",
              "--json", out, "-q")
    assert run.returncode == 0, run.stderr
    assert "accuracy (95% CI)" in run.stdout and "+0/-0" in run.stdout  # the same model: nothing discordant
    saved = json.loads(out.read_text())
    assert len(saved["problems"]) == 6 and saved["settings"]["split"] == "heldout"
    assert all(len(m["answers"]) == 6 for m in saved["models"])
    assert all(sum(not f for f in m["finished"]) == m["unfinished"] for m in saved["models"])
    held = {p["question"] for p in saved["problems"]}
    assert held <= {p.question for p in load_problems(f, "heldout")}
    d = tmp_path / "d.safetensors"
    run = cli("direction", tiny["qwen2"], "-o", d, "--capability", f, "--problems", "16", "-q")
    assert run.returncode == 1 and "a direction needs at least 8 right and 8 wrong" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not d.exists()
    run = cli("direction", tiny["qwen2"], "-o", d, "--capability", "arithmetic", "--layer", "3")
    assert run.returncode == 1 and "drop --layer" in run.stderr
    run = cli("eval", tiny["qwen2"], "--capability", "arithmetic", "--judge", tiny["qwen2"])
    assert run.returncode == 1 and "drop --judge" in run.stderr
    run = cli("direction", tiny["qwen2"], "-o", tmp_path / "d.npy", "--capability", "arithmetic")
    assert run.returncode == 1 and "write a .safetensors file" in run.stderr


def test_a_stopped_labelling_resumes_from_its_log(tiny: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers are logged a batch at a time; a run that finds the log (a batch and a line cut by
    the stop) takes those answers as they are and generates only the rest; the command removes
    the log once the direction is written, or when the answers cannot make one."""
    from gguf_abliterate.direction.answer_log import AnswerLog, answers_dir
    from gguf_abliterate.direction.capability import LOG_BATCH, label
    from gguf_abliterate.runtime.llama import LlamaModel

    monkeypatch.setenv("GGUF_ABLITERATE_ANSWERS", str(tmp_path / "answers"))
    problems = generate("arithmetic", "direction", LOG_BATCH + 6)
    log = AnswerLog("digest", [p.prompt for p in problems], 3)
    with LlamaModel(tiny["qwen2"]) as m:
        whole = label(m, problems, 3, log=log)
        lines = log.path.read_text().splitlines()
        assert len(lines) == len(problems)
        log.path.write_text("\n".join(lines[:LOG_BATCH]) + "\n" + lines[LOG_BATCH][:20])  # stopped mid-write
        counted: list[int] = []
        again = label(m, problems, 3, counted.append, log)
    assert counted[0] == LOG_BATCH and sum(counted) == len(problems)  # the logged ones, then the rest
    assert [a.tokens for a in again.answers] == [a.tokens for a in whole.answers]
    assert (again.right == whole.right).all() and len(log.load()) == len(problems)
    assert AnswerLog("digest", [p.prompt for p in problems], 4).path != log.path  # another budget: another log
    f = tmp_path / "sums.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": 2 * i}) for i in range(80)))
    run = cli("direction", tiny["qwen2"], "-o", tmp_path / "d.safetensors", "--capability", f, "--problems", "16",
              "-q", env={"GGUF_ABLITERATE_ANSWERS": str(answers_dir())})
    assert run.returncode == 1 and "needs at least 8 right" in run.stderr
    assert [p.name for p in answers_dir().iterdir()] == [log.path.name]  # the command's own log is gone


def test_finished_only_keeps_the_answers_that_ended(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`--finished-only` drops the answers the budget cut before the difference of means; when
    too few are left it says so in one line and keeps the answer log (the same answers still
    serve without the flag); without --capability the flag is refused."""
    from gguf_abliterate.direction.capability import Labelled
    from gguf_abliterate.runtime.llama import Answer

    problems = generate("arithmetic", "direction", 5)
    answers = [Answer(f"a{i}", [i], finished=i % 2 == 0) for i in range(5)]
    kept = Labelled(problems, answers, np.array([True, True, False, False, True])).only_finished()
    assert [a.text for a in kept.answers] == ["a0", "a2", "a4"] and kept.right.tolist() == [True, False, True]
    assert kept.problems == [problems[0], problems[2], problems[4]]
    f = tmp_path / "sums.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": 2 * i}) for i in range(80)))
    answers_dir = tmp_path / "answers"
    run = cli("direction", tiny["qwen2"], "-o", tmp_path / "d.safetensors", "--capability", f, "--problems", "16",
              "--finished-only", "-q", env={"GGUF_ABLITERATE_ANSWERS": str(answers_dir)})
    assert run.returncode == 1 and "answers that finished are right" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and len(list(answers_dir.iterdir())) == 1
    run = cli("direction", tiny["qwen2"], "-o", tmp_path / "d.npy", "--finished-only")
    assert run.returncode == 1 and "give it with --capability" in run.stderr


def test_worked_answers() -> None:
    from gguf_abliterate.direction.capability import worked

    assert worked("12 + 5 = 17\n17 * 2 = 34\nAnswer: 34")
    assert not worked("The answer is 34.\nAnswer: 34")
    assert not worked("She has some apples and gives them away.\nThen she buys more.")


# -- the search ----------------------------------------------------------------------------------

@pytest.fixture
def capability_file(tiny: dict[str, Path], tmp_path: Path) -> Path:
    """A capability direction measured on the tiny model's own answers, labelled by a mask (it
    solves nothing), written as `direction --capability` writes it."""
    from gguf_abliterate.direction.capability import Labelled, label, measure
    from gguf_abliterate.edit.options import format_heads
    from gguf_abliterate.formats.direction_file import HEAD_SCORES, save_direction
    from gguf_abliterate.runtime.llama import LlamaModel

    problems = generate("arithmetic", "direction", 20)
    with LlamaModel(tiny["qwen2"]) as m:
        answers = label(m, problems, 6).answers
        found = measure(m, Model(tiny["qwen2"]), Labelled(problems, answers, np.arange(20) % 2 == 0), n_heads=3)
    path = tmp_path / "cap.safetensors"
    save_direction(path, found.directions, {"behaviour": "capability:arithmetic", "heads": format_heads(found.heads)},
                   {HEAD_SCORES: found.head_scores})
    return path


def test_a_search_trial_is_the_head_restricted_edit(tiny: dict[str, Path], tmp_path: Path,
                                                     capability_file: Path) -> None:
    """A trial's adapter (top 5 heads, strength -3: amplifying) and the F32 bake of those heads at
    --scale 3 --reverse give the same next-token distributions in llama.cpp; the heads are the
    file's ranking, highest first."""
    from gguf_abliterate.edit.options import format_heads
    from gguf_abliterate.evaluate.first_token import kl_divergence
    from gguf_abliterate.formats.direction_file import load_direction
    from gguf_abliterate.optimise.capability import HeadAdapters, heads_map, ranked_heads
    from gguf_abliterate.runtime.llama import LlamaModel

    direction = load_direction(capability_file)
    assert direction.head_scores is not None and direction.head_scores.shape == (4, 4)
    ranked = ranked_heads(direction.head_scores, 8)
    scores = [direction.head_scores[b, h] for b, h in ranked]
    assert scores == sorted(scores, reverse=True) and scores[0] == direction.head_scores.max()
    adapters = HeadAdapters(Model(tiny["qwen2"]), direction, ranked)
    baked = tmp_path / "baked.gguf"
    run = cli(tiny["qwen2"], baked, "--direction", capability_file, "--heads", format_heads(heads_map(ranked[:5])),
              "--scale", "3", "--reverse", "--requant-type", "f32")
    assert run.returncode == 0, run.stderr
    prompts = ["hello there", "one two three four"]
    with LlamaModel(tiny["qwen2"], chat=False) as m:
        plain = m.next_token_logprobs(prompts)
        m.set_adapter(adapters.edit(5, -3.0))
        adapted = m.next_token_logprobs(prompts)
    with LlamaModel(baked, chat=False) as m:
        direct = m.next_token_logprobs(prompts)
    assert kl_divergence(direct, adapted) < 1e-3 < kl_divergence(plain, adapted)


def test_capability_search_end_to_end(tiny: dict[str, Path], tmp_path: Path, capability_file: Path) -> None:
    """`optimise --capability` records every trial (the first: the file's own edit, full
    removal); it writes a strength and heads of its own only for a trial confirmed to answer
    more search problems right than the original; a recorded strength is what the edit then
    takes (the same bytes as giving it by hand); misuse is one line."""
    from gguf_abliterate.formats.direction_file import load_direction, save_direction

    out = tmp_path / "pick.safetensors"
    run = cli("optimise", tiny["qwen2"], "--capability", "arithmetic", "--from", capability_file, "-o", out,
              "--problems", "8", "--trials", "3")
    assert run.returncode == 0, run.stderr
    saved = load_direction(out)
    search = json.loads(saved.metadata["search"])
    assert [t["number"] for t in search["trials"]] == [0, 1, 2]
    assert (search["trials"][0]["heads"], search["trials"][0]["strength"]) == (16, 1.0)
    assert all(t["kl"] >= 0 and t["answer_ll"] <= 0 for t in search["trials"])
    confirmed = [t for t in search["trials"] if t["confirmed"] is not None]
    if "chosen_trial" in saved.metadata:  # a confirmed trial answered more right (by luck, on a random model)
        chosen = next(t for t in search["trials"] if t["number"] == int(saved.metadata["chosen_trial"]))
        assert chosen["confirmed"] > search["original_right"] and chosen in confirmed
        assert float(saved.metadata["edit_strength"]) == pytest.approx(chosen["strength"], rel=1e-5)
        assert len(saved.metadata["heads"].split(",")) == chosen["heads"] and f"trial {chosen['number']}" in run.stderr
    else:
        assert all(t["confirmed"] <= search["original_right"] for t in confirmed)
        assert "no confirmed trial answered more search problems right" in run.stderr
        assert "edit_strength" not in saved.metadata
        assert saved.metadata["heads"] == load_direction(capability_file).metadata["heads"]
    picked = tmp_path / "strength.safetensors"
    save_direction(picked, saved.vectors, {**saved.metadata, "edit_strength": "-0.7"}, {})
    by_file, by_hand = tmp_path / "file.gguf", tmp_path / "hand.gguf"
    run = cli(tiny["qwen2"], by_file, "--direction", picked)
    assert run.returncode == 0 and "strength -0.7 from strength.safetensors" in run.stderr, run.stderr
    assert cli(tiny["qwen2"], by_hand, "--direction", picked, "--scale", "0.7", "--reverse", "-q").returncode == 0
    assert by_file.read_bytes() == by_hand.read_bytes()
    for args, says in (([], "--capability needs --from"), (["--from", capability_file, "--judge", tiny["qwen2"]],
                                                            "drop --judge"),
                       (["--from", tiny["qwen2"]], "direction files must be")):
        run = cli("optimise", tiny["qwen2"], "--capability", "arithmetic", "-o", tmp_path / "x.safetensors", *args)
        assert run.returncode == 1 and says in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    run = cli("optimise", tiny["qwen2"], "-o", tmp_path / "x.safetensors", "--problems", "9")
    assert run.returncode == 1 and "--problems: only with --capability" in run.stderr
    assert not (tmp_path / "x.safetensors").exists()
