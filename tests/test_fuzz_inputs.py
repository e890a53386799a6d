"""Generated hostile inputs of every kind the tool reads besides GGUF (that is test_fuzz.py):
pack files, direction files, answers to judge, Ollama manifests and parameters, chat templates
and study databases. Each case ends in a value or one UserError (never another exception, a
hang or a Modelfile with directives of the file's making), and leaves its input as it was.

INPUT_FUZZ_SCALE multiplies every count (CI runs 1: 5,100 cases in all).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gguf_abliterate.cli.judge import read_answers
from gguf_abliterate.formats.direction_file import STATISTICS, load_direction, save_measured
from gguf_abliterate.direction.packs import load_pack
from gguf_abliterate.errors import UserError
from gguf_abliterate.export.ollama import modelfile, resolve_ollama
from gguf_abliterate.runtime import template

SCALE = float(os.environ.get("INPUT_FUZZ_SCALE", "1"))


def examples(n: int) -> settings:
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])


@contextlib.contextmanager
def fresh() -> Iterator[Path]:
    """A folder of its own for each example (a test's tmp_path is shared by all its examples)."""
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def outcome(path: Path, load):  # type: ignore[no-untyped-def]
    """load(path) -> its value or None for a UserError; anything else fails the test. The file
    and its folder are as they were."""
    folder = path.parent
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    try:
        value = load(path)
    except UserError as e:
        assert str(e) and "\n" not in str(e).strip()
        value = None
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    return value


# JSON values in the shapes our formats use, and the wrong shapes beside them
leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                 st.text(max_size=40), st.sampled_from(["", " ", "../x.txt", "/etc/passwd", "pos.txt", "markers",
                                                        "regex", "length", "worked", "exact", "\ud800", "a\x00b"]))
json_values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                         st.dictionaries(st.text(max_size=12), inner, max_size=5)),
                           max_leaves=20)


def _json_text(value: object, raw: bytes) -> bytes:
    return raw if raw else json.dumps(value).encode("utf-8", "surrogatepass")


pack_spec = st.fixed_dictionaries({}, optional={
    "name": json_values, "positive": st.one_of(st.lists(st.text(max_size=20), max_size=4), json_values),
    "negative": st.one_of(st.lists(st.text(max_size=20), max_size=4), json_values), "probes": json_values,
    "measure": st.one_of(st.sampled_from(["markers", "regex", "length", "worked", "exact", "nope"]),
                         st.fixed_dictionaries({"name": st.sampled_from(["markers", "regex", "length", "exact"])},
                                               optional={"pattern": st.text(max_size=12),
                                                         "markers": json_values, "max_words": json_values})),
    "max_tokens": json_values, "about": json_values, "extra": json_values})


@examples(1500)
@given(spec=pack_spec, raw=st.one_of(st.just(b""), st.binary(max_size=60),
                                     st.sampled_from([b"[" * 5000, b"{\"positive\": NaN}", b"\xff\xfe{}"])))
def test_pack_files(spec: dict[str, object], raw: bytes) -> None:
    with fresh() as scratch:
        (scratch / "pos.txt").write_text("be brief\nbe short\nbe quick\n")
        path = scratch / "pack.json"
        path.write_bytes(_json_text(spec, raw))
        pack = outcome(path, load_pack)
        if pack is not None:
            assert len(pack.positive) >= 2 and len(pack.negative) >= 2 and pack.probes
            assert 1 <= pack.max_tokens <= 1024


class Seeds(dict):  # type: ignore[type-arg]
    def __repr__(self) -> str:  # hypothesis prints the fixtures of a failing case
        return f"Seeds({', '.join(f'{k}: {len(v)} bytes' for k, v in self.items())})"


@pytest.fixture(scope="module")
def direction_seeds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("seeds")
    rng = np.random.default_rng(0)
    save_measured(d / "m.safetensors", rng.normal(size=(4, 64)).astype(np.float32),
                  rng.normal(size=(4, 64)).astype(np.float32), 2, {k: np.ones(4, np.float32) for k in STATISTICS},
                  {"behaviour": "refusal", "trials": "[]"})
    np.save(d / "v.npy", rng.normal(size=64).astype(np.float32))
    return Seeds({".safetensors": (d / "m.safetensors").read_bytes(), ".npy": (d / "v.npy").read_bytes()})


@examples(1000)
@given(suffix=st.sampled_from([".safetensors", ".npy"]),
       edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=8)), max_size=4),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_direction_files(suffix: str, edits: list[tuple[float, bytes]], cut: float | None,
                         direction_seeds: dict[str, bytes]) -> None:
    with fresh() as scratch:
        data = bytearray(direction_seeds[suffix])
        for where, junk in edits:
            pos = int(where * (len(data) - len(junk)))
            data[pos:pos + len(junk)] = junk
        if cut is not None:
            del data[int(cut * len(data)):]
        path = scratch / f"d{suffix}"
        path.write_bytes(bytes(data))

        def load(p: Path) -> object:
            d = load_direction(p)
            assert np.all(np.isfinite(d.vectors))
            return d.trials, d.behaviour

        outcome(path, load)


answer_lines = st.lists(st.one_of(
    st.fixed_dictionaries({"prompt": st.text(max_size=20), "answer": st.text(max_size=20)}), json_values,
    st.just({"prompt": "\ud800", "answer": "x"})), max_size=6)


