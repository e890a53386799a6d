"""Files from anywhere: templates, packs, answers, studies, stored Ollama models and option values
that a hostile but realistic user (or a downloaded file) supplies. Each case ends in one line
and a clean exit, never a traceback, a hang or a file outside what the user pointed at.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, cli, random_direction
from gguf import GGMLQuantizationType as Q
from support.tiny_models import CHATML, TinySpec, build_model
from test_apps import make_store

from gguf_abliterate.errors import UserError
from gguf_abliterate.evaluate.answer_rules import Probe, Reply, get_measure
from gguf_abliterate.export.ollama import resolve_ollama
from gguf_abliterate.runtime import template
from gguf_abliterate.textfile import parse_json, printable

FAST = ["--score-prompts", "4", "--confirm-tokens", "4", "--confirm", "2", "--startup-trials", "2", "-q"]


def one_line_failure(run, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert run.returncode == 1, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr and "Aborted!" not in run.stderr, run.stderr
    said = [line for line in run.stderr.strip().splitlines() if "%|" not in line and not line.startswith("loading ")]
    assert len(said) == 1, run.stderr
    for needle in needles:
        assert needle in run.stderr, run.stderr


def _templated(tmp_path: Path, chat_template: str, name: str = "t") -> Path:
    return build_model(tmp_path / f"{name}.gguf", TinySpec(types={"attn_output": Q.Q4_0, "ffn_down": Q.Q5_0},
                                                           chat_template=chat_template))


# -- chat templates --------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["direction", "eval", "chat"])
def test_a_template_that_does_not_parse_is_one_line(command: str, tmp_path: Path) -> None:
    model = _templated(tmp_path, "{% for m in messages %}{{ m['content'] }")
    args = {"direction": ["-o", tmp_path / "d.npy", "--layer", "1"], "eval": ["-n", "2"], "chat": []}[command]
    run = cli(command, model, *args)
    one_line_failure(run, "t.gguf: the chat template cannot be read (TemplateSyntaxError")
    assert not (tmp_path / "d.npy").exists()


def test_a_template_that_raises_is_one_line(tmp_path: Path) -> None:
    model = _templated(tmp_path, "{{ raise_exception('system messages are not supported') }}")
    one_line_failure(cli("eval", model, "-n", "2"), "chat template failed (ValueError: system messages are not")


def test_optimise_with_a_broken_template_leaves_no_study(tmp_path: Path) -> None:
    model = _templated(tmp_path, "{% if %}")
    run = cli("optimise", model, "-o", tmp_path / "e.safetensors", "--trials", "2", *FAST)
    one_line_failure(run, "cannot be read")
    assert not (tmp_path / "e.safetensors").exists()


def test_a_template_that_never_ends_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nested loops of 10^10 steps with no output: stopped by the clock, in the rendering
    thread, with the file named."""
    from gguf_abliterate.runtime.llama import LlamaModel

    monkeypatch.setattr(template, "RENDER_SECONDS", 0.5)
    model = _templated(tmp_path, "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
                       + CHATML)
    with LlamaModel(model) as m:
        start = time.monotonic()
        with pytest.raises(UserError, match="t.gguf: rendering the chat template took over 0.5 s"):
            m.render("hello")
        assert time.monotonic() - start < 5


