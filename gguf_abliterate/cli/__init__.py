"""The `gguf-abliterate` command: the edit is the default form, other verbs are subcommands.

One module per command, each a plain function (what `demo` and tests call) under a thin
click command.
"""

from __future__ import annotations

import click

from gguf_abliterate import __version__
from gguf_abliterate.cli import chat, cvector, demo, direction, edit, eval, explain, inspect, judge, optimise


class _DefaultEdit(click.Group):
    """A group whose first argument, when not a subcommand name, starts the default `edit`."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["edit", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage("gguf-abliterate", "INPUT OUTPUT --direction FILE [OPTIONS]")
        formatter.write_usage("gguf-abliterate", "COMMAND [ARGS]...", prefix="   or: ")


@click.group(cls=_DefaultEdit, help=edit.HELP + "\nOther commands are listed below.")
@click.version_option(__version__, prog_name="gguf-abliterate")
def cli() -> None:
    pass


for _module in (edit, inspect, direction, explain, optimise, eval, judge, chat, demo, cvector):
    cli.add_command(_module.command)


def main() -> None:
    cli(prog_name="gguf-abliterate")
