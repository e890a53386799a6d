"""Mutated GGUF files: every outcome is a valid output or a clean UserError, never a crash."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.tiny_models import TinySpec, build_model

from gguf_abliterate.formats.direction_file import Direction, normalise
from gguf_abliterate.edit.execute import apply_edit
from gguf_abliterate.edit.options import EditOptions
from gguf_abliterate.edit.plan import plan_edit
from gguf_abliterate.errors import UserError
from gguf_abliterate.gguf_io import GGUFFile, Model

# CI runs the full count; GGUF_FUZZ_EXAMPLES lowers it for a quick local run.
EXAMPLES = int(os.environ.get("GGUF_FUZZ_EXAMPLES", "3000"))
EXTREMES = [0, 1, 0xFF, 0xFFFF, 0xFFFFFFFF, 2**63, 2**64 - 1, 2**31]


class Seed:
    """A small valid model's bytes and where its tensor data starts (short repr for reports)."""

    def __init__(self, path: Path):
        self.data, self.header_end = path.read_bytes(), GGUFFile(path).data_start

    def __repr__(self) -> str:
        return f"Seed({len(self.data)} bytes, header {self.header_end})"


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    return Seed(build_model(tmp_path_factory.mktemp("fuzz") / "seed.gguf", TinySpec(n_layer=2, n_ff=256)))


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=4)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("field"), st.tuples(st.floats(0, 1), st.sampled_from([1, 2, 4, 8]),
                                          st.one_of(st.sampled_from(EXTREMES), st.integers(0, 2**64 - 1)))),
    st.tuples(st.just("tensor data"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))),
)


def mutate(data: bytes, header_end: int, m: tuple) -> bytes:  # type: ignore[type-arg]
    b = bytearray(data)
    kind, arg = m
    if kind == "flip":
        for where, bit in arg:
            b[int(where * (header_end - 1))] ^= 1 << bit
    elif kind == "truncate":
        del b[int(arg * (len(b) - 1)):]
    elif kind == "field":
        where, width, value = arg
        pos = int(where * (header_end - width))
        b[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    else:
        where, junk = arg
        pos = header_end + int(where * (len(b) - header_end - len(junk)))
        b[pos : pos + len(junk)] = junk
    return bytes(b)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=mutation)
def test_mutated_file_gives_valid_output_or_clean_error(m: tuple, seed_file: Seed,  # type: ignore[type-arg]
                                                        tmp_path: Path) -> None:
    mutated = mutate(seed_file.data, seed_file.header_end, m)
    src, out = tmp_path / "in.gguf", tmp_path / "out.gguf"
    src.write_bytes(mutated)
    out.unlink(missing_ok=True)
    direction = Direction(normalise(np.ones(256, np.float32)), "fuzz")
    try:
        model = Model(src)
        direction.check_fits(model.n_layer, model.n_embd, model.arch)
        plan = plan_edit(model, EditOptions())
        apply_edit(model, plan, direction, EditOptions(), out)
    except UserError:
        assert not out.exists()
    else:
        written = Model(out)
        assert list(written.tensors) == list(model.tensors)
        for name, t in model.tensors.items():
            if name not in plan.edits:
                assert np.array_equal(written.raw(name), model.raw(name)), name
    assert src.read_bytes() == mutated
    assert sorted(p.name for p in tmp_path.iterdir()) in (["in.gguf"], ["in.gguf", "out.gguf"])
