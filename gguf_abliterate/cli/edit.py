"""The default command: edit INPUT's weights, write OUTPUT (a GGUF, or a LoRA adapter)."""

from __future__ import annotations

from pathlib import Path

import click
from gguf import GGMLQuantizationType

from gguf_abliterate.cli.common import (
    Jobs,
    MAX_STRENGTH,
    WRITABLE,
    Command,
    Finite,
    InputPath,
    cli_ui,
    qtype_option,
    sayer,
    user_errors,
)
from gguf_abliterate.edit.options import OutFormat, Rounding
from gguf_abliterate.edit.project import method_choices, method_help
from gguf_abliterate.errors import UserError

HELP = """Remove (abliterate), amplify (--reverse) or add (--steer) a direction in INPUT's weights; write OUTPUT.

Every matrix that writes into the residual stream (attn_output, ffn_down, MoE experts, and
token_embd unless tied to the output head) is dequantized, projected and requantized to its
own type; every other tensor is copied byte for byte. OUTPUT appears only when complete.

\b
  gguf-abliterate in.gguf out.gguf --direction d.npy
  gguf-abliterate in.gguf out.gguf --direction d.safetensors --reverse --scale 0.5 --layers 8-20
  gguf-abliterate in.gguf out.gguf --direction concise.safetensors --steer 0.25
"""


@click.command("edit", cls=Command, help=HELP)
@click.argument("paths", nargs=-1, metavar="INPUT OUTPUT", type=click.Path(path_type=Path))
@click.option("--direction", "direction_path", required=True, type=InputPath(),
              help="Direction file: .npy or .safetensors, one vector (n_embd) or one per block (n_layer, n_embd).")
@click.option("--reverse", is_flag=True, help="Amplify the direction (W + S u u^T W) instead of removing it.")
@click.option("--scale", type=Finite(-MAX_STRENGTH, MAX_STRENGTH), default=None,
              help="Strength S: 1 (the default) removes the component fully; 0 changes nothing. An "
                   "`optimise --capability` pick brings its own (edit_strength), used unless --scale or "
                   "--reverse is given.")
@click.option("--steer", type=Finite(-MAX_STRENGTH, MAX_STRENGTH), default=None, metavar="S",
              help="Instead of projecting: add S times the behaviour's mean difference (positive minus negative "
                   "prompts, at the direction's block) to that block's MLP output, baked into its ffn_down as a "
                   "rank-1 term. Moves answers towards the positive side whichever way the model leans (negative S: "
                   "the other way); try 0.1-0.5. Needs a .safetensors file from `direction`.")
@click.option("--layers", default=None, metavar="A-B",
              help="Blocks to edit, 0-based and inclusive, e.g. 4-20 or 3,5,8-12. Default: all.")
@click.option("--embeddings/--no-embeddings", default=None,
              help="Edit token_embd too. Default: yes, unless it is tied to the output head.")
@click.option("--requant-type", type=click.Choice(WRITABLE, case_sensitive=False), callback=qtype_option,
              help="Store the edited matrices as this type instead of their own (e.g. f32, f16, q8_0).")
@click.option("--size-budget", default=None, metavar="+N%",
              help="Let the file grow by up to N% of its size: the edited matrices whose requantization error "
                   "(measured against the float edit) is largest per extra byte are stored as Q5_K, Q6_K or Q8_0. "
                   "Measuring runs the edit once per type, so the edit takes about four times as long.")
@click.option("--rounding", type=click.Choice([r.value for r in Rounding]), default=Rounding.AUTO.value,
              show_default=True,
              help="aware: keep ggml's block scales but re-round single codes so requantization does not "
                   "put the removed component back (snap-back); nearest: plain ggml rounding; gptq: aware, and "
                   "each rounding error offset in the columns its matrix's inputs correlate with (about half the "
                   "output error of aware; the edit takes about 1.5x as long), by the statistics the edit is given "
                   "(--statistics, or those the direction file names), or else measured by running 64 prompts "
                   "through llama.cpp (needs llama-cpp-python; cached, which saves time but changes no byte); "
                   "auto: gptq if the edit is given statistics, else aware.")
@click.option("--statistics", type=InputPath(), metavar="FILE",
              help="The input statistics gptq rounding weighs by (a .statistics.safetensors file `direction` "
                   "wrote). Default: those the direction file names, if any.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists (only once the new file is complete).")
@click.option("-j", "--jobs", type=Jobs(), default=None,
              help="Worker processes for the edit. Default: all cores for large edits, 1 for small ones.")
@click.option("--merge", is_flag=True, help="Write a split input as one OUTPUT file instead of parts like it.")
@click.option("--format", "out_format", type=click.Choice([f.value for f in OutFormat]), default=OutFormat.GGUF.value,
              show_default=True,
              help="gguf: the whole edited model. lora: the edit as an exact rank-1 LoRA adapter for "
                   "llama.cpp (--lora), a few hundred KB.")
@click.option("--verify", is_flag=True,
              help="Before OUTPUT takes its place, re-read it: types, shapes, offsets, untouched tensors byte-identical.")
@click.option("--ollama", "ollama_name", metavar="MODEL[:TAG]",
              help="Take INPUT from the local Ollama store (give only OUTPUT); a Modelfile with the "
                   "original template, system prompt and parameters is written beside OUTPUT.")
@click.option("--lmstudio", is_flag=True,
              help="Put OUTPUT (a file name) under LM Studio's models folder, local/<name>/, so the app lists it.")
@click.option("--method", type=click.Choice(method_choices()), default=None, help=method_help())
@click.option("--trial", type=click.IntRange(min=0), default=None,
              help="With a direction file from optimise: bake this trial instead of the chosen one.")
@click.option("--heads", default=None, metavar="B.H,...",
              help="Edit only these attention heads (block.head, 0-based, e.g. 12.3,12.7): each one's columns of "
                   "its block's attention output projection, what that head writes into the residual stream; "
                   "nothing else changes. Default: the heads a capability direction file names, else every "
                   "writer; 'all' edits every writer whatever the file names.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option("-v", "--verbose", is_flag=True, help="List every edited tensor.")
@user_errors
def command(paths: tuple[Path, ...], direction_path: Path, reverse: bool, scale: float | None, steer: float | None,
            layers: str | None, embeddings: bool | None, requant_type: GGMLQuantizationType | None, rounding: str,
            force: bool, jobs: int | None, merge: bool, out_format: str, verify: bool, ollama_name: str | None,
            lmstudio: bool, method: str | None, trial: int | None, heads: str | None, size_budget: str | None,
            statistics: Path | None, quiet: bool, verbose: bool) -> None:
    from gguf_abliterate.jobs.edit import EditRequest, run_edit

    if ollama_name:
        if len(paths) != 1:
            raise UserError("with --ollama give only OUTPUT: the input comes from the Ollama store")
        input_path, output_path = Path(), paths[0]
    elif len(paths) != 2:
        raise UserError("expected INPUT OUTPUT (see --help)")
    else:
        input_path, output_path = paths
    request = EditRequest(input=input_path, output=output_path, direction=direction_path, reverse=reverse,
                          scale=scale, steer=steer, layers=layers, embeddings=embeddings, requant_type=requant_type,
                          rounding=Rounding(rounding), statistics=statistics, size_budget=size_budget, method=method,
                          trial=trial, heads=heads, out_format=OutFormat(out_format), merge=merge, jobs=jobs, verify=verify,
                          ollama=ollama_name, lmstudio=lmstudio, force=force, verbose=verbose)
    say = sayer(quiet)
    for line in run_edit(request, cli_ui(quiet)).summary:
        say(line)
