"""The converter end to end, on tiny built models of each architecture and on real SmolLM2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import cli, generate, random_direction
from gguf import GGMLQuantizationType as Q

from gguf_abliterate import quants
from gguf_abliterate.formats.direction_file import save_direction
from gguf_abliterate.gguf_io import Model
from gguf_abliterate.quants import rounding

# Relative RMS error a fresh quantization of a weight matrix may have, per type (loose bounds
# far above what ggml's quantizers reach, far below what a wrong edit produces).
REL_ERR = {Q.F32: 1e-6, Q.F16: 1e-3, Q.Q8_0: 0.01, Q.Q5_0: 0.06, Q.Q5_1: 0.05, Q.Q4_0: 0.12, Q.Q4_1: 0.1,
           Q.Q6_K: 0.03, Q.Q5_K: 0.05, Q.Q4_K: 0.1}


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def axis_for(model: Model, name: str, r: np.ndarray) -> np.ndarray:
    """The projection axis the edit must use: r, or g*r/|g*r| behind a Gemma post-norm."""
    post = {"attn_output": "post_attention_norm", "ffn_down": "post_ffw_norm"}
    parts = name.split(".")
    if model.arch == "gemma3" and parts[0] == "blk" and parts[2] in post:
        g = model.values(f"blk.{parts[1]}.{post[parts[2]]}.weight").astype(np.float64)
        return unit(g * r)
    return r


def expected_values(model: Model, name: str, r: np.ndarray, coef: float) -> np.ndarray:
    """The float64 target of the edit for one tensor, computed independently of the package."""
    w = model.values(name).astype(np.float64)
    u = axis_for(model, name, r)
    if name == "token_embd.weight":
        return w + coef * np.outer(w @ u, u)
    if w.ndim == 1:
        return w + coef * u * (u @ w)
    if w.ndim == 3:  # experts: each (n_embd, n_in) slice on its own
        return w + coef * u[None, :, None] * np.einsum("i,xij->xj", u, w)[:, None, :]
    return w + coef * np.outer(u, u @ w)


def writers(model: Model, blocks: range | list[int], embeddings: bool) -> set[str]:
    kinds = ("attn_output", "ffn_down", "ffn_down_exps", "ffn_down_shexp")
    names = {f"blk.{b}.{k}.{s}" for b in blocks for k in kinds for s in ("weight", "bias")}
    names = {n for n in names if n in model.tensors}
    return names | ({"token_embd.weight"} if embeddings else set())


def component_error(model: Model, name: str, got: np.ndarray, target: np.ndarray, r: np.ndarray) -> float:
    """||component along the axis of (got - target)|| / ||that component of the input||: the
    share of the edit that requantization undid (snap-back)."""
    u = axis_for(model, name, r)
    w = model.values(name).astype(np.float64)
    if name == "token_embd.weight":
        return float(np.linalg.norm((got - target) @ u) / np.linalg.norm(w @ u))
    axis = 1 if w.ndim == 3 else 0
    return float(np.linalg.norm(np.tensordot(u, got - target, (0, axis))) / np.linalg.norm(np.tensordot(u, w, (0, axis))))


def check_edit(src: Path, dst: Path, r: np.ndarray, coef: float, edited: set[str], aware: bool = True) -> None:
    """Untouched tensors byte-identical, edited ones equal to the float target within quant error,
    metadata kept, provenance added. With aware rounding (the default) the edit's component
    survives requantization (leak under 1%); the price is whole-step code moves, which on weights
    already on the grid (every requantized model) cost up to about 1.3x the RMSE of nearest rounding."""
    a, b = Model(src), Model(dst)
    assert list(a.tensors) == list(b.tensors)
    for name, t in a.tensors.items():
        tb = b.tensors[name]
        assert list(t.shape) == list(tb.shape), name
        if name not in edited:
            assert t.tensor_type == tb.tensor_type and np.array_equal(a.raw(name), b.raw(name)), name
            continue
        target = expected_values(a, name, r, coef)
        got = b.values(name).astype(np.float64)
        rel = np.sqrt(np.mean((got - target) ** 2) / np.mean(target**2))
        assert rel <= REL_ERR[tb.tensor_type], (name, tb.tensor_type.name, rel)
        # and as close as a fresh quantization of the target gets
        fresh = quants.dequantize(quants.quantize(target.astype(np.float32).reshape(-1, target.shape[-1]),
                                                  tb.tensor_type), tb.tensor_type).reshape(target.shape)
        fresh_err = np.sqrt(np.mean((fresh - target) ** 2))
        moved = aware and rounding.supports(tb.tensor_type) and target.ndim > 1
        err = np.sqrt(np.mean((got - target) ** 2))
        assert err <= fresh_err * (1.4 if moved else 1.02) + 1e-7, (name, err / fresh_err)
        if moved:
            assert component_error(a, name, got, target, r) < 0.01, name
    a_kv, b_kv = dict(a.kv_spans()), dict(b.kv_spans())
    for key, span in a_kv.items():
        assert bytes(b_kv[key]) == bytes(span), key
    assert b.get("abliterate.mode") == ("reverse" if coef > 0 else "abliterate")
    assert b.get("abliterate.tensor_count") == len(edited)


def last_logits(path: Path, prompt: str = "Hello, how are you?") -> np.ndarray:
    """Next-token logits after `prompt` (llama-cpp-python keeps scores only with logits_all)."""
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=128, n_threads=2, verbose=False, logits_all=True)
    try:
        toks = llm.tokenize(prompt.encode())
        llm.eval(toks)
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    finally:
        llm.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2moe", "gemma3"])
def test_abliterate_tiny_models(arch: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tiny[arch]
    model = Model(src)
    r = random_direction(model.n_embd)
    np.save(tmp_path / "d.npy", r)
    out = tmp_path / "out.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.npy", "-q")
    assert run.returncode == 0, run.stderr
    untied = "output.weight" in model.tensors
    check_edit(src, out, unit(r), -1.0, writers(model, range(model.n_layer), untied))
    before, after = last_logits(src), last_logits(out)
    assert np.isfinite(after).all()
    assert np.abs(after - before).max() > 1e-3  # the edit reaches llama.cpp's output
    assert isinstance(generate(out), str)


def test_reverse_per_layer_direction_and_layer_range(tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tiny["llama"]
    model = Model(src)
    rows = np.stack([random_direction(model.n_embd, seed=10 + i) for i in range(model.n_layer)])
    save_direction(tmp_path / "d.safetensors", rows, {"layer": "2", "model": "tiny-llama"})
    out = tmp_path / "out.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.safetensors", "--reverse", "--scale", "0.5",
              "--layers", "1-2", "-q")
    assert run.returncode == 0, run.stderr
    edited = writers(model, [1, 2], False)
    a, b = Model(src), Model(out)
    for name in a.tensors:
        if name not in edited:
            assert np.array_equal(a.raw(name), b.raw(name)), name
            continue
        block = int(name.split(".")[1])
        target = expected_values(a, name, unit(rows[block]), 0.5)
        got = b.values(name).astype(np.float64)
        assert np.sqrt(np.mean((got - target) ** 2) / np.mean(target**2)) <= REL_ERR[b.tensors[name].tensor_type]
    assert b.get("abliterate.layers") == "1-2"
    assert b.get("abliterate.direction_layer") == "2"
    assert b.get("abliterate.scale") == pytest.approx(0.5)


def test_scale_zero_changes_no_tensor(tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tiny["qwen2"]
    np.save(tmp_path / "d.npy", random_direction(Model(src).n_embd))
    out = tmp_path / "out.gguf"
    assert cli(src, out, "--direction", tmp_path / "d.npy", "--scale", "0", "-q").returncode == 0
    a, b = Model(src), Model(out)
    for name in a.tensors:
        assert a.tensors[name].tensor_type == b.tensors[name].tensor_type
        assert np.array_equal(a.raw(name), b.raw(name)), name


@pytest.mark.parametrize("reverse", [False, True])
def test_f32_storage_removes_or_amplifies_exactly(reverse: bool, tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tiny["qwen2"]
    model = Model(src)
    r = unit(random_direction(model.n_embd, seed=3))
    np.save(tmp_path / "d.npy", r.astype(np.float32))
    out = tmp_path / "out.gguf"
    args = ["--reverse", "--scale", "0.7"] if reverse else []
    run = cli(src, out, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "-q", *args)
    assert run.returncode == 0, run.stderr
    edited = Model(out)
    for name in writers(model, range(model.n_layer), True) - {"token_embd.weight"}:
        assert edited.tensors[name].tensor_type == Q.F32
        before = r @ model.values(name).astype(np.float64)
        after = r @ edited.values(name).astype(np.float64)
        want = 1.7 * before if reverse else 0 * before
        assert np.abs(after - want).max() <= 1e-5 * np.abs(before).max(), name
    emb_before = model.values("token_embd.weight").astype(np.float64) @ r
    emb_after = edited.values("token_embd.weight").astype(np.float64) @ r
    assert np.abs(emb_after - (1.7 * emb_before if reverse else 0)).max() <= 1e-5 * np.abs(emb_before).max()


def test_gemma3_post_norm_output_has_no_component_along_r(tiny: dict[str, Path], tmp_path: Path) -> None:
    """With F32 storage, RMSNorm(W' h) * g (what gemma3 adds to the residual) is orthogonal to r."""
    src = tiny["gemma3"]
    model = Model(src)
    r = unit(random_direction(model.n_embd, seed=5))
    np.save(tmp_path / "d.npy", r.astype(np.float32))
    out = tmp_path / "out.gguf"
    assert cli(src, out, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "-q").returncode == 0
    edited = Model(out)
    rng = np.random.default_rng(0)

    def residual_write(m: Model, block: int, writer: str, norm: str, h: np.ndarray) -> np.ndarray:
        y = m.values(f"blk.{block}.{writer}.weight").astype(np.float64) @ h
        y = y / np.sqrt(np.mean(y**2, axis=0) + 1e-6)
        return y * m.values(f"blk.{block}.{norm}.weight").astype(np.float64)[:, None]

    for block in range(model.n_layer):
        for writer, norm in (("attn_output", "post_attention_norm"), ("ffn_down", "post_ffw_norm")):
            n_in = int(model.tensors[f"blk.{block}.{writer}.weight"].shape[0])
            h = rng.normal(size=(n_in, 16))
            before = np.abs(r @ residual_write(model, block, writer, norm, h))
            after = np.abs(r @ residual_write(edited, block, writer, norm, h))
            assert before.mean() > 0.05
            assert after.max() < 1e-5 * before.mean(), (block, writer)


def test_embeddings_default_and_flags(tiny: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(256))
    tied, untied = tiny["llama"], tiny["qwen2"]
    run = cli(tied, tmp_path / "a.gguf", "--direction", tmp_path / "d.npy")
    assert run.returncode == 0 and "tied" in run.stderr and "--embeddings" in run.stderr
    assert Model(tmp_path / "a.gguf").get("abliterate.embeddings") is False
    assert cli(tied, tmp_path / "b.gguf", "--direction", tmp_path / "d.npy", "--embeddings", "-q").returncode == 0
    b = Model(tmp_path / "b.gguf")
    assert b.get("abliterate.embeddings") is True
    assert not np.array_equal(b.raw("token_embd.weight"), Model(tied).raw("token_embd.weight"))
    assert cli(untied, tmp_path / "c.gguf", "--direction", tmp_path / "d.npy", "--no-embeddings", "-q").returncode == 0
    assert np.array_equal(Model(tmp_path / "c.gguf").raw("token_embd.weight"), Model(untied).raw("token_embd.weight"))


def test_kquant_model_is_requantized_to_its_own_types(tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tiny["llama-kquant"]
    model = Model(src)
    r = random_direction(256)
    np.save(tmp_path / "d.npy", r)
    out = tmp_path / "out.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.npy", "--embeddings", "-q")
    assert run.returncode == 0, run.stderr
    edited = writers(model, range(model.n_layer), True)
    check_edit(src, out, unit(r), -1.0, edited)
    m = Model(out)
    assert {m.tensors[n].tensor_type for n in edited} == {Q.Q4_K, Q.Q6_K, Q.Q5_K}
    assert isinstance(generate(out), str)


def test_imatrix_types_are_refused_with_a_way_out(tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tiny["llama-iq2"]
    np.save(tmp_path / "d.npy", random_direction(256))
    out = tmp_path / "out.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.npy")
    assert run.returncode != 0
    for needle in ("blk.0.attn_output.weight", "IQ2_XXS", "importance matrix", "--requant-type"):
        assert needle in run.stderr
    assert not out.exists()
    run = cli(src, out, "--direction", tmp_path / "d.npy", "--requant-type", "q4_k", "-q")
    assert run.returncode == 0, run.stderr
    m = Model(out)
    assert m.tensors["blk.0.attn_output.weight"].tensor_type == Q.Q4_K
    assert m.tensors["blk.0.attn_q.weight"].tensor_type == Model(src).tensors["blk.0.attn_q.weight"].tensor_type
    assert m.get("abliterate.requant_type") == "Q4_K"
    assert isinstance(generate(out), str)


def test_force_replaces_existing_output(tiny: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(256))
    out = tmp_path / "out.gguf"
    out.write_bytes(b"old")
    run = cli(tiny["llama"], out, "--direction", tmp_path / "d.npy")
    assert run.returncode != 0 and "--force" in run.stderr and out.read_bytes() == b"old"
    assert cli(tiny["llama"], out, "--direction", tmp_path / "d.npy", "--force", "-q").returncode == 0
    assert Model(out).get("abliterate.mode") == "abliterate"


def test_inspect(tiny: dict[str, Path]) -> None:
    run = cli("inspect", tiny["llama-iq2"])
    assert run.returncode == 0, run.stderr
    assert "architecture:  llama" in run.stdout and "n_embd:        256" in run.stdout
    assert "4 x attn_output" in run.stdout and "IQ2_XXS" in run.stdout and "cannot be requantized" in run.stdout
    assert "tied" in run.stdout


@pytest.mark.real
def test_real_smollm2(smollm2: Path, tmp_path: Path) -> None:
    model = Model(smollm2)
    assert (model.arch, model.n_layer, model.n_embd) == ("llama", 30, 576)
    r = random_direction(model.n_embd, seed=7)
    np.save(tmp_path / "d.npy", r)
    out = tmp_path / "out.gguf"
    run = cli(smollm2, out, "--direction", tmp_path / "d.npy", "-q")
    assert run.returncode == 0, run.stderr
    check_edit(smollm2, out, unit(r), -1.0, writers(model, range(30), False))
    text = generate(out, "The capital of France is", 8)
    assert len(text.strip()) > 0

    serial = tmp_path / "serial.gguf"
    assert cli(smollm2, serial, "--direction", tmp_path / "d.npy", "-q", "-j", "1").returncode == 0
    assert serial.read_bytes() == out.read_bytes()  # worker processes change nothing

    zero = tmp_path / "zero.gguf"
    assert cli(smollm2, zero, "--direction", tmp_path / "d.npy", "--scale", "0", "-q").returncode == 0
    z = Model(zero)
    assert all(np.array_equal(model.raw(n), z.raw(n)) for n in model.tensors)

    f32 = tmp_path / "f32.gguf"
    assert cli(smollm2, f32, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "--layers", "10-12",
               "-q").returncode == 0
    f = Model(f32)
    for name in writers(model, [10, 11, 12], False):
        before = unit(r) @ model.values(name).astype(np.float64)
        assert np.abs(unit(r) @ f.values(name).astype(np.float64)).max() <= 1e-5 * np.abs(before).max()
    assert len(generate(f32, "The capital of France is", 8).strip()) > 0


def test_verify_reports_and_catches_damage(tiny: dict[str, Path], tmp_path: Path) -> None:
    from gguf_abliterate.formats.direction_file import load_direction
    from gguf_abliterate.edit.execute import apply_edit, edit_piece, output_tensors
    from gguf_abliterate.edit.options import EditOptions
    from gguf_abliterate.edit.parallel import UnitRunner
    from gguf_abliterate.edit.plan import plan_edit
    from gguf_abliterate.edit.verify import verify_output
    from gguf_abliterate.errors import UserError

    src = tiny["qwen2"]
    np.save(tmp_path / "d.npy", random_direction(256))
    out = tmp_path / "out.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.npy", "--verify")
    assert run.returncode == 0, run.stderr
    assert "verified 51 tensors: 42 byte-identical to the input, 9 edited and finite" in run.stderr

    model, opts = Model(src), EditOptions()
    plan, direction = plan_edit(model, opts), load_direction(tmp_path / "d.npy")
    with UnitRunner(model, 1, edit_piece) as runner:
        expected = output_tensors(model, plan, direction, runner)
    assert "verified" in verify_output(model, [out], expected)
    damaged = tmp_path / "damaged.gguf"
    data = bytearray(out.read_bytes())
    t = Model(out).tensors["blk.1.attn_q.weight"]
    data[t.data_offset + 5] ^= 0x40
    damaged.write_bytes(data)
    with pytest.raises(UserError, match="blk.1.attn_q.weight differs from the input"):
        verify_output(model, [damaged], expected)

    def refuse(report: str) -> None:
        raise UserError("refused")

    with pytest.raises(UserError, match="refused"):
        apply_edit(model, plan, direction, opts, tmp_path / "never.gguf", verify=refuse)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.npy", "damaged.gguf", "out.gguf"]