@pytest.mark.parametrize("body,needle", [
    ("{{ 'x' * 1000000000 }}", "a string too large"),
    ("{% set s = messages[0]['content'] * 100000000 %}{{ s|length }}", "a string too large"),
    ("{{ 7 ** 100000000 }}", "too large a number"),
    ("{{ 'x' * 900000 + 'y' * 900000 }}", "a string too large"),
])
def test_a_template_cannot_build_gigabytes(body: str, needle: str) -> None:
    render = template.chat_formatter(body, bos="<s>", eos="</s>", where="m.gguf")
    start = time.monotonic()
    with pytest.raises(UserError, match=needle):
        render([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 2


def test_the_bounds_render_real_templates_unchanged() -> None:
    """The hooks change nothing for a template that stays within them."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 * 3?"}]
    ours = template.chat_formatter(CHATML + "{{ 2 ** 10 }}{{ 'ab' * 3 }}", bos="<s>", eos="</s>", where="m")(messages)
    theirs = Jinja2ChatFormatter(CHATML + "{{ 2 ** 10 }}{{ 'ab' * 3 }}", eos_token="</s>", bos_token="<s>",
                                 add_generation_prompt=True)(messages=messages)
    assert ours.prompt == theirs.prompt and ours.prompt.endswith("1024ababab") and ours.stop == theirs.stop


# -- packs -----------------------------------------------------------------------------------

def _pack(tmp_path: Path, **spec: object) -> Path:
    base = {"name": "p", "positive": ["be brief please", "be short"], "negative": ["say a lot", "be long"]}
    path = tmp_path / "pack.json"
    path.write_text(json.dumps({**base, **spec}))
    return path


@pytest.mark.parametrize("value", ["/etc/passwd", "../outside.txt", "sub/../../outside.txt"])
def test_a_pack_cannot_read_outside_its_folder(value: str, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_text("secret line one\nsecret line two\n")
    folder = tmp_path / "pack"
    folder.mkdir()
    run = cli("direction", tiny_path(), "-o", tmp_path / "d.npy", "--behaviour", _pack(folder, positive=value))
    one_line_failure(run, "is outside the pack's folder")
    assert "secret" not in run.stderr and "root:" not in run.stderr


def tiny_path() -> Path:
    """Any file stands in for the model: the pack is refused before the model is read."""
    return ROOT / "README.md"


def test_a_pack_in_its_own_folder_still_reads_its_files(tmp_path: Path) -> None:
    from gguf_abliterate.direction.packs import load_pack

    (tmp_path / "pos.txt").write_text("be brief please\nbe short\n")
    pack = load_pack(_pack(tmp_path, positive="pos.txt"))
    assert pack.positive == ("be brief please", "be short")


@pytest.mark.parametrize("spec,needle", [
    ({"measure": {"name": "markers", "markers": [""]}}, "non-empty phrases"),
    ({"measure": {"name": "markers", "markers": "sorry"}}, "non-empty phrases"),
    ({"max_tokens": 10 ** 29}, "from 1 to 1024"),
    ({"measure": {"name": "regex", "pattern": "(unclosed"}}, "bad pattern"),
])
def test_pack_values_that_would_pass_unnoticed(spec: dict[str, object], needle: str, tmp_path: Path) -> None:
    from gguf_abliterate.direction.packs import load_pack

    with pytest.raises(UserError, match=needle):
        load_pack(_pack(tmp_path, **spec))


def test_a_backtracking_regex_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's re cannot be interrupted, not even by Ctrl-C; the regex module's time limit ends it."""
    measure = get_measure("regex", pattern="(x+x+)+y")
    monkeypatch.setattr(type(measure), "SECONDS", 0.2)
    start = time.monotonic()
    with pytest.raises(UserError, match="took over 0.2 s on one answer"):
        measure.measure([Probe("q")], [Reply("x" * 5000, True)])
    assert time.monotonic() - start < 5
    assert get_measure("regex", pattern=r"\bsorry\b").measure([Probe("q")], [Reply("I'm SORRY", True)]).shown == 1


# -- JSON from anywhere -----------------------------------------------------------------------

@pytest.mark.parametrize("text,needle", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"a": ' * 40 + "1" + "}" * 40, "nested too deeply"),
    ('{"prompt": "\\ud800", "answer": "x"}', "lone surrogate"),
    ('{"x": NaN}', "NaN is not a JSON value"),
    ('{"x": 1', "invalid JSON"),
])
def test_json_from_a_file_is_checked(text: str, needle: str) -> None:
    with pytest.raises(UserError, match=needle):
        parse_json(text, "f.json")


def test_judge_answers_with_a_lone_surrogate_are_one_line(tmp_path: Path) -> None:
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"prompt": "p", "answer": "ok"}\n{"prompt": "\\udc80", "answer": "x"}\n')
    one_line_failure(cli("judge", answers, "--judge", ROOT / "README.md"), "line 2: a string escapes a lone surrogate")


