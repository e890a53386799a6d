"""The quant engine against ggml's own C code (libggml-base, through ctypes), byte for byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from support import ggml_ref

from gguf_abliterate import quants
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import legacy

WRITABLE = [t for t in Q if quants.can_quantize(t)]
# what the issue asks the engine to write, without an importance matrix
REQUIRED = {Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
            Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.TQ1_0, Q.TQ2_0}


def test_every_required_type_is_writable() -> None:
    assert REQUIRED <= set(WRITABLE)
    imatrix = [t for t in Q if quants.needs_imatrix(t)]
    assert len(imatrix) == 7 and not any(quants.can_quantize(t) for t in imatrix)


def cases(n_per_row: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(42)
    rows = 8
    heavy = rng.standard_t(2, (rows, n_per_row)).astype(np.float32)
    outlier = rng.normal(0, 0.01, (rows, n_per_row)).astype(np.float32)
    outlier[:, 7] = 40.0
    return {
        "normal": rng.normal(0, 1, (rows, n_per_row)).astype(np.float32),
        "heavy-tailed": heavy,
        "zeros": np.zeros((rows, n_per_row), np.float32),
        "constant": np.full((rows, n_per_row), 0.37, np.float32),
        "outlier": outlier,
        "tiny": (rng.normal(0, 1, (rows, n_per_row)) * 1e-38).astype(np.float32),
        "denormal": (rng.normal(0, 1, (rows, n_per_row)) * 1e-42).astype(np.float32),
        "huge": (rng.normal(0, 1, (rows, n_per_row)) * 1e30).astype(np.float32),  # x*x overflows
        "positive": np.abs(rng.normal(0, 1, (rows, n_per_row))).astype(np.float32),
        "negative constant": np.full((rows, n_per_row), -0.37, np.float32),
        # +m and -m in one block, either first: Q4_0/Q5_0 scale by the first of largest magnitude
        "signed ties": np.tile(np.float32([0.5, -0.5, 0.25, -0.5, 0.5]), rows * n_per_row // 5 + 1)[
            : rows * n_per_row].reshape(rows, n_per_row),
        "small integers": rng.integers(-3, 4, (rows, n_per_row)).astype(np.float32),
        "signed zeros": np.where(rng.random((rows, n_per_row)) < 0.5, -0.0, 0.0).astype(np.float32),
        # Q4_1/Q5_1 keep the first of equal extremes: a zero minimum (maximum) may be -0.0 or +0.0
        "rectified": np.where(rng.random((rows, n_per_row)) < 0.3, np.where(rng.random((rows, n_per_row)) < 0.5,
                              -0.0, 0.0), np.abs(rng.normal(0, 1, (rows, n_per_row)))).astype(np.float32),
        "rectified negative": np.where(rng.random((rows, n_per_row)) < 0.3, np.where(rng.random((rows, n_per_row)) < 0.5,
                                       -0.0, 0.0), -np.abs(rng.normal(0, 1, (rows, n_per_row)))).astype(np.float32),
    }


@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda t: t.name)
def test_quantize_and_dequantize_match_ggml(qtype: Q) -> None:
    for name, values in cases(512).items():
        ours = quants.quantize(values, qtype)
        theirs = ggml_ref.quantize(values, qtype)
        assert ours.shape == theirs.shape and ours.dtype == np.uint8
        assert np.array_equal(ours, theirs), (qtype.name, name)
        back = quants.dequantize(ours, qtype)
        assert np.array_equal(back.view(np.uint32), ggml_ref.dequantize(ours, qtype, 512).view(np.uint32)), name


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K], ids=lambda t: t.name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_an_error(qtype: Q, bad: float) -> None:
    values = np.ones((3, 256), np.float32)
    values[2, 200] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quants.quantize(values, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0], ids=lambda t: t.name)
def test_lane_quantizers_across_chunks_and_extremes(qtype: Q) -> None:
    """More blocks than one lane chunk (the last one partial), and the largest finite floats."""
    rng = np.random.default_rng(7)
    values = rng.normal(0, 0.02, (2 * legacy.CHUNK // 16 + 3, 512)).astype(np.float32)
    values[5, 40] = np.finfo(np.float32).max
    values[6, 70] = -np.finfo(np.float32).max
    values[7, 64:96] = np.finfo(np.float32).smallest_subnormal
    assert np.array_equal(quants.quantize(values, qtype), ggml_ref.quantize(values, qtype))


@pytest.mark.real
@pytest.mark.parametrize("qtype", WRITABLE, ids=lambda t: t.name)
def test_real_tensors_match_ggml(qtype: Q, smollm2: Path) -> None:
    """Real weights (dequantized from the SmolLM2 file), requantized: same bytes as ggml."""
    model = Model(smollm2)
    for name in ("blk.3.attn_output.weight", "blk.17.ffn_down.weight", "token_embd.weight"):
        values = model.values(name)[:256]
        n = values.shape[-1] - values.shape[-1] % 256 if values.shape[-1] % quants.block_size(qtype) else values.shape[-1]
        values = np.ascontiguousarray(values[:, :n])
        assert np.array_equal(quants.quantize(values, qtype), ggml_ref.quantize(values, qtype)), name


@pytest.mark.real
def test_real_kquant_tensors_match_ggml(gemma3: Path) -> None:
    """gemma-3-270m's own Q4_K / Q6_K / Q5_0 / Q8_0 tensors, dequantized and requantized to
    every K and IQ4 type: same bytes as ggml."""
    model = Model(gemma3)
    by_type: dict[Q, str] = {}
    for name, t in model.tensors.items():
        if t.tensor_type not in by_type and len(t.shape) == 2 and t.shape[0] % 256 == 0:
            by_type[t.tensor_type] = name
    assert {Q.Q4_K, Q.Q6_K} <= set(by_type)
    for name in by_type.values():
        values = np.ascontiguousarray(model.values(name)[:128])
        for qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.Q8_0, Q.Q5_0):
            assert np.array_equal(quants.quantize(values, qtype), ggml_ref.quantize(values, qtype)), (name, qtype)


@pytest.mark.real
def test_real_files_dequantize_like_ggml(smollm2: Path, gemma3: Path) -> None:
    """Every quantized type stored in the SmolLM2 (Q4_1 …) and gemma-3 (Q4_K, Q6_K, Q5_0, Q8_0)
    files reads back as ggml's to_float reads it, bit for bit."""
    seen: set[Q] = set()
    for path in (smollm2, gemma3):
        model = Model(path)
        for name, t in model.tensors.items():
            if t.tensor_type in seen or t.tensor_type in (Q.F32, Q.F16) or len(t.shape) != 2:
                continue
            seen.add(t.tensor_type)
            raw = np.ascontiguousarray(model.raw(name)[:64])
            ours = quants.dequantize(raw, t.tensor_type)
            theirs = ggml_ref.dequantize(raw, t.tensor_type, int(t.shape[0]))
            assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), (name, t.tensor_type.name)
    assert {Q.Q4_1, Q.Q4_K, Q.Q6_K} <= seen