def test_requantization_report(tiny: dict[str, Path], tmp_path: Path) -> None:
    """Leak (snap-back) and RMSE per type: printed, and stored in the output's metadata. Aware
    rounding (the default) keeps the edit; --rounding nearest shows what plain ggml rounding loses."""
    import json

    np.save(tmp_path / "d.npy", random_direction(256))
    src = tiny["llama"]
    reports = {}
    for rounding_mode in ("aware", "nearest"):
        out = tmp_path / f"{rounding_mode}.gguf"
        run = cli(src, out, "--direction", tmp_path / "d.npy", "--rounding", rounding_mode)
        assert run.returncode == 0, run.stderr
        assert "leak median" in run.stderr and "Q4_0" in run.stderr
        assert Model(out).get("abliterate.rounding") == rounding_mode
        reports[rounding_mode] = report = json.loads(Model(out).get("abliterate.requant_report"))
        assert set(report) == {"Q4_0", "Q5_0", "F32"}  # attn_output, ffn_down, their biases
        assert report["Q4_0"]["leak_worst"] >= report["Q4_0"]["leak_median"]
        assert report["F32"]["leak_worst"] < 1e-5 and report["F32"]["rmse_worst"] < 1e-6
    nearest, aware = reports["nearest"], reports["aware"]
    assert 0.05 < nearest["Q4_0"]["leak_median"] < 1
    assert nearest["Q5_0"]["leak_median"] < nearest["Q4_0"]["leak_median"]  # finer grid, less snap-back
    for qtype in ("Q4_0", "Q5_0"):
        assert aware[qtype]["leak_worst"] < 0.01, aware
        assert aware[qtype]["rmse_worst"] < 1.4 * nearest[qtype]["rmse_worst"]
    f32 = tmp_path / "f32.gguf"
    assert cli(src, f32, "--direction", tmp_path / "d.npy", "--requant-type", "f32", "-q").returncode == 0
    report = json.loads(Model(f32).get("abliterate.requant_report"))
    assert set(report) == {"F32"} and report["F32"]["leak_worst"] < 1e-5


