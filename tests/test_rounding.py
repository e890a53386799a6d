"""Quantization-aware rounding: the edit survives requantization, for every integer-coded type."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, random_direction
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from support import ggml_ref

from gguf_abliterate import quants
from gguf_abliterate.formats.direction_file import Direction
from gguf_abliterate.edit.options import EditOptions
from gguf_abliterate.edit.plan import plan_edit
from gguf_abliterate.edit.project import axis_vector, project_residual_cols, project_residual_rows
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import rounding
from gguf_abliterate.quants.types import get_type

TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS,
         Q.MXFP4]


def test_every_integer_type_has_a_code_layout() -> None:
    assert {t for t in Q if get_type(t).has_codes} == set(TYPES)
    assert all(rounding.supports(t) for t in TYPES) and not rounding.supports(Q.F16)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_code_layout_round_trips_and_levels_match_the_dequantizer(qtype: Q) -> None:
    rng = np.random.default_rng(0)
    layout = get_type(qtype)
    blocks = quants.quantize(rng.normal(size=(4, 512)).astype(np.float32), qtype).reshape(-1, GGML_QUANT_SIZES[qtype][1])
    assert layout.get(blocks).max() < len(layout.table)
    a, b = rounding.levels(blocks, qtype)
    random_codes = rng.integers(0, len(layout.table), (blocks.shape[0], GGML_QUANT_SIZES[qtype][0])).astype(np.uint8)
    moved = blocks.copy()
    layout.put(moved, random_codes)
    assert np.array_equal(layout.get(moved), random_codes)
    back = quants.dequantize(moved, qtype).reshape(random_codes.shape)
    assert np.array_equal(a * layout.table[random_codes] + b, back)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_quantize_split_hands_over_the_codes_it_would_pack(qtype: Q) -> None:
    """The codes apart, then packed by the type's `put`: the bytes `quantize` writes, over
    several of the quantizer's chunks, with a zero block and one of values so small that
    Q6_K's block scale is under ggml's epsilon (ggml zeroes that block, codes and all)."""
    values = np.random.default_rng(8).normal(size=(3, 256 * 9)).astype(np.float32)
    values[1, :256] = 0.0
    values[1, 256:512] *= 1e-14
    values[2, :4096] *= 1e3
    whole = quants.quantize(values, qtype)
    data, codes = quants.quantize_split(values, qtype)
    layout, (bs, ts) = get_type(qtype), GGML_QUANT_SIZES[qtype]
    assert codes.shape == values.shape and codes.dtype == np.uint8
    assert np.array_equal(codes.reshape(-1, bs), layout.get(whole.reshape(-1, ts)))
    layout.write_codes(data.reshape(-1, ts), codes.reshape(-1, bs))
    assert np.array_equal(data, whole)


def edited(w: np.ndarray, u: np.ndarray, coef: float) -> np.ndarray:
    out = w.copy()
    project_residual_rows(out, u, coef)
    return out


def leak_and_rmse(data: np.ndarray, qtype: Q, w: np.ndarray, target: np.ndarray, u: np.ndarray) -> tuple[float, float]:
    back = quants.dequantize(data, qtype)
    denom = max(np.linalg.norm(u @ w), np.linalg.norm(u @ target))
    return float(np.linalg.norm(u @ back - u @ target) / denom), float(np.sqrt(np.mean((back - target) ** 2)))


def check(qtype: Q, w: np.ndarray, u: np.ndarray, coef: float, max_rmse_ratio: float) -> float:
    """Aware rounding of the edited `w`: leak under 1%, RMSE within `max_rmse_ratio` of plain
    rounding, only code fields changed, and ggml's own dequantizer reads the same values.
    Returns the aware RMSE."""
    target = edited(w, u, coef)
    plain = quants.quantize(target, qtype)
    aware = rounding.keep_edit(plain, target, u, qtype, over_rows=True, before=u @ w)
    data, codes = quants.quantize_split(target, qtype)  # as an edit runs it: the same bytes
    assert np.array_equal(rounding.keep_edit(data, target, u, qtype, over_rows=True, before=u @ w, codes=codes), aware)
    leak_plain, rmse_plain = leak_and_rmse(plain, qtype, w, target, u)
    leak, rmse = leak_and_rmse(aware, qtype, w, target, u)
    assert leak < 0.01 and leak < leak_plain, (leak, leak_plain)
    assert rmse <= max_rmse_ratio * rmse_plain, rmse / rmse_plain
    layout, ts = get_type(qtype), GGML_QUANT_SIZES[qtype][1]
    only_codes = plain.reshape(-1, ts).copy()
    layout.put(only_codes, layout.get(aware.reshape(-1, ts)))
    assert np.array_equal(only_codes, aware.reshape(-1, ts))  # scales untouched
    moved = layout.get(aware.reshape(-1, ts)) != layout.get(plain.reshape(-1, ts))
    assert 0 < moved.mean() < 0.1
    ours = quants.dequantize(aware, qtype)
    assert np.array_equal(ours.view(np.uint32), ggml_ref.dequantize(aware, qtype, w.shape[1]).view(np.uint32))
    return rmse


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("coef", [-1.0, 0.5], ids=["abliterate", "reverse"])
def test_aware_rounding_on_random_weights(qtype: Q, coef: float) -> None:
    """Weights off the grid (a fresh quantization): the weight error barely grows."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (384, 512)).astype(np.float32)
    u = random_direction(384, seed=2)
    check(qtype, w, u / np.linalg.norm(u), coef, 1.15)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_aware_rounding_on_weights_already_on_the_grid(qtype: Q) -> None:
    """Requantizing a dequantized tensor to its own type, the case of every real edit. The edit
    moves each weight by far less than a step, so nearest rounding snaps most of it back, and
    its small weight error is mostly the edit undone. Keeping the edit takes whole-step code
    moves (up to 2x that error for Q2_K), yet the result stays closer to its target than a
    fresh quantization of the edited full-precision weights would be."""
    rng = np.random.default_rng(3)
    original = rng.normal(0, 0.02, (384, 512)).astype(np.float32)
    w = quants.dequantize(quants.quantize(original, qtype), qtype)
    u = random_direction(384, seed=4)
    u /= np.linalg.norm(u)
    aware_rmse = check(qtype, w, u, -1.0, 2.5)
    fresh_target = edited(original, u, -1.0)
    fresh = quants.dequantize(quants.quantize(fresh_target, qtype), qtype)
    assert aware_rmse < np.sqrt(np.mean((fresh - fresh_target) ** 2))