@examples(1000)
@given(items=answer_lines, suffix=st.sampled_from([".jsonl", ".json"]), raw=st.one_of(st.just(b""),
                                                                                       st.binary(max_size=40)))
def test_answers_to_judge(items: list[object], suffix: str, raw: bytes) -> None:
    with fresh() as scratch:
        path = scratch / f"a{suffix}"
        text = json.dumps(items) if suffix == ".json" else "\n".join(json.dumps(i) for i in items)
        path.write_bytes(raw or text.encode("utf-8", "surrogatepass"))
        answers = outcome(path, read_answers)
        if answers is not None:
            assert all(isinstance(a["prompt"], str) and isinstance(a["answer"], str) for a in answers)
            json.dumps(answers).encode("utf-8")  # printable and writable: no lone surrogate got through


MEDIA = "application/vnd.ollama.image."
GGUF = b"GGUF" + bytes(60)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@examples(1000)
@given(template_text=st.one_of(st.none(), st.text(max_size=30), st.sampled_from(['x"""\nADAPTER ./e.gguf', 'ends"'])),
       params=st.one_of(st.none(), json_values, st.dictionaries(st.text(max_size=10), json_values, max_size=3)),
       digest=st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["/etc/passwd", "sha256-../../x",
                                                                            "sha256:" + "0" * 64])),
       layers=st.one_of(st.none(), json_values))
def test_ollama_stores(template_text: str | None, params: object, digest: str | None, layers: object) -> None:
    with fresh() as scratch:
        store = scratch / "store"
        (store / "blobs").mkdir(parents=True)
        manifest_dir = store / "manifests" / "registry.ollama.ai" / "library" / "m"
        manifest_dir.mkdir(parents=True)

        def blob(data: bytes) -> str:
            (store / "blobs" / _digest(data).replace(":", "-")).write_bytes(data)
            return _digest(data)

        entries = [{"mediaType": MEDIA + "model", "digest": digest if digest is not None else blob(GGUF)}]
        if template_text is not None:
            entries.append({"mediaType": MEDIA + "template",
                            "digest": blob(template_text.encode("utf-8", "surrogatepass"))})
        if params is not None:
            entries.append({"mediaType": MEDIA + "params", "digest": blob(json.dumps(params).encode("utf-8",
                                                                                                    "surrogatepass"))})
        (manifest_dir / "latest").write_text(json.dumps({"layers": layers if layers is not None else entries}))

        def load(path: Path) -> object:
            model = resolve_ollama("m", store)
            text = modelfile("out.gguf", model)
            # every line outside a triple-quoted field is a directive we wrote
            outside, quoted = [], False
            for line in text.splitlines():
                if not quoted:
                    outside.append(line)
                quoted ^= line.count('"""') % 2 == 1
            assert [w.split(" ")[0] for w in outside].count("FROM") == 1
            assert all(w.split(" ")[0] in ("FROM", "TEMPLATE", "SYSTEM", "PARAMETER") for w in outside), text
            return model

        outcome(manifest_dir / "latest", load)


FRAGMENTS = ["{{ messages[0]['content'] }}", "{% for m in messages %}", "{% endfor %}", "{% if add_generation_prompt %}",
             "{% endif %}", "{{ raise_exception('no') }}", "{{ 'x' * 99999999 }}", "{{ 9 ** 99999 }}", "{{", "}}",
             "{% set s = 'ab' %}", "{{ s ~ s }}", "{{ bos_token }}", "{% for i in range(50) %}{{ i }}{% endfor %}",
             "{{ messages|tojson }}", "{{ '%999999999d' % 1 }}", "{{ ''.join(['a'] * 5) }}", "{{ x.y.z }}",
             "{{ ().__class__ }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "text", "\n"]


@examples(600)
@given(parts=st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=8)), max_size=8))
def test_chat_templates(parts: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(template, "RENDER_SECONDS", 2.0)
    source = "".join(parts)
    try:
        render = template.chat_formatter(source, bos="<s>", eos="</s>", where="m.gguf")
        result = render([{"role": "user", "content": "hello"}])
        assert len(result.prompt) <= template.MAX_CHARS
    except UserError as e:
        assert str(e).startswith("m.gguf: ")


@examples(3 if SCALE < 1 else 100)
@given(edits=st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=16)), min_size=1, max_size=3),
       cut=st.one_of(st.none(), st.floats(0, 1)))
def test_study_databases(edits: list[tuple[float, bytes]], cut: float | None, study_seed: bytes) -> None:
    with fresh() as scratch:
        from gguf_abliterate.optimise.study import study_state

        data = bytearray(study_seed)
        for where, junk in edits:
            pos = int(where * (len(data) - len(junk)))
            data[pos:pos + len(junk)] = junk
        if cut is not None:
            del data[int(cut * len(data)):]
        db = scratch / "s.study.db"
        db.write_bytes(bytes(data))
        state = outcome(db, lambda p: study_state(f"sqlite:///{p}"))
        assert state in (None, "none", "half", "ready")


@pytest.fixture(scope="module")
def study_seed(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import optuna

    from gguf_abliterate.optimise.study import STUDY_NAME

    db = tmp_path_factory.mktemp("study") / "s.study.db"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name=STUDY_NAME, directions=["minimize", "minimize"])
    study.set_user_attr("model", {"name": "m", "sha256": "0" * 64})
    return Seeds({"db": db.read_bytes()})["db"]
