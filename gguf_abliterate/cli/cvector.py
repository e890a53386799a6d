"""`cvector`: a direction as a llama.cpp control vector, for steering at inference time."""

from __future__ import annotations

from pathlib import Path

import click

from gguf_abliterate.cli.common import MAX_STRENGTH, Command, Finite, InputPath, OutputPath, echo, user_errors
from gguf_abliterate.errors import UserError


def export_cvector(direction_path: Path, output_path: Path, model_path: Path, *, layers: str | None = None,
                   scale: float = -1.0, force: bool = False) -> None:
    from gguf_abliterate.arch import steerable_blocks
    from gguf_abliterate.edit.options import parse_layers
    from gguf_abliterate.export.cvector import control_vectors, write_control_vector
    from gguf_abliterate.gguf_io import Model
    from gguf_abliterate.gguf_io.atomic import claim_outputs

    claim_outputs([output_path], [direction_path, model_path], force)
    model = Model(model_path)
    steerable = steerable_blocks(model.arch, model.n_layer, model.tensors)
    asked = parse_layers(layers, model.n_layer)
    if asked is not None and not asked <= steerable:
        raise UserError(f"llama.cpp applies control vectors to {model.arch} only after blocks "
                        f"{', '.join(map(str, sorted(steerable)))}; block(s) {', '.join(map(str, sorted(asked - steerable)))} "
                        f"would be ignored")
    blocks = asked or frozenset(steerable - {0})
    vectors = control_vectors(direction_path, model.n_layer, blocks, scale)
    write_control_vector(vectors, model.arch, output_path)
    echo(f"wrote {output_path}: blocks {min(blocks)}-{max(blocks)}, scale {scale:g} "
               f"(llama-cli -m {model_path} --control-vector {output_path})", err=True)


@click.command("cvector", cls=Command)
@click.argument("direction_path", metavar="DIRECTION", type=InputPath())
@click.argument("output_path", metavar="OUTPUT", type=OutputPath())
@click.option("--model", "model_path", required=True, type=InputPath(),
              help="The GGUF the direction belongs to (for its architecture and block count).")
@click.option("--layers", default=None, metavar="A-B",
              help="Blocks to steer, numbered as everywhere (block 0 cannot be steered). Default: 1 to the last.")
@click.option("--scale", type=Finite(-MAX_STRENGTH, MAX_STRENGTH), default=-1.0, show_default=True,
              help="Multiple of the measured mean difference to add; negative steers away from the behaviour.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@user_errors
def command(direction_path: Path, output_path: Path, model_path: Path, layers: str | None, scale: float,
            force: bool) -> None:
    """Export a direction as a llama.cpp control vector, for steering at inference time
    (`llama-cli --control-vector OUTPUT`). `direction.L` is added to the output of block L,
    the same `l_out-L` a direction is measured at, so nothing is shifted by one."""
    export_cvector(direction_path, output_path, model_path, layers=layers, scale=scale, force=force)
