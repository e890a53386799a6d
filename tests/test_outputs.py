"""Nothing the user owns is overwritten: every output of every command is claimed against every
input of it (by identity: a symlink or a hard link to an input is that input), an existing
file is replaced only with --force, and a failed write leaves the previous file whole.

The cases are derived from the commands themselves: each option or argument of type
OutputPath is tried against each of type InputPath or InputName, so a new option is covered
as soon as it exists, and a test fails if a path option is neither.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT, cli

from gguf_abliterate.cli import cli as group
from gguf_abliterate.cli.common import Command, InputName, InputPath, OutputFolder, OutputPath

# the edit's INPUT OUTPUT pair is one argument (OUTPUT alone with --ollama); the edit claims it itself
SELF_CLAIMED = {("edit", "paths")}


def _params(command: click.Command, kind: type | tuple[type, ...]) -> list[click.Parameter]:
    return [p for p in command.params if isinstance(p.type, kind)]


def test_every_path_a_command_takes_is_an_input_or_an_output() -> None:
    for name, command in group.commands.items():
        assert isinstance(command, Command), f"{name} does not claim its outputs"
        for p in command.params:
            if isinstance(p.type, click.Path) and (name, p.name) not in SELF_CLAIMED:
                assert isinstance(p.type, (InputPath, OutputPath, OutputFolder)), f"{name} {p.name}: input or output?"
        if _params(command, OutputPath):
            assert "force" in {p.name for p in command.params}, f"{name} writes files but has no --force"


def _cases() -> list[tuple[str, str, str]]:
    cases = [(name, out.name, inp.name) for name, command in sorted(group.commands.items())
             for out in _params(command, OutputPath) for inp in _params(command, (InputPath, InputName))]
    assert {c[0] for c in cases} >= {"direction", "optimise", "eval", "judge", "cvector"}
    return [(n, o, i) for n, o, i in cases if o and i]


LINKS: dict[str, Callable[[Path, Path], None]] = {
    "same name": lambda target, link: None,
    "symlink": lambda target, link: link.symlink_to(target),
    "hard link": lambda target, link: os.link(target, link),
}


def _argv(command: click.Command, values: dict[str, str], tmp: Path) -> list[str]:
    """A command line giving `values` and a placeholder for every other required parameter."""
    argv: list[str] = []
    for p in command.params:
        value = values.get(p.name or "")
        if value is None and p.required:
            value = str(tmp / f"placeholder-{p.name}") if isinstance(p.type, OutputPath) else str(tmp / "other")
        if value is None:
            continue
        argv += [value] if isinstance(p, click.Argument) else [p.opts[0], value]
    return argv


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("name,output,input_", _cases())
def test_no_output_replaces_an_input(name: str, output: str, input_: str, link: str, tmp_path: Path) -> None:
    command = group.commands[name]
    (tmp_path / "other").write_bytes(b"another input")
    target = tmp_path / "input.txt"
    target.write_bytes(b"the user's file")
    out = target if link == "same name" else tmp_path / "out.txt"
    LINKS[link](target, out)
    argv = [name, *_argv(command, {input_: str(target), output: str(out), "force": None}, tmp_path)]
    if "force" in {p.name for p in command.params}:
        argv.append("--force")  # even forced, an input is never an output
    result = CliRunner().invoke(group, argv)
    assert result.exit_code == 1, result.output
    assert "is one of this command's inputs" in result.output and "Traceback" not in result.output
    assert target.read_bytes() == b"the user's file"
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob(".*.partial"))


@pytest.mark.parametrize("name,output", sorted({(n, o) for n, o, _ in _cases()}))
def test_an_existing_output_needs_force(name: str, output: str, tmp_path: Path) -> None:
    command = group.commands[name]
    (tmp_path / "other").write_bytes(b"an input")
    existing = tmp_path / "existing.out"
    existing.write_bytes(b"hours of work")
    result = CliRunner().invoke(group, [name, *_argv(command, {output: str(existing)}, tmp_path)])
    assert result.exit_code == 1 and "exists; pass --force to replace it" in result.output, result.output
    assert existing.read_bytes() == b"hours of work"


@pytest.mark.parametrize("name,output", sorted({(n, o) for n, o, _ in _cases()}))
def test_an_unwritable_folder_fails_before_the_work(name: str, output: str, tmp_path: Path) -> None:
    """/proc takes no new files, even from root: the claim tries to create one, so the command
    fails at once instead of after the computation."""
    command = group.commands[name]
    (tmp_path / "other").write_bytes(b"an input")
    result = CliRunner().invoke(group, [name, *_argv(command, {output: "/proc/out.txt"}, tmp_path)])
    assert result.exit_code == 1 and "/proc: cannot write here" in result.output, result.output


def test_two_outputs_may_not_name_one_file(tmp_path: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    result = CliRunner().invoke(group, ["eval", str(tmp_path / "m.gguf"), "--json", str(tmp_path / "r"),
                                        "--report", str(tmp_path / "r")])
    assert result.exit_code == 1 and "named twice as an output" in result.output


def test_the_edit_claims_its_output_against_the_model_and_the_direction(tiny: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(tiny["llama"].read_bytes())
    d = tmp_path / "d.npy"
    np.save(d, np.ones(256, np.float32))
    before = {p: p.read_bytes() for p in (model, d)}
    for target in (model, d):
        for link in LINKS:
            out = target if link == "same name" else tmp_path / f"out-{link.replace(' ', '-')}.gguf"
            LINKS[link](target, out)
            result = CliRunner().invoke(group, [str(model), str(out), "--direction", str(d), "--force"])
            assert result.exit_code == 1 and "is one of this command's inputs" in result.output, result.output
            if out != target:
                out.unlink()
    assert {p: p.read_bytes() for p in before} == before


def test_a_full_disk_leaves_the_previous_json_whole(tiny: dict[str, Path], tmp_path: Path) -> None:
    """eval --json once replaced the file with a plain write: a disk that filled up (here a file
    size limit) left a truncated JSON and the previous results gone."""
    out = tmp_path / "results.json"
    out.write_text('{"previous": "results"}')

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))

    run = subprocess.run([sys.executable, "-m", "gguf_abliterate", "eval", str(tiny["llama-chat"]), "-n", "2",
                          "--max-tokens", "2", "--json", str(out), "--force", "-q"], capture_output=True, text=True,
                         cwd=ROOT, preexec_fn=small_files)
    assert run.returncode == 1 and "File too large" in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert out.read_text() == '{"previous": "results"}'
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_cvector_never_replaces_its_direction(tiny: dict[str, Path], tmp_path: Path) -> None:
    """`cvector D D --force` once wrote the control vector over the direction it was made from."""
    d = tmp_path / "d.npy"
    np.save(d, np.ones(256, np.float32))
    before = d.read_bytes()
    run = cli("cvector", d, d, "--model", tiny["llama"], "--force")
    assert run.returncode == 1 and "is one of this command's inputs" in run.stderr
    assert d.read_bytes() == before