def test_mxfp4_scales_at_powers_of_two_match_ggml() -> None:
    """MXFP4's scale is floorf(log2f(amax)): blocks whose maximum is just below, at or just
    above each power of two, where a log2 that rounds differently picks another scale."""
    k = np.arange(-126, 127, dtype=np.float32)
    edges = np.float32(2.0) ** k
    maxima = np.concatenate([np.nextafter(edges, np.float32(0)), edges, np.nextafter(edges, np.float32(np.inf))])
    rng = np.random.default_rng(3)
    blocks = (rng.uniform(-0.9, 0.9, (maxima.size, 32)) * maxima[:, None]).astype(np.float32)
    blocks[:, 7] = maxima
    assert np.array_equal(quants.quantize(blocks, Q.MXFP4), ggml_ref.quantize(blocks, Q.MXFP4))


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda t: t.name)
def test_kquant_scale_search_tiles_match_ggml(qtype: Q) -> None:
    """The compiled scale searches take sub-blocks 64 at a time: a last tile that is partly
    filled, and a tile where denormal blocks (rounded by the exact nearest_int) sit beside
    ordinary ones, give ggml's bytes."""
    rng = np.random.default_rng(11)
    values = rng.normal(0, 0.02, (21, 256)).astype(np.float32)  # 168 or 336 sub-blocks
    values[3] *= np.float32(1e-40)
    values[17, :40] = 0
    assert np.array_equal(quants.quantize(values, qtype), ggml_ref.quantize(values, qtype))
