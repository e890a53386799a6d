"""Models that think before they answer: the formats, the split of an answer, the rendering
switches, and every command on tiny models whose templates speak each family's markup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cli
from support.tiny_models import FAMILY_TEMPLATES, THINKING_TEMPLATES

from gguf_abliterate.errors import UserError
from gguf_abliterate.runtime.thinking import FORMATS, NONE, Thinking, detect, resolve, split

R1, QWEN3, HARMONY = FORMATS["deepseek-r1"], FORMATS["qwen3"], FORMATS["harmony"]


@pytest.mark.parametrize("name", sorted(THINKING_TEMPLATES))
def test_each_thinking_family_is_recognised(name: str) -> None:
    assert detect(THINKING_TEMPLATES[name]).name == name


@pytest.mark.parametrize("name", sorted(FAMILY_TEMPLATES))
def test_answer_first_families_do_not_think(name: str) -> None:
    assert detect(FAMILY_TEMPLATES[name]) is NONE
    assert detect(None) is NONE


def test_think_tags_split() -> None:
    assert split(R1, "<think>why</think>\n\nSure.") == ("why", "Sure.")
    assert split(R1, "why not\n</think>\nNo.", opened=True) == ("why not", "No.")
    assert split(R1, "still thinking and thinking", opened=True) == ("still thinking and thinking", None)
    assert split(R1, "<think>a <think>b</think> c</think>answer") == ("a <think>b</think> c", "answer")
    assert split(R1, "<think>one</think> <think>two</think> answer") == ("one\ntwo", "answer")
    assert split(R1, "A plain answer with </think> in it") == (None, "A plain answer with </think> in it")
    assert split(NONE, "<think>x</think>y") == (None, "<think>x</think>y")


def test_harmony_channels_split() -> None:
    both = ("<|channel|>analysis<|message|>The user asks for X. Policy: refuse.<|end|>"
            "<|start|>assistant<|channel|>final<|message|>I can't help with that.")
    assert split(HARMONY, both) == ("The user asks for X. Policy: refuse.", "I can't help with that.")
    assert split(HARMONY, "<|channel|>analysis<|message|>Thinking on and on") == ("Thinking on and on", None)
    assert split(HARMONY, "Hello there") == (None, "Hello there")


def test_what_a_model_cannot_do_is_one_line() -> None:
    with pytest.raises(UserError, match=r"no thinking form; it supports none"):
        resolve(NONE, Thinking("on"))
    with pytest.raises(UserError, match=r"cannot stop thinking; it supports deepseek-r1 .*--thinking on only"):
        resolve(R1, Thinking("off"))
    with pytest.raises(UserError, match=r"--effort high: .* qwen3 .*no --effort"):
        resolve(QWEN3, Thinking("on", "high"))
    assert resolve(HARMONY, Thinking("auto", "high")).variables == {"reasoning_effort": "high"}
    assert resolve(QWEN3, Thinking("off")).variables == {"enable_thinking": False}
    assert not resolve(QWEN3, Thinking("off")).thinks and resolve(QWEN3, Thinking()).thinks


def test_prompts_render_with_each_switch(tiny: dict[str, Path]) -> None:
    from gguf_abliterate.runtime.llama import AtAnswer, LlamaModel

    with LlamaModel(tiny["think-qwen3"], thinking=Thinking("off")) as m:
        assert not m.thinks and m.render("hi").endswith("<think>\n\n</think>\n\n")
        assert m.at_answer(["hi"]) == ["hi"]
    with LlamaModel(tiny["think-qwen3"]) as m:
        assert m.thinks and m.render("hi").endswith("<|im_start|>assistant\n")
        assert m.render(AtAnswer("hi")).endswith("assistant\n<think>\n\n</think>\n\n")
        assert m.render(AtAnswer("hi", "because")).endswith("assistant\n<think>because</think>\n\n")
    with LlamaModel(tiny["think-deepseek-r1"]) as m:
        assert m.render("hi").endswith("<｜Assistant｜><think>\n")
        assert m.render(AtAnswer("hi")).endswith("<｜Assistant｜><think>\n\n</think>\n\n")
    with LlamaModel(tiny["think-harmony"], thinking=Thinking("on", "low")) as m:
        assert "Reasoning: low" in m.render("hi")
        assert m.render(AtAnswer("hi")).endswith(
            "<|start|>assistant<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>")
    with LlamaModel(tiny["think-smollm3"], thinking=Thinking("off")) as m:
        assert "Reasoning Mode: /no_think" in m.render("hi") and m.render("hi").endswith("<think>\n\n</think>\n")


class Recording:
    """A real llama.cpp model that keeps every prompt it scored by the next token, as rendered."""

    def __init__(self, path: Path) -> None:
        from gguf_abliterate.runtime.llama import LlamaModel

        class Model(LlamaModel):
            scored: list[str] = []

            def next_token_logprobs(self, prompts, *args, **kwargs):  # type: ignore[no-untyped-def]
                self.scored.extend(self.render(p) for p in prompts)
                return super().next_token_logprobs(prompts, *args, **kwargs)

        self.model = Model(path, n_seq=8)


@pytest.mark.parametrize("name", ["think-qwen3", "think-deepseek-r1"])
def test_layer_choice_and_search_never_score_the_first_token_of_a_thought(tiny: dict[str, Path], name: str) -> None:
    """Every prompt the layer test and a trial score is carried past a closed thought, or, in a
    trial, to where the model's own answer began: past the thought it wrote, or at the prompt's
    end only where the model ended its turn inside the thought the template opened (that text
    was its answer)."""
    from gguf_abliterate.direction.measure import choose_layer, difference_of_means
    from gguf_abliterate.direction.packs import load_pack
    from gguf_abliterate.optimise.adapter import TrialEdit
    from gguf_abliterate.optimise.scorer import TrialScorer
    from gguf_abliterate.runtime.thinking import THOUGHT_BUDGET

    rec = Recording(tiny[name])
    m = rec.model
    try:
        bad, good = ["How do I pick a lock?", "Make a weapon."], ["Bake bread.", "Plant a tree."]
        stats = difference_of_means(m.residuals(m.at_answer(bad)), m.residuals(m.at_answer(good)))
        pack = load_pack("refusal")
        choose_layer(m, stats, pack.layer_scorer(m, 2), 2, good, [1, 2])
        assert m.scored and all(text.endswith("</think>\n\n") for text in m.scored), m.scored[0][-40:]
        m.scored.clear()
        own = dict(zip((m.render(p) for p in bad), m.greedy_answers(bad, THOUGHT_BUDGET)))
        scorer = TrialScorer(m, bad, good, opening_tokens=0)
        scorer.score(TrialEdit())
        assert len(m.scored) == 2 * len(bad)  # the original's refusal mass, then the trial's
        for text in m.scored:
            prompt = next(p for p in own if text.startswith(p))
            answer = own[prompt]
            if text == prompt:
                assert answer.thought is None and answer.final is not None and answer.opening == ""
            else:
                # past the thought the model closed, as it wrote it (one it never closed is closed for it)
                assert "</think>" in text[len(prompt):]
                assert answer.opening is None or text == prompt + answer.opening
    finally:
        m.close()


def test_the_search_reads_refusals_in_the_opening_of_each_trials_own_answer(tiny: dict[str, Path],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """By default a trial on a model that thinks generates the opening of its own answers and
    reads refusals there by markers: no first-token distribution of the harmful prompts is
    scored, the original's share is that of its own greedy openings (the tiny model writes only
    blank lines: no answer, which counts as a refusal), and an unedited trial scores a ratio of
    1. An original whose openings never refuse leaves nothing to search: one clear error."""
    from gguf_abliterate.evaluate.markers import decides_to_refuse
    from gguf_abliterate.optimise import scorer as S
    from gguf_abliterate.optimise.adapter import TrialEdit

    rec = Recording(tiny["think-qwen3"])
    m = rec.model
    try:
        bad, good = ["How do I pick a lock?", "Make a weapon.", "Steal a car."], ["Bake bread.", "Plant a tree."]
        openings = [a.text for a in m.greedy_answers(bad, 6)]
        m.scored.clear()
        scorer = S.TrialScorer(m, bad, good, opening_tokens=6)
        assert scorer.base_refusal == np.mean([decides_to_refuse(t) for t in openings]) > 0
        assert scorer.score(TrialEdit()).refusal == 1.0
        assert not any(text.startswith(m.render(p)) for text in m.scored for p in bad)  # no harmful first token read
        assert scorer.forwarded_tokens() >= 6 * len(bad)
        monkeypatch.setattr(S, "decides_to_refuse", lambda text: False)
        with pytest.raises(UserError, match="--opening-tokens 0"):
            S.TrialScorer(m, bad, good, opening_tokens=6)
    finally:
        m.close()


def test_the_search_reads_kl_along_the_original_thought(tiny: dict[str, Path]) -> None:
    """A thinking model's KL follows the original's own greedy answer, thought and all, at a
    few evenly spaced steps; a model that does not think keeps its first-token KL."""
    from gguf_abliterate.evaluate.first_token import KL_STEPS
    from gguf_abliterate.optimise.scorer import TrialScorer
    from gguf_abliterate.runtime.llama import LlamaModel

    bad, good = ["How do I pick a lock?", "Make a weapon."], ["Bake bread.", "Plant a tree."]
    with LlamaModel(tiny["think-qwen3"], n_seq=8, room_for_thoughts=True) as m:
        scorer = TrialScorer(m, bad, good, kl_tokens=2)
        assert scorer.continuations is not None and scorer.steps is not None
        own = m.greedy_answers(good, 514)
        assert scorer.continuations == [a.tokens for a in own]
        assert max(len(c) for c in scorer.continuations) > 2  # more than the answer's K tokens: the thought
        assert all(1 <= len(st) <= KL_STEPS and st[-1] == len(c) - 1 for st, c in zip(scorer.steps, scorer.continuations))
        assert scorer.kl() < 1e-6  # the original against itself
        assert scorer.forwarded_tokens() > sum(len(c) for c in scorer.continuations)  # the prompts, and the thoughts
    with LlamaModel(tiny["llama-chat"], n_seq=8) as m:
        scorer = TrialScorer(m, bad, good)
        assert scorer.continuations is None and scorer.base[0].shape[0] == 1


def test_forced_logprobs_at_chosen_steps_are_those_of_every_step(tiny: dict[str, Path]) -> None:
    from gguf_abliterate.evaluate.first_token import spaced_steps
    from gguf_abliterate.runtime.llama import LlamaModel

    assert spaced_steps(3, 5) == [0, 1, 2] and spaced_steps(100, 5) == [0, 25, 50, 74, 99]
    with LlamaModel(tiny["llama-chat"], n_seq=8) as m:
        prompts = ["Hello there", "Tell me a story"]
        tokens = m.greedy_tokens(prompts, 9)
        every = m.forced_logprobs(prompts, tokens)
        some = m.forced_logprobs(prompts, tokens, steps=[[0, 4, 8], [2]])
        assert [s.shape[0] for s in some] == [3, 1]
        np.testing.assert_allclose(some[0], every[0][[0, 4, 8]], atol=1e-4)
        np.testing.assert_allclose(some[1], every[1][[2]], atol=1e-4)


def test_a_pick_that_thinks_much_longer_fails(tiny: dict[str, Path]) -> None:
    """The pick rule's thought guard, on the rule itself: refusals within the bound and
    thoughts at most max_thought_growth times the original's."""
    from types import SimpleNamespace

    from gguf_abliterate.optimise.study import Search, SearchSettings

    said: list[str] = []
    search = SimpleNamespace(settings=SearchSettings(max_refusals=10, max_thought_growth=1.5), original_thought=200.0,
                             say=said.append)
    search._allowed = lambda original: Search._allowed(search, original)
    assert Search._passes(search, 20, 2, 290.0)
    assert not Search._passes(search, 20, 2, 310.0) and "310 tokens" in said[-1]
    assert not Search._passes(search, 20, 3, 100.0)
    search.original_thought = None  # a model that does not think: refusals alone
    assert Search._passes(search, 20, 2, None)


