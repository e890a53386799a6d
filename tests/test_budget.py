"""`--size-budget`: the edited matrices whose requantization error is largest per extra byte
are stored in larger types (Q5_K, Q6_K, Q8_0), within the budget; the choice is checked against
the errors measured here from the written files of the same edit stored in each type."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, random_direction
from gguf import GGMLQuantizationType as Q
from test_edit import expected_values, unit, writers

from gguf_abliterate import quants
from gguf_abliterate.edit.budget import hull_steps
from gguf_abliterate.gguf_io import Model

RUNGS = {"q5k": Q.Q5_K, "q6k": Q.Q6_K, "q8": Q.Q8_0}


def tensor_bytes(m: Model) -> int:
    return sum(int(t.n_bytes) for t in m.tensors.values())


@pytest.fixture(scope="module")
def edits(tiny: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The K-quant tiny model edited in its own types, in each ladder type throughout, and with
    budgets."""
    d = tmp_path_factory.mktemp("budget")
    np.save(d / "d.npy", random_direction(256, seed=8))
    out = {"src": tiny["llama-kquant"]}
    runs = {"own": [], **{k: ["--requant-type", q.name.lower()] for k, q in RUNGS.items()},
            "b3": ["--size-budget", "+3%"], "tiny": ["--size-budget", "0.1%"]}
    for name, args in runs.items():
        out[name] = d / f"{name}.gguf"
        run = cli(out["src"], out[name], "--direction", d / "d.npy", *args)
        assert run.returncode == 0, run.stderr
        out[f"{name}-log"] = run.stderr  # type: ignore[assignment]
    return out


def test_budget_spends_the_bytes_where_they_remove_the_most_error(edits: dict[str, Path]) -> None:
    src, own, b3 = (Model(edits[k]) for k in ("src", "own", "b3"))
    stored = {q: Model(edits[k]) for k, q in RUNGS.items()}
    r = unit(random_direction(256, seed=8))
    names = sorted(writers(src, range(src.n_layer), False) & {n for n in src.tensors if n.endswith(".weight")})

    def error(m: Model, name: str) -> float:
        return float(np.square(m.values(name).astype(np.float64) - expected_values(src, name, r, -1.0)).sum())

    # per matrix, its options: (type, extra bytes, error), own type first, larger types that fit
    options = {}
    for n in names:
        size, own_type = int(src.tensors[n].n_elements), own.tensors[n].tensor_type
        opts = [(own_type, 0, error(own, n))]
        for q, m in stored.items():
            extra = quants.row_bytes(q, size) - quants.row_bytes(own_type, size)
            if extra > 0 and m.tensors[n].tensor_type == q:
                opts.append((q, extra, error(m, n)))
        options[n] = opts
    budget = 0.03 * tensor_bytes(src)
    got = {n: b3.tensors[n].tensor_type for n in names}
    for n in names:  # every matrix is written exactly as the edit in its chosen type writes it
        same = own if got[n] == own.tensors[n].tensor_type else stored[got[n]]
        assert np.array_equal(b3.raw(n), same.raw(n)), n
    extra = {n: dict((q, x) for q, x, _ in options[n])[got[n]] for n in names}
    assert tensor_bytes(b3) - tensor_bytes(own) == sum(extra.values()) <= budget
    lifted = {n for n in names if got[n] != own.tensors[n].tensor_type}
    assert lifted and any(got[n] != Q.Q8_0 for n in lifted), got  # a rung below Q8_0 was worth it
    total = sum(dict((q, e) for q, _, e in options[n])[got[n]] for n in names)
    # against every assignment that fits (few matrices: all of them): the greedy is close to the best
    # and better than the best that may only use Q8_0
    best = best_q8 = np.inf
    for pick in itertools.product(*(options[n] for n in names)):
        if sum(x for _, x, _ in pick) <= budget:
            err = sum(e for _, _, e in pick)
            best = min(best, err)
            if all(q in (Q.Q8_0, own.tensors[n].tensor_type) for n, (q, _, _) in zip(names, pick)):
                best_q8 = min(best_q8, err)
    assert best <= total <= 1.1 * best and total < best_q8
    assert total < 0.5 * sum(options[n][0][2] for n in names)
    assert b3.get("abliterate.size_budget") == pytest.approx(0.03)
    assert "size budget +3%" in str(edits["b3-log"]) and "stored larger" in str(edits["b3-log"])


def test_hull_steps_skip_options_that_remove_less_per_byte_than_a_larger_one() -> None:
    # (bytes, gain): (10, 1) lies below the line from 0 to (20, 8); (30, 7) removes less than (20, 8)
    assert hull_steps([10, 20, 30, 40], [1.0, 8.0, 7.0, 10.0]) == [1, 3]
    assert hull_steps([10, 20], [-1.0, -2.0]) == []


def test_a_budget_too_small_for_any_tensor_changes_nothing(edits: dict[str, Path]) -> None:
    own, small = Model(edits["own"]), Model(edits["tiny"])
    assert all(np.array_equal(own.raw(n), small.raw(n)) for n in own.tensors)
    assert "0 tensors stored larger" in str(edits["tiny-log"])


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
