"""`inspect`: a model's architecture, and which tensors an edit would touch."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import click

from gguf_abliterate import names, quants
from gguf_abliterate.cli.common import Command, InputPath, echo, user_errors
from gguf_abliterate.errors import UserError


def inspect_model(model_path: Path, verbose: bool = False) -> None:
    from gguf_abliterate.arch import get_arch
    from gguf_abliterate.edit.options import EditOptions
    from gguf_abliterate.edit.plan import plan_edit
    from gguf_abliterate.gguf_io import Model
    from gguf_abliterate.runtime.thinking import detect

    model = Model(model_path)
    types = Counter(t.tensor_type.name for t in model.tensors.values())
    echo(f"file:          {model.path}")
    echo(f"name:          {model.get_str(names.NAME) or '-'}")
    echo(f"architecture:  {model.arch}")
    try:
        get_arch(model.arch)
    except UserError as e:
        echo(f"  ({e})")
        return
    echo(f"blocks:        {model.n_layer}")
    echo(f"n_embd:        {model.n_embd}")
    echo(f"tensors:       {len(model.tensors)} ({', '.join(f'{n} {k}' for k, n in sorted(types.items()))})")
    reasoning = detect(model.get_str(names.CHAT_TEMPLATE) or None)
    echo(f"reasoning:     {reasoning.supported() if reasoning.thinks else 'none (answers at once)'}")
    plan = plan_edit(model, EditOptions(), strict=False)
    echo(f"tied embeddings: {'yes' if plan.tied_embeddings else 'no'}")
    kinds = Counter((names.tensor_role(e.name), e.src_type) for e in plan.edits.values())
    echo(f"an edit touches {len(plan.edits)} tensors:")
    for (role, qtype), n in sorted(kinds.items(), key=lambda kv: (kv[0][0], kv[0][1].name)):
        writable = "" if quants.can_quantize(qtype) else "  (cannot be requantized yet: use --requant-type)"
        echo(f"  {n:4d} x {role:<20} {qtype.name}{writable}")
    if verbose:
        for e in plan.edits.values():
            echo(f"  {e.name}  {e.src_type.name}{'  (post-norm ' + ', '.join(e.post_norms) + ')' if e.post_norms else ''}")
    for notice in plan.notices:
        echo(f"note: {notice}")


@click.command("inspect", cls=Command)
@click.argument("model_path", metavar="MODEL", type=InputPath())
@click.option("-v", "--verbose", is_flag=True, help="List every tensor an edit would touch.")
@user_errors
def command(model_path: Path, verbose: bool) -> None:
    """Show a model's architecture and which tensors an edit would touch."""
    inspect_model(model_path, verbose)