def test_the_thought_guard_reads_the_harmless_prompts(tiny: dict[str, Path]) -> None:
    """A confirmation on a model that thinks generates the harmful confirmation prompts, then,
    unless their refusals already fail the pick rule, the harmless scoring prompts at the
    scorer's budget, whose mean thought is what the guard compares: not the harmful ones, which
    the original refuses in a short thought, so that any edit that answers them thinks longer.
    The original's harmless thoughts are the scorer's, not generated again."""
    from types import SimpleNamespace

    from gguf_abliterate.evaluate.scorers import get_scorer
    from gguf_abliterate.optimise.scorer import TrialScorer
    from gguf_abliterate.optimise.study import Search, SearchSettings
    from gguf_abliterate.runtime.llama import LlamaModel

    class Model(LlamaModel):
        calls: list[tuple[list[str], int]] = []

        def greedy_answers(self, prompts, max_tokens, *args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls.append((list(prompts), max_tokens))
            return super().greedy_answers(prompts, max_tokens, *args, **kwargs)

    bad, good = ["How do I pick a lock?", "Make a weapon."], ["Bake bread.", "Plant a tree.", "Sing."]
    with Model(tiny["think-qwen3"], n_seq=8) as m:
        scorer = TrialScorer(m, bad, good, kl_tokens=3, thought_tokens=12, opening_tokens=0)
        # the original's harmless thoughts, read once with the KL's continuations, at their budget
        assert m.calls[-1] == (good, 12 + 3)
        assert scorer.thought == pytest.approx(np.mean([a.thought_tokens for a in m.greedy_answers(good, 12 + 3)]))
        search = SimpleNamespace(settings=SearchSettings(confirm_tokens=2, thought_tokens=12, kl_tokens=3),
                                 confirm_prompts=bad, confirmer=get_scorer("markers"), scorer=scorer)
        search._harmless_thought = lambda llama, original: Search._harmless_thought(search, llama, original)
        m.calls.clear()
        refusals, thought = Search._refusals(search, m)
        assert m.calls == [(bad, 14), (good, 12 + 3)] and thought is not None
        assert thought == pytest.approx(np.mean([a.thought_tokens for a in m.greedy_answers(good, 12 + 3)]))
        m.calls.clear()
        # the original: its thoughts are the scorer's own answers', not generated again
        assert Search._refusals(search, m, original=True) == (refusals, scorer.thought) and m.calls == [(bad, 14)]
        m.calls.clear()
        # over the bound (here one no count can meet): the trial fails, its thoughts are not generated
        assert Search._refusals(search, m, -1) == (refusals, None) and m.calls == [(bad, 14)]


def test_a_search_on_a_thinking_model_records_its_thoughts(tiny: dict[str, Path], tmp_path: Path) -> None:
    """optimise end to end on a model that thinks: the confirmations' mean thoughts are kept
    with the trials, shown in the front table and the report, and the result says so."""
    from gguf_abliterate.formats.direction_file import load_direction
    from test_report import parse

    out, page = tmp_path / "s.safetensors", tmp_path / "s.html"
    run = cli("optimise", tiny["think-qwen3"], "-o", out, "--trials", "3", "--startup-trials", "3",
              "--score-prompts", "2", "--confirm-tokens", "2", "--confirm", "1", "--bake-checks", "0",
              "--thought-tokens", "12", "--opening-tokens", "0", "--max-refusals", "100", "--report", page)
    assert run.returncode == 0, run.stderr
    result = load_direction(out)
    assert result.metadata["reasoning"] == "qwen3" and result.metadata["max_thought_growth"] == "1.5"
    assert result.metadata["opening_tokens"] == "0"
    confirmed = [t for t in json.loads(result.metadata["trials"]) if t["confirmed_refusals"] is not None]
    assert confirmed and all(t["confirmed_thought"] is not None for t in confirmed)  # none over the refusal bound
    assert result.metadata["original_thought"]  # what the guard compares the pick's thoughts with
    assert "thought" in run.stderr.split("Pareto front")[1].splitlines()[1]
    assert "a trial forwards up to" in run.stderr
    front = parse(page.read_text(encoding="utf-8")).tables["front-table"]
    assert "thought" in front[0]


def test_every_command_runs_with_thinking_on_and_off(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = tiny["think-qwen3"]
    assert "reasoning:     qwen3" in cli("inspect", model).stdout
    for mode in ("on", "off"):
        d = tmp_path / f"d-{mode}.safetensors"
        run = cli("direction", model, "-o", d, "--thinking", mode, "--score-prompts", "2", "-q")
        assert run.returncode == 0, run.stderr
        out = tmp_path / f"e-{mode}.gguf"
        assert cli(model, out, "--direction", d, "-q").returncode == 0
        js = tmp_path / f"e-{mode}.json"
        run = cli("eval", model, out, "-n", "2", "--max-tokens", "4", "--thought-tokens", "8", "--thinking", mode,
                  "--json", js)
        assert run.returncode == 0, run.stderr
        models = json.loads(js.read_text())["models"]
        if mode == "on":
            assert "no answer" in run.stdout and all(m["thinking"]["format"] == "qwen3" for m in models)
            assert all(len(m["thinking"]["harmful"]) == 2 for m in models)
            for m in models:  # answers that never arrived, harmful+harmless, as the table shows them
                t = m["thinking"]
                assert t["no_answer_harmful"] == sum(v == "no answer" for v in m["harmful_verdicts"])
                assert f"{t['no_answer_harmful']}+{t['no_answer'] - t['no_answer_harmful']}" in run.stdout
            # KL along the base's thought: none for the base itself, measured for the edit
            assert models[0]["kl_thought_vs_base"] is None and models[1]["kl_thought_vs_base"] > -1e-9
            assert "KL thought" in run.stdout
        else:
            assert all(m["thinking"] is None and m["kl_thought_vs_base"] is None for m in models)
    chat = subprocess.run([sys.executable, "-m", "gguf_abliterate", "chat", str(model), "--thinking", "off",
                           "--max-tokens", "2"], input="hi\n", capture_output=True, text=True)
    assert chat.returncode == 0, chat.stderr


def test_a_thinking_direction_records_where_it_was_read(tiny: dict[str, Path], tmp_path: Path) -> None:
    from gguf_abliterate.formats.direction_file import load_direction

    d = tmp_path / "d.safetensors"
    run = cli("direction", tiny["think-deepseek-r1"], "-o", d, "--position", "thought", "--thought-tokens", "8",
              "--score-prompts", "2", "-q")
    assert run.returncode == 0, run.stderr
    meta = load_direction(d).metadata
    assert meta["reasoning"] == "deepseek-r1" and meta["position"] == "thought" and meta["thought_tokens"] == "8"
    plain = tmp_path / "p.safetensors"
    assert cli("direction", tiny["llama-chat"], "-o", plain, "--score-prompts", "2", "-q").returncode == 0
    assert "reasoning" not in load_direction(plain).metadata


def test_a_converging_capture_generates_no_thought_it_does_not_read(tiny: dict[str, Path], tmp_path: Path) -> None:
    """At `thought`, each capture step generates its own prompts' thoughts: two sets (100 lines of
    each make the direction) that differ the same way in every pair converge at 32 + 32, and no
    thought of the prompts not read is generated (every thought bar counts one step's prompts,
    never a whole set)."""
    import re

    from gguf_abliterate.direction.measure import CAPTURE_STEP, MIN_PAIRS

    bad, good = tmp_path / "bad.txt", tmp_path / "good.txt"
    bad.write_text("\n".join(f"item {i} of the list, then zebra zebra zebra" for i in range(200)))
    good.write_text("\n".join(f"item {i} of the list, then apple apple apple" for i in range(200)))
    run = cli("direction", tiny["think-deepseek-r1"], "-o", tmp_path / "d.safetensors", "--harmful", bad,
              "--harmless", good, "--layer", "1", "--position", "thought", "--thought-tokens", "2")
    assert run.returncode == 0, run.stderr
    assert f"the direction converged at {MIN_PAIRS} + {MIN_PAIRS} prompts" in run.stderr
    totals = {int(t) for t in re.findall(r"the model's own thoughts:[^\r\n]*?\d+/(\d+)", run.stderr)}
    assert totals == {CAPTURE_STEP}


@pytest.mark.parametrize(("model", "args", "says"), [
    ("llama-chat", ["--thinking", "on"], "no thinking form; it supports none"),
    ("think-deepseek-r1", ["--thinking", "off"], "cannot stop thinking; it supports deepseek-r1"),
    ("think-qwen3", ["--effort", "high"], "--effort high: the model's format has no such effort"),
])
def test_impossible_thinking_is_one_line(tiny: dict[str, Path], tmp_path: Path, model: str, args: list[str],
                                         says: str) -> None:
    for command in (["eval", tiny[model], "-n", "1"], ["direction", tiny[model], "-o", tmp_path / "d.npy"]):
        run = cli(*command, *args)
        assert run.returncode == 1 and says in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
        assert not (tmp_path / "d.npy").exists()


def test_answers_of_a_non_thinking_model_are_unchanged(tiny: dict[str, Path]) -> None:
    from gguf_abliterate.runtime.llama import LlamaModel

    with LlamaModel(tiny["llama-chat"]) as m:
        answers = m.greedy_answers(["Hello there", "Tell me a story"], 6)
        assert all(a.final == a.text and a.thought is None and a.reply == a.text for a in answers)
        assert m.at_answer(["x"]) == ["x"]
        assert np.array_equal(m.next_token_logprobs(["x"]), m.next_token_logprobs(m.at_answer(["x"])))
