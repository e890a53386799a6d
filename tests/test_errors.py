"""Bad input: one line on stderr, non-zero exit, no traceback, and no output file left behind."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli, random_direction
from gguf import GGUFWriter

from gguf_abliterate.formats.direction_file import save_direction


def assert_clean_failure(run, out_dir: Path, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    leftovers = [p.name for p in out_dir.iterdir() if p.name.startswith(".") or p.name.startswith("out")]
    assert leftovers == [], leftovers


def _npy(path: Path, array: np.ndarray, allow_pickle: bool = False) -> Path:
    np.save(path, array, allow_pickle=allow_pickle)
    return path


BAD_DIRECTIONS = {
    "wrong length": (lambda d: _npy(d / "x.npy", random_direction(100)), "length 100"),
    "nan": (lambda d: _npy(d / "x.npy", np.full(256, np.nan, np.float32)), "NaN"),
    "inf": (lambda d: _npy(d / "x.npy", np.r_[np.inf, np.ones(255)].astype(np.float32)), "Inf"),
    "zero norm": (lambda d: _npy(d / "x.npy", np.zeros(256, np.float32)), "zero norm"),
    "zero row": (lambda d: _npy(d / "x.npy", np.r_[np.ones((3, 256)), np.zeros((1, 256))]), "rows 3"),
    "pickled object": (lambda d: _npy(d / "x.npy", np.array([{"a": 1}], dtype=object), True), "not a plain"),
    "string array": (lambda d: _npy(d / "x.npy", np.array(["a", "b"])), "numeric"),
    "rank 3": (lambda d: _npy(d / "x.npy", np.ones((2, 4, 256), np.float32)), "shape (2, 4, 256)"),
    "rows != blocks": (lambda d: _npy(d / "x.npy", np.ones((3, 256), np.float32)), "3 rows"),
    "not npy": (lambda d: (d / "x.npy").write_bytes(b"hello") and d / "x.npy", "x.npy"),
    "txt": (lambda d: (d / "x.txt").write_text("1 2 3") and d / "x.txt", ".npy or .safetensors"),
    "missing": (lambda d: d / "nope.npy", "no such direction file"),
    "safetensors without direction": (
        lambda d: _st(d, {"other": np.ones(256, np.float32)}), "no tensor named 'direction'"),
    "corrupt safetensors": (lambda d: (d / "x.safetensors").write_bytes(b"\xff" * 40) and d / "x.safetensors",
                            "unreadable"),
    "other architecture": (lambda d: _save(d / "x.safetensors", {"architecture": "gemma3"}), "gemma3"),
}


def _st(d: Path, tensors: dict[str, np.ndarray]) -> Path:
    from safetensors.numpy import save_file

    save_file(tensors, str(d / "x.safetensors"))
    return d / "x.safetensors"


def _save(path: Path, meta: dict[str, str]) -> Path:
    save_direction(path, random_direction(256), meta)
    return path


@pytest.mark.parametrize("case", sorted(BAD_DIRECTIONS))
def test_bad_direction(case: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    make, needle = BAD_DIRECTIONS[case]
    d = tmp_path / "in"
    d.mkdir()
    direction = make(d)
    outdir = tmp_path / "o"
    outdir.mkdir()
    run = cli(tiny["llama"], outdir / "out.gguf", "--direction", direction)
    assert_clean_failure(run, outdir, needle)


def _unsupported_arch(path: Path) -> Path:
    w = GGUFWriter(str(path), "rwkv6")
    w.add_uint32("rwkv6.block_count", 1)
    w.add_uint32("rwkv6.embedding_length", 256)
    w.add_tensor("token_embd.weight", np.ones((4, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _huge_block_count(path: Path, src: Path) -> Path:
    """`src` with llama.block_count (a uint32 value after its key and type) set to 2^31 - 1."""
    data = bytearray(src.read_bytes())
    at = data.index(b"llama.block_count") + len(b"llama.block_count") + 4
    data[at : at + 4] = (2**31 - 1).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


BAD_MODELS = {
    "missing": (lambda d, src: d / "nope.gguf", "no such file"),
    "not gguf": (lambda d, src: (d / "m.gguf").write_bytes(b"PK\x03\x04" + b"\0" * 100) and d / "m.gguf",
                 "not a GGUF file"),
    "truncated header": (lambda d, src: (d / "m.gguf").write_bytes(src.read_bytes()[:2000]) and d / "m.gguf",
                         "truncated or corrupt"),
    "truncated data": (lambda d, src: (d / "m.gguf").write_bytes(src.read_bytes()[:-5000]) and d / "m.gguf",
                       "truncated"),
    "unsupported arch": (lambda d, src: _unsupported_arch(d / "m.gguf"), "rwkv6"),
    "huge block count": (lambda d, src: _huge_block_count(d / "m.gguf", src), "block_count is 2147483647"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model(case: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    make, needle = BAD_MODELS[case]
    d = tmp_path / "in"
    d.mkdir()
    model = make(d, tiny["llama"])
    np.save(d / "d.npy", random_direction(256))
    outdir = tmp_path / "o"
    outdir.mkdir()
    run = cli(model, outdir / "out.gguf", "--direction", d / "d.npy")
    assert_clean_failure(run, outdir, needle)


@pytest.mark.parametrize("args,needle", [
    (["--layers", "5-2"], "backwards"),
    (["--layers", "0-99"], "blocks 0-3"),
    (["--layers", "two"], "expected ranges"),
    (["--scale", "-1"], "--reverse"),
])
def test_bad_options(args: list[str], needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(256))
    outdir = tmp_path / "o"
    outdir.mkdir()
    run = cli(tiny["llama"], outdir / "out.gguf", "--direction", tmp_path / "d.npy", *args)
    assert_clean_failure(run, outdir, needle)


def test_output_is_input_or_in_missing_folder(tiny: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "m.gguf"
    src.write_bytes(tiny["llama"].read_bytes())
    np.save(tmp_path / "d.npy", random_direction(256))
    before = src.read_bytes()
    for out in (src, tmp_path / "." / "m.gguf"):
        run = cli(src, out, "--direction", tmp_path / "d.npy", "--force")
        assert run.returncode != 0 and "is one of this command's inputs" in run.stderr and "Traceback" not in run.stderr
    assert src.read_bytes() == before
    run = cli(src, tmp_path / "no" / "out.gguf", "--direction", tmp_path / "d.npy")
    assert run.returncode != 0 and "no such directory" in run.stderr


def test_write_failure_leaves_nothing(tiny: dict[str, Path], tmp_path: Path) -> None:
    """A write error half-way (file size limit) gives a clean error and no partial output."""
    np.save(tmp_path / "d.npy", random_direction(256))
    outdir = tmp_path / "o"
    outdir.mkdir()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    p = subprocess.run([sys.executable, "-m", "gguf_abliterate", str(tiny["llama"]), str(outdir / "out.gguf"),
                        "--direction", str(tmp_path / "d.npy"), "-q"],
                       capture_output=True, text=True, preexec_fn=limit)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr and "File too large" in p.stderr
    assert list(outdir.iterdir()) == []


@pytest.mark.real
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_during_write_leaves_nothing(sig: int, smollm2: Path, tmp_path: Path) -> None:
    np.save(tmp_path / "d.npy", random_direction(576))
    outdir = tmp_path / "o"
    outdir.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "gguf_abliterate", str(smollm2), str(outdir / "out.gguf"),
                             "--direction", str(tmp_path / "d.npy"), "--embeddings", "-q"],
                            stderr=subprocess.PIPE, text=True,
                            # a shell's background job inherits SIGINT ignored, and Python keeps it so
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not any(p.name.endswith(".partial") for p in outdir.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the edit never started writing"
        time.sleep(0.01)
    # Freeze it while the partial file exists, so the signal lands mid-write even on a busy
    # machine (a fixed sleep let a fast edit finish first and exit 0).
    proc.send_signal(signal.SIGSTOP)
    assert any(p.name.endswith(".partial") for p in outdir.iterdir())
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert list(outdir.iterdir()) == []


def _patch(data: bytes, pos: int, value: int, width: int) -> bytes:
    return data[:pos] + value.to_bytes(width, "little") + data[pos + width:]


def _tensor_info_pos(data: bytes, name: str) -> tuple[int, int]:
    """(position of n_dims, n_dims) of a tensor's info record, found by its name."""
    encoded = len(name).to_bytes(8, "little") + name.encode()
    pos = data.index(encoded) + len(encoded)
    return pos, int.from_bytes(data[pos : pos + 4], "little")