def test_requantization_report_is_stored_whole() -> None:
    """The stored report is valid JSON for any number of output types and any values: the
    header room reserved for it (`report_width`) always holds it (it used to be cut at 4 KB)."""
    import json

    from gguf_abliterate.quants.snapback import MIN_REPORT_WIDTH, Report, Sums, report_width

    report = Report()
    types = [f"TYPE_WITH_A_LONG_NAME_{i}" for i in range(60)]
    for i, t in enumerate(types):
        # extreme sums: huge and tiny values print as long floats
        report.add(f"blk.{i}.ffn_down.weight", t, Sums(1e300 * (i + 1), 3e-7, 1e-300, 1.2345678e290 * (i + 1), 7))
    text = report.to_json()
    assert len(text) > MIN_REPORT_WIDTH
    assert len(text.encode()) <= report_width(set(types))
    assert set(json.loads(text)) == set(types)
    assert report_width({"Q4_K", "Q6_K"}) == MIN_REPORT_WIDTH  # small reports keep the layout files always had


def test_norm_preserving_keeps_column_lengths(tiny: dict[str, Path], tmp_path: Path) -> None:
    """--method norm-preserving: each writer column keeps its length, the component along the
    axis is still removed, and an adapter (which cannot express it) is refused."""
    src = tiny["llama-nobias"]
    r = random_direction(256)
    np.save(tmp_path / "d.npy", r)
    out = tmp_path / "np.gguf"
    run = cli(src, out, "--direction", tmp_path / "d.npy", "--method", "norm-preserving", "--requant-type", "f32")
    assert run.returncode == 0, run.stderr
    model, edited, u = Model(src), Model(out), unit(r)
    for name in writers(model, range(4), False):
        w, w2 = model.values(name).astype(np.float64), edited.values(name).astype(np.float64)
        assert np.allclose(np.linalg.norm(w2, axis=0), np.linalg.norm(w, axis=0), rtol=1e-5)
        assert np.abs(u @ w2).max() <= 1e-5 * np.abs(u @ w).max()
        assert not np.allclose(w2, w - np.outer(u, u @ w), atol=1e-7)  # not the plain projection
    lora = cli(src, tmp_path / "a.gguf", "--direction", tmp_path / "d.npy", "--method", "norm-preserving",
               "--format", "lora")
    assert lora.returncode != 0 and "no low-rank" in lora.stderr
