"""`chat`: driven through a pseudo-terminal as a person would, and its conversation logic."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from conftest import ROOT, cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def clean(text: str) -> str:
    return ANSI.sub("", text).replace("\r\n", "\n")


class Session:
    """`gguf-abliterate chat` in a pty."""

    def __init__(self, *args: str | Path, env: dict[str, str] | None = None):
        import pexpect

        # Ctrl-C as in a person's terminal: a suite started in the background (`cmd &` in a script)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler at all
        self.p = pexpect.spawn(sys.executable, ["-m", "gguf_abliterate", "chat", *map(str, args)], cwd=str(ROOT),
                               env={**os.environ, "NO_COLOR": "1", **(env or {})}, encoding="utf-8", timeout=90,
                               dimensions=(50, 200),
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def prompt(self) -> str:
        """Everything printed up to the next prompt."""
        self.p.expect_exact(">>> ")
        return clean(self.p.before)

    def say(self, line: str) -> str:
        self.p.sendline(line)
        return self.prompt()


def answers(printed: str, labels: list[str]) -> list[str]:
    """Each labelled model's answer in what one turn printed."""
    parts = re.split("|".join(re.escape(f"[{name}]\n") for name in labels), printed)
    assert len(parts) == len(labels) + 1, printed
    return [p.strip() for p in parts[1:]]


def test_chat_two_models_in_a_terminal(tiny: dict[str, Path]) -> None:
    """Two turns, /reset, Ctrl-C during an answer (and at the prompt), /quit; each model labelled,
    greedy answers repeatable once the history is forgotten."""
    a, b = tiny["llama-chat"], tiny["llama-nobias"]
    s = Session(a, b, "--temperature", "0", "--max-tokens", "12", "--ctx", "4096")
    start = s.prompt()
    assert f"note: {b.name} has no chat template" in start and f"note: {a.name}" not in start
    assert f"chatting with {a.name} and {b.name}" in start
    labels = [a.name, b.name]
    first = answers(s.say("hello how are you"), labels)
    assert all(first), first
    second = answers(s.say("and what is the time"), labels)
    assert all(second)
    assert "(conversation forgotten: 2 exchanges)" in s.say("/reset")
    assert answers(s.say("hello how are you"), labels) == first  # the same fresh start, greedily
    assert "(max-tokens 3000)" in s.say("/set max-tokens 3000")

    s.p.sendline("tell me everything")
    for name in labels:  # each Ctrl-C stops the answer under way; the next model then answers
        s.p.expect_exact(f"[{name}]")
        s.p.expect(r"(?s).{8}")  # it is streaming (a random model's answer may be all newlines)
        s.p.sendintr()
        s.p.expect_exact("[stopped]")
    s.prompt()
    s.p.sendintr()  # at the prompt: a hint, not an exit
    assert "(Ctrl-C stops an answer; /quit or Ctrl-D leaves)" in s.prompt()
    assert "unknown command /nope" in s.say("/nope")
    s.p.sendline("/quit")
    s.p.expect(__import__("pexpect").EOF)
    s.p.close()
    assert s.p.exitstatus == 0


def test_chat_keeps_history_in_the_template_and_fits_the_context(tiny: dict[str, Path]) -> None:
    """The conversation is rendered with the model's own template, each exchange in order, the
    system message first; when it no longer fits, the oldest exchanges go first."""
    from gguf_abliterate.runtime.chat import ChatModel, Reply, Sampling

    m = ChatModel(tiny["llama-chat"], n_ctx=256)
    try:
        m.system = "be brief"
        never = lambda: False  # noqa: E731
        first = Reply()
        "".join(m.answer("first question", Sampling(max_tokens=8, temperature=0), never, first))
        second = Reply()
        "".join(m.answer("second question", Sampling(max_tokens=8, temperature=0), never, second))
        assert m.turns == 2 and [t["role"] for t in m.history] == ["user", "assistant"] * 2
        assert m.history[1]["content"] == first.text
        tokens, stop = m.render([{"role": "system", "content": m.system}, *m.history])
        text = m.llm.detokenize(tokens, special=True).decode()
        assert text.index("<|im_start|>system\nbe brief") < text.index("first question") < text.index(
            "second question") and text.endswith("<|im_start|>assistant\n")
        def alone(words: int) -> int:  # tokens of a message of `words` words after the system message
            return len(m.render([{"role": "system", "content": "be brief"},
                                 {"role": "user", "content": "word " * words}])[0])

        # the longest message that fits with room for 8 answer tokens, but not after the history
        long = "word " * max(k for k in range(1, 200) if alone(k) + 8 <= 256)
        third = Reply()
        "".join(m.answer(long, Sampling(max_tokens=8, temperature=0), never, third))
        assert third.dropped_turns >= 1 and m.history[-2]["content"] == long
        stopped = Reply()
        pieces = list(m.answer("again", Sampling(max_tokens=50, temperature=0), lambda: True, stopped))
        assert stopped.stopped and len(pieces) <= 1 and m.history[-1]["content"] == stopped.text
        n = m.turns
        assert m.reset() == n and m.turns == 0 and m.system == "be brief"
    finally:
        m.close()


def test_chat_piped_input_and_errors(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Without a terminal it reads messages from stdin until the end; bad arguments get one line."""
    import subprocess

    p = subprocess.run([sys.executable, "-m", "gguf_abliterate", "chat", str(tiny["llama-chat"]), "--max-tokens", "4",
                        "--temperature", "0"], input="hi\n/system be nice\nhi again\n", capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "(system message set)" in p.stdout and "\x1b[" not in p.stdout and p.stdout.count(">>> ") == 4
    missing = cli("chat", tmp_path / "none.gguf")
    assert missing.returncode != 0 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    three = cli("chat", tiny["llama"], tiny["llama"], tiny["llama"])
    assert three.returncode != 0 and "one model, or two" in three.stderr
