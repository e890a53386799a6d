"""`--size-budget`: the edited matrices whose requantization error is largest per extra byte
are stored as Q8_0, within the budget, and the choice is checked against the errors measured
here from the written files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, random_direction
from gguf import GGMLQuantizationType as Q
from test_edit import expected_values, unit, writers

from gguf_abliterate import quants
from gguf_abliterate.gguf_io import Model


def tensor_bytes(m: Model) -> int:
    return sum(int(t.n_bytes) for t in m.tensors.values())


@pytest.fixture(scope="module")
def edits(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The K-quant tiny model edited in its own types, as Q8_0 throughout, and with budgets."""
    d = tmp_path_factory.mktemp("budget")
    np.save(d / "d.npy", random_direction(256, seed=8))
    out = {"src": tiny["llama-kquant"]}
    for name, args in {"own": [], "q8": ["--requant-type", "q8_0"], "b10": ["--size-budget", "+10%"],
                       "tiny": ["--size-budget", "0.1%"]}.items():
        out[name] = d / f"{name}.gguf"
        run = cli(out["src"], out[name], "--direction", d / "d.npy", *args)
        assert run.returncode == 0, run.stderr
        out[f"{name}-log"] = run.stderr  # type: ignore[assignment]
    return out


def test_budget_upgrades_the_worst_error_per_byte_within_the_budget(edits: dict[str, Path]) -> None:
    src, own, q8, b10 = (Model(edits[k]) for k in ("src", "own", "q8", "b10"))
    r = unit(random_direction(256, seed=8))
    names = sorted(writers(src, range(src.n_layer), False) & {n for n in src.tensors if n.endswith(".weight")})

    def error(m: Model, name: str) -> float:
        return float(np.square(m.values(name).astype(np.float64) - expected_values(src, name, r, -1.0)).sum())

    gain, extra = {}, {}
    for n in names:
        size = int(src.tensors[n].n_elements)
        extra[n] = quants.row_bytes(Q.Q8_0, size) - quants.row_bytes(own.tensors[n].tensor_type, size)
        gain[n] = error(own, n) - error(q8, n)
    budget = 0.10 * tensor_bytes(src)
    want, used = set(), 0
    for n in sorted(names, key=lambda n: gain[n] / extra[n], reverse=True):
        if extra[n] > 0 and gain[n] > 0 and used + extra[n] <= budget:
            want.add(n)
            used += extra[n]
    got = {n for n in names if b10.tensors[n].tensor_type == Q.Q8_0}
    assert got == want and 0 < len(got) < len(names)
    assert tensor_bytes(b10) - tensor_bytes(own) == used <= budget
    for n in names:  # the others are written exactly as the plain edit writes them
        if n not in got:
            assert np.array_equal(b10.raw(n), own.raw(n)), n
        else:
            assert np.array_equal(b10.raw(n), q8.raw(n)), n
    assert sum(error(b10, n) for n in names) < 0.5 * sum(error(own, n) for n in names)
    assert b10.get("abliterate.size_budget") == pytest.approx(0.10)
    assert "size budget +10%" in str(edits["b10-log"]) and f"{len(got)} tensors stored as Q8_0" in str(edits["b10-log"])


def test_a_budget_too_small_for_any_tensor_changes_nothing(edits: dict[str, Path]) -> None:
    own, small = Model(edits["own"]), Model(edits["tiny"])
    assert all(np.array_equal(own.raw(n), small.raw(n)) for n in own.tensors)
    assert "0 tensors stored as Q8_0" in str(edits["tiny-log"])


@pytest.mark.parametrize("args, needle", [
    (["--size-budget", "five"], "give a share of the file's size"),
    (["--size-budget", "0%"], "from +0.1% to +100%"),
    (["--size-budget", "0.05%"], "from +0.1% to +100%"),
    (["--size-budget", "-5%"], "give a share"),
    (["--size-budget", "150%"], "give a share"),
    (["--size-budget", "5%", "--requant-type", "q8_0"], "does not go with --requant-type"),
    (["--size-budget", "5%", "--format", "lora"], "does not go with --format lora"),
])
def test_bad_budgets_are_refused(args: list[str], needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(256))
    out = tmp_path / "o.gguf"
    run = cli(tiny["llama-kquant"], out, "--direction", tmp_path / "d.npy", *args)
    assert run.returncode != 0 and needle in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not out.exists()