def test_no_edit_moves_no_code() -> None:
    w = np.random.default_rng(5).normal(0, 0.02, (256, 512)).astype(np.float32)
    u = random_direction(256) / np.linalg.norm(random_direction(256))
    for qtype in (Q.Q4_K, Q.Q8_0):
        data = quants.quantize(w, qtype)
        grid = quants.dequantize(data, qtype)
        assert np.array_equal(rounding.keep_edit(data, grid, u, qtype, over_rows=True, before=u @ grid), data)


@pytest.mark.parametrize("n, k, reach", [(5, 8, 9.0), (40, 8, 9.0), (1536, 8, 9.0), (1536, 64, 9.0),
                                         (1536, 32, 2e-6)])
def test_search_candidates_are_the_best_moves(n: int, k: int, reach: float) -> None:
    """The compiled search's selection (a sampled threshold, or without one where too few
    pass it, as with a small reach) keeps exactly the k moves of least cost per gain, ties
    by index, whatever the group: equal ratios (repeated values) and -0.0 against 0.0 among them."""
    from gguf_abliterate.quants import rounding_moves

    rng = np.random.default_rng(n + k)
    padded = np.concatenate([[np.nan], np.arange(16), [np.nan]]).astype(np.float32)
    ig = rng.integers(1, 17, n).astype(np.int32)
    ag = rng.uniform(0.001, 0.003, n).astype(np.float32)
    eg = (ag * rng.uniform(-0.5, 0.5, n)).astype(np.float32)
    u = rng.normal(0, 1, n).astype(np.float32)
    u /= np.linalg.norm(u)
    half = n // 2
    ig[half:half + n // 4], ag[half:half + n // 4] = ig[: n // 4], ag[: n // 4]  # a quarter repeated
    eg[half:half + n // 4], u[half:half + n // 4] = eg[: n // 4], u[: n // 4]
    eg[:4], u[:4], ig[:4] = ag[:4] / 2, 0.05, 8  # cost 0: moving down gives -0.0, up +0.0
    eg[2:4], u[2:4] = -ag[2:4] / 2, -0.05
    order = np.argsort(-np.abs(u), kind="stable")
    heap, q, key, kept = rounding_moves._buffers(n, k)
    filled = rounding_moves._candidates(ig, ag, eg, u, order, padded, True, np.float32(-1.0), np.float32(reach), q, key, kept,
                                heap)
    got = np.sort(heap[:filled]) & 0xFFFFFFFF  # keys sort by (ratio, index)
    valid = np.flatnonzero(~np.isnan(q))
    best = valid[np.lexsort((valid, q[valid] + np.float32(0.0)))][:k]
    assert filled == min(k, len(valid)) and filled > 0
    assert np.array_equal(got, best)


def test_embedding_rows_keep_the_edit() -> None:
    """token_embd: the component is E u, summed along each row."""
    rng = np.random.default_rng(6)
    e = rng.normal(0, 0.02, (300, 512)).astype(np.float32)
    u = random_direction(512, seed=7) / np.linalg.norm(random_direction(512, seed=7))
    before = e @ u
    target = e.copy()
    project_residual_cols(target, u, -1.0)
    for qtype in (Q.Q4_K, Q.Q5_0):
        plain = quants.quantize(target, qtype)
        aware = rounding.keep_edit(plain, target, u, qtype, over_rows=False, before=before)
        data, codes = quants.quantize_split(target, qtype)
        assert np.array_equal(rounding.keep_edit(data, target, u, qtype, over_rows=False, before=before, codes=codes),
                              aware)
        leak_plain, leak = (np.linalg.norm(quants.dequantize(d, qtype) @ u) / np.linalg.norm(before)
                            for d in (plain, aware))
        assert leak < 0.01 and leak < leak_plain / 4, (qtype.name, leak, leak_plain)


def test_real_tensors_keep_the_edit(gemma3: Path, smollm2: Path) -> None:
    """Writers of real models (Q4_K/Q6_K gemma-3 with its post-norm axis, Q4_1 SmolLM2),
    requantized to their own type with a direction in the residual stream."""
    for path in (gemma3, smollm2):
        model = Model(path)
        r = random_direction(model.n_embd, seed=8)
        direction = Direction(r / np.linalg.norm(r), "")
        plan = plan_edit(model, EditOptions(layers=frozenset({1, model.n_layer - 2})), strict=False)
        for e in plan.edits.values():
            if e.kind != "matrix":
                continue
            u = axis_vector(model, e, direction)
            w = quants.dequantize(model.raw(e.name), e.src_type).reshape(model.n_rows(e.name), -1)
            check(e.src_type, w, u, -1.0, 1.4)


def test_cli_rounding_nearest_and_aware(tiny: dict[str, Path], tmp_path: Path) -> None:
    """The K-quant tiny model end to end: aware output keeps the edit, nearest does not, both load."""
    import json

    from conftest import generate

    np.save(tmp_path / "d.npy", random_direction(256, seed=9))
    src = tiny["llama-kquant"]
    for mode in ("aware", "nearest"):
        run = cli(src, tmp_path / f"{mode}.gguf", "--direction", tmp_path / "d.npy", "--rounding", mode)
        assert run.returncode == 0, run.stderr
        assert generate(tmp_path / f"{mode}.gguf")
        report = json.loads(Model(tmp_path / f"{mode}.gguf").get("abliterate.requant_report"))
        for qtype in ("Q4_K", "Q6_K"):  # attn_output, ffn_down
            leak = report[qtype]["leak_worst"]
            assert leak < 0.01 if mode == "aware" else leak > 0.02, (mode, qtype, leak)
    help_text = cli("edit", "--help").stdout
    assert "--rounding" in help_text and "snap-back" in help_text


COMPENSATED = [t for t in TYPES if rounding.compensates(t, 512)]


def correlated_inputs(n: int, tokens: int, seed: int) -> np.ndarray:
    """Inputs that, like a model's, live mostly in a few directions (and a little everywhere)."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(0).normal(size=(16, n))  # the same directions in every draw
    return (rng.normal(size=(tokens, 16)) @ mix + 0.1 * rng.normal(size=(tokens, n))).astype(np.float32)


def block_moments(x: np.ndarray) -> np.ndarray:
    width = rounding.column_block(x.shape[1])
    blocks = x.reshape(len(x), -1, width).astype(np.float64)
    return np.einsum("tbi,tbj->bij", blocks, blocks) / len(x)


def test_compensated_types_are_the_consecutive_level_ones() -> None:
    assert set(COMPENSATED) == {t for t in TYPES if get_type(t).first is not None}
    assert Q.IQ4_NL not in COMPENSATED and Q.Q4_K in COMPENSATED
    assert [rounding.column_block(n) for n in (512, 896, 4864, 96, 48)] == [256, 128, 256, 32, 0]


@pytest.mark.parametrize("qtype", COMPENSATED, ids=lambda t: t.name)
def test_compensated_rounding_cuts_the_output_error_and_keeps_the_edit(qtype: Q) -> None:
    """Weights on their type's grid, edited: on inputs never seen by the statistics (a second
    draw), the output error is well below aware rounding's, the edit is kept as well, only code
    fields change, and ggml's own dequantizer reads the same values."""
    rng = np.random.default_rng(11)
    w = quants.dequantize(quants.quantize(rng.normal(0, 0.02, (384, 512)).astype(np.float32), qtype), qtype)
    u = random_direction(384, seed=12)
    u /= np.linalg.norm(u)
    target = edited(w, u, -1.0)
    plain = quants.quantize(target, qtype)
    aware = rounding.keep_edit(plain, target, u, qtype, over_rows=True, before=u @ w)
    comp = rounding.keep_edit_compensated(plain, target, u, qtype, before=u @ w,
                                          moments=block_moments(correlated_inputs(512, 4000, seed=13)))
    held_back = correlated_inputs(512, 1000, seed=14)

    def out_error(data: np.ndarray) -> float:
        return float(np.linalg.norm((quants.dequantize(data, qtype) - target) @ held_back.T))

    assert out_error(comp) < 0.8 * out_error(aware), (out_error(comp) / out_error(aware))
    leak, _ = leak_and_rmse(comp, qtype, w, target, u)
    assert leak < 0.01
    layout, ts = get_type(qtype), GGML_QUANT_SIZES[qtype][1]
    only_codes = plain.reshape(-1, ts).copy()
    layout.put(only_codes, layout.get(comp.reshape(-1, ts)))
    assert np.array_equal(only_codes, comp.reshape(-1, ts))  # scales untouched
    ours = quants.dequantize(comp, qtype)
    assert np.array_equal(ours.view(np.uint32), ggml_ref.dequantize(comp, qtype, w.shape[1]).view(np.uint32))


@pytest.mark.parametrize("qtype", COMPENSATED, ids=lambda t: t.name)
def test_compensated_rounding_keeps_every_column_under_a_massive_activation(qtype: Q) -> None:
    """Inputs like a late block's MLP: the first token of every prompt carries a huge value on
    a few inputs and large ones on others. Compensation then asks for large carries, which
    once drove whole columns to the ends of their codes (Qwen2.5-1.5B block 26: one column 6x
    its share off). Every column keeps the edit within the leak limit."""
    rng = np.random.default_rng(20)
    w = quants.dequantize(quants.quantize(rng.normal(0, 0.02, (384, 512)).astype(np.float32), qtype), qtype)
    u = random_direction(384, seed=22)
    u /= np.linalg.norm(u)
    target = edited(w, u, -1.0)
    x = correlated_inputs(512, 2000, seed=21)
    sink = x[::40]
    sink[:, [3, 300]] = 300.0 * (1 + rng.random((len(sink), 2)))
    sink[:, 40:80] += 30.0 * rng.normal(size=(len(sink), 40))
    x[::40] = sink
    comp = rounding.keep_edit_compensated(quants.quantize(target, qtype), target, u, qtype, before=u @ w,
                                          moments=block_moments(x))
    off = np.abs(u @ quants.dequantize(comp, qtype) - u @ target) / np.sqrt(np.mean(np.square(u @ w)))
    assert off.max() <= 1.01 * rounding.LEAK_LIMIT, off.max()


def test_compensated_rounding_of_no_edit_moves_no_code() -> None:
    w = np.random.default_rng(15).normal(0, 0.02, (256, 512)).astype(np.float32)
    u = random_direction(256) / np.linalg.norm(random_direction(256))
    moments = block_moments(correlated_inputs(512, 2000, seed=16))
    for qtype in (Q.Q4_K, Q.Q5_0, Q.Q8_0):
        data = quants.quantize(w, qtype)
        grid = quants.dequantize(data, qtype)
        assert np.array_equal(rounding.keep_edit_compensated(data, grid, u, qtype, before=u @ grid, moments=moments),
                              data)


def test_cli_rounding_gptq(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`--rounding gptq` on the K-quant tiny model: the writers llama.cpp shows inputs for are
    rounded by their statistics (bytes differ from aware's), the embeddings as aware, the edit
    is kept, and the model loads."""
    import json

    from conftest import generate

    np.save(tmp_path / "d.npy", random_direction(256, seed=9))
    src = tiny["llama-kquant"]
    for mode in ("aware", "gptq"):
        run = cli(src, tmp_path / f"{mode}.gguf", "--direction", tmp_path / "d.npy", "--rounding", mode, "--embeddings")
        assert run.returncode == 0, run.stderr
    aware, gptq = Model(tmp_path / "aware.gguf"), Model(tmp_path / "gptq.gguf")
    n = aware.n_layer
    assert f"gptq rounding: {2 * n} of {2 * n + 1} edited tensors" in run.stderr
    for b in range(n):
        for name in (f"blk.{b}.attn_output.weight", f"blk.{b}.ffn_down.weight"):
            assert not np.array_equal(aware.raw(name), gptq.raw(name)), name
    assert np.array_equal(aware.raw("token_embd.weight"), gptq.raw("token_embd.weight"))
    report = json.loads(gptq.get("abliterate.requant_report"))
    assert all(report[q]["leak_worst"] < 0.01 for q in ("Q4_K", "Q6_K"))
    assert gptq.get("abliterate.rounding") == "gptq"
    assert generate(tmp_path / "gptq.gguf")