def _hostile(data: bytes, case: str, scratch: Path) -> bytes:
    from gguf_abliterate.gguf_io import GGUFFile

    scratch.write_bytes(data)
    f = GGUFFile(scratch)
    if case == "version":
        return _patch(data, 4, 99, 4)
    if case == "tensor count":
        return _patch(data, 8, 2**62, 8)
    if case == "kv count":
        return _patch(data, 16, 2**62, 8)
    if case == "key length":
        return _patch(data, 24, 2**62, 8)
    if case == "array count":
        return _patch(data, f.fields["tokenizer.ggml.tokens"].value_start + 4, 2**60, 8)
    pos, n_dims = _tensor_info_pos(data, "blk.0.attn_q.weight")
    offset_pos = pos + 4 + 8 * n_dims + 4
    if case == "offset past end":
        return _patch(data, offset_pos, 2**40, 8)
    if case == "overlapping offsets":
        return _patch(data, offset_pos, 0, 8)
    if case == "row not a block multiple":
        return _patch(data, pos + 4, 250, 8)
    if case == "too many dims":
        return _patch(data, pos, 7, 4)
    raise AssertionError(case)


@pytest.mark.parametrize("case,needle", [
    ("version", "version 99 is not supported"),
    ("tensor count", "cannot fit"),
    ("kv count", "cannot fit"),
    ("key length", "past the end"),
    ("array count", "past the end"),
    ("offset past end", "runs past the end"),
    ("overlapping offsets", "overlaps"),
    ("row not a block multiple", "does not fit Q8_0 blocks"),
    ("too many dims", "7 dimensions"),
])
def test_hostile_headers(case: str, needle: str, tiny: dict[str, Path], tmp_path: Path) -> None:
    """Absurd counts and lengths are refused before any allocation, with a clear line."""
    bad = tmp_path / "in" / "m.gguf"
    bad.parent.mkdir()
    bad.write_bytes(_hostile(tiny["llama"].read_bytes(), case, tmp_path / "probe.gguf"))
    before = bad.read_bytes()
    np.save(tmp_path / "d.npy", random_direction(256))
    outdir = tmp_path / "o"
    outdir.mkdir()
    run = cli(bad, outdir / "out.gguf", "--direction", tmp_path / "d.npy")
    assert_clean_failure(run, outdir, needle)
    assert bad.read_bytes() == before


def test_failed_edit_keeps_existing_output(tiny: dict[str, Path], tmp_path: Path) -> None:
    """With --force, an existing output is replaced only by a complete new file."""
    np.save(tmp_path / "d.npy", random_direction(256))
    out = tmp_path / "out.gguf"
    out.write_bytes(b"previous result")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny["llama"].read_bytes()[:-5000])
    run = cli(bad, out, "--direction", tmp_path / "d.npy", "--force")
    assert run.returncode != 0 and out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "d.npy", "out.gguf"]