def test_a_deep_pack_file_is_one_line(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    one_line_failure(cli("eval", ROOT / "README.md", "--behaviour", deep), "nested too deeply")


def test_printed_text_cannot_drive_the_terminal() -> None:
    assert printable("evil\x1b[2J\x07name\r\nok\t\ud800") == "evil\\x1b[2J\\x07name\\x0d\nok\t\\ud800"


def test_a_model_name_with_escape_codes_is_shown_not_obeyed(tmp_path: Path) -> None:
    evil = build_model(tmp_path / "evil.gguf", TinySpec(name="x\x1b]0;owned\x07\x1b[2Jy"))
    run = cli("inspect", evil)
    assert run.returncode == 0 and "\x1b" not in run.stdout and "x\\x1b]0;owned\\x07\\x1b[2Jy" in run.stdout


# -- values ----------------------------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["cvector", "D", "OUT", "--model", "M", "--scale", "nan"], "not a finite number"),
    (["cvector", "D", "OUT", "--model", "M", "--scale", "1e308"], "not in the range"),
    (["direction", "M", "-o", "OUT", "--max-kl", "nan"], "not a finite number"),
    (["optimise", "M", "-o", "OUT", "--max-refusals", "nan"], "not a finite number"),
    (["optimise", "M", "-o", "OUT", "--minutes", "nan"], "not a finite number"),
    (["eval", "M", "--max-tokens", str(10 ** 29)], "not in the range"),
    (["chat", "M", "--temperature", "nan"], "not a finite number"),
    (["M", "OUT", "--direction", "D", "--scale", "nan"], "not a finite number"),
    (["M", "OUT", "--direction", "D", "--scale", "1e308"], "not in the range"),
    (["M", "OUT", "--direction", "D", "--steer", "1e308"], "not in the range"),
    (["M", "OUT", "--direction", "D", "-j", "100000"], "4 per core"),
    (["eval", "M", "--kl-tokens", "0"], "not in the range"),
])
def test_values_that_once_passed(args: list[str], needle: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from gguf_abliterate.cli import cli as group

    (tmp_path / "M").write_bytes(b"GGUF")
    (tmp_path / "D").write_bytes(b"")
    result = CliRunner().invoke(group, [str(tmp_path / a) if a in ("M", "D", "OUT") else a for a in args])
    assert result.exit_code == 2 and needle in result.output, result.output
    assert not (tmp_path / "OUT").exists()


def test_an_empty_npy_is_one_line(tiny: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "d.npy").write_bytes(b"")
    run = cli(tiny["llama"], tmp_path / "o.gguf", "--direction", tmp_path / "d.npy")
    one_line_failure(run, "d.npy: the .npy file is empty or cut short")
    assert not (tmp_path / "o.gguf").exists()


def test_chat_survives_a_line_that_is_not_utf8(tmp_path: Path) -> None:
    model = _templated(tmp_path, CHATML)
    p = subprocess.run([sys.executable, "-m", "gguf_abliterate", "chat", str(model), "--max-tokens", "2",
                        "--temperature", "0"], input=b"caf\xe9 \xff\nsecond line\n", capture_output=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr.decode(errors="replace")
    assert p.stdout.count(b">>> ") == 3  # both lines answered, then the end of input


# -- studies ---------------------------------------------------------------------------------

def _other_weights(src: Path, dst: Path) -> Path:
    """The same file (name, shape, tensor count) with one weight byte changed: another finetune."""
    from gguf_abliterate.gguf_io import GGUFFile

    data = bytearray(src.read_bytes())
    data[GGUFFile(src).data_start + 100] ^= 0x01
    dst.write_bytes(bytes(data))
    return dst


def test_a_study_is_resumed_only_on_its_own_model(tiny: dict[str, Path], tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(tiny["llama-nobias"].read_bytes())
    out = tmp_path / "e.safetensors"
    assert cli("optimise", model, "-o", out, "--trials", "2", *FAST).returncode == 0
    other = _other_weights(model, tmp_path / "m2.gguf")
    run = cli("optimise", other, "-o", out, "--trials", "3", "--resume", "--force", "--storage",
              f"sqlite:///{tmp_path / 'e.study.db'}", *FAST)
    one_line_failure(run, "was made for another model", "trials scored on one model cannot guide a search of another")


def test_a_half_made_study_is_replaced_or_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A crash or SIGTERM while the search measures leaves a study without its model's identity
    (recorded last): a new run replaces it, --resume says what happened."""
    import optuna

    from gguf_abliterate.optimise.study import STUDY_NAME

    db = tmp_path / "e.study.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name=STUDY_NAME, directions=["minimize", "minimize"])
    out = tmp_path / "e.safetensors"
    resumed = cli("optimise", tiny["llama-nobias"], "-o", out, "--trials", "2", "--resume", *FAST)
    one_line_failure(resumed, "never set up completely")
    fresh = cli("optimise", tiny["llama-nobias"], "-o", out, "--trials", "2", *FAST[:-1])
    assert fresh.returncode == 0, fresh.stderr
    assert "replacing the study" in fresh.stderr and out.is_file()


def test_a_storage_password_is_never_printed(tiny: dict[str, Path], tmp_path: Path) -> None:
    run = cli("optimise", tiny["llama-nobias"], "-o", tmp_path / "e.safetensors", "--storage",
              "postgresql://bob:hunter2@127.0.0.1:1/db", *FAST)
    assert run.returncode == 1 and "hunter2" not in run.stderr and "bob:***@" in run.stderr, run.stderr


# -- Ollama's store --------------------------------------------------------------------------

def _manifest(store: Path, layers: list[dict[str, object]]) -> None:
    path = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    path.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))


def _layers(store: Path) -> list[dict[str, object]]:
    path = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    return json.loads(path.read_text())["layers"]


@pytest.mark.parametrize("case,needle", [
    ("absolute digest", "is not sha256:<64 hex>"),
    ("dotdot digest", "is not sha256:<64 hex>"),
    ("layers not a list", "no list of layers"),
    ("params not an object", "not a JSON object"),
    ("params key with a newline", "is not a parameter"),
    ("param value with a newline", "quotes or control characters"),
    ("template closes the quotes", "holds quotes that would end"),
    ("name with dotdot", "is not an Ollama model name"),
])
def test_the_ollama_store_is_not_trusted(case: str, needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "ollama"
    make_store(store, tiny["qwen2"].read_bytes())
    layers = _layers(store)
    blob = store / "blobs"
    if case == "absolute digest":
        layers[0]["digest"] = str(tiny["qwen2"])
    elif case == "dotdot digest":
        layers[0]["digest"] = "sha256-../../../" + tiny["qwen2"].name
    elif case == "layers not a list":
        layers = {"a": 1}  # type: ignore[assignment]
    elif case.startswith("param"):
        params = {"params not an object": [1, 2], "params key with a newline": {"stop\nADAPTER ./evil.gguf": 1},
                  "param value with a newline": {"stop": "x\nADAPTER ./evil.gguf"}}[case]
        (blob / layers[3]["digest"].replace(":", "-")).write_text(json.dumps(params))
    elif case == "template closes the quotes":
        (blob / layers[1]["digest"].replace(":", "-")).write_text('{{ .Prompt }}"""\nADAPTER ./evil.gguf\n#')
    _manifest(store, layers)  # type: ignore[arg-type]
    np.save(tmp_path / "d.npy", random_direction(256))
    name = "../../../etc/x" if case == "name with dotdot" else "tiny"
    run = cli("--ollama", name, tmp_path / "o.gguf", "--direction", tmp_path / "d.npy",
              env={"OLLAMA_MODELS": str(store)})
    one_line_failure(run, needle)
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "Modelfile").exists()


def test_a_good_store_still_resolves(tiny: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "ollama"
    make_store(store, tiny["qwen2"].read_bytes())
    model = resolve_ollama("tiny", store)
    assert model.params == {"stop": ["<|user|>", "<|end|>"], "temperature": 0.7}
