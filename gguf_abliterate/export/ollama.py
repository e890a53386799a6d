"""Ollama's model store, read: a model's GGUF blob and chat settings, and a Modelfile for the edit.

Ollama (`$OLLAMA_MODELS`, else `~/.ollama/models`): `manifests/<registry>/<namespace>/<model>/<tag>`
is a JSON manifest whose layers name blobs by digest (`blobs/sha256-<hex>`); the layer with
media type `application/vnd.ollama.image.model` is the GGUF, and `...template`, `...system`,
`...params` hold the chat template, system prompt and parameters. We only read the store and
write a Modelfile beside the output; `ollama create` imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gguf_abliterate.errors import UserError

MEDIA = "application/vnd.ollama.image."
DEFAULT_REGISTRY = "registry.ollama.ai"


@dataclass
class OllamaModel:
    name: str
    gguf: Path
    template: str | None = None
    system: str | None = None
    params: dict[str, object] = field(default_factory=dict)


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def _manifest_path(root: Path, name: str) -> Path:
    """`llama3.2`, `llama3.2:1b`, `user/model:tag` or `host/ns/model:tag` -> its manifest file."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    return root.joinpath("manifests", *parts, tag or "latest")


def resolve_ollama(name: str, root: Path | None = None) -> OllamaModel:
    """The GGUF blob and the chat settings of a model in the local Ollama store."""
    root = root or ollama_dir()
    manifest_path = _manifest_path(root, name)
    if not manifest_path.is_file():
        raise UserError(f"Ollama model {name!r} not found in {root} (no {manifest_path.relative_to(root)}); "
                        f"`ollama pull {name}` first")
    try:
        layers = json.loads(manifest_path.read_text())["layers"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{manifest_path}: unreadable Ollama manifest ({e})") from None

    def blob(layer: dict[str, str]) -> Path:
        path = root / "blobs" / layer["digest"].replace(":", "-")
        if not path.is_file():
            raise UserError(f"Ollama model {name!r}: blob {path.name} is missing from {root / 'blobs'}")
        return path

    by_type = {layer.get("mediaType", ""): layer for layer in layers}
    model_layer = by_type.get(MEDIA + "model")
    if model_layer is None:
        raise UserError(f"Ollama model {name!r} has no model layer")
    gguf = blob(model_layer)
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"Ollama model {name!r}: its model layer {gguf.name} is not a GGUF file")
    out = OllamaModel(name, gguf)
    if MEDIA + "template" in by_type:
        out.template = blob(by_type[MEDIA + "template"]).read_text()
    if MEDIA + "system" in by_type:
        out.system = blob(by_type[MEDIA + "system"]).read_text()
    if MEDIA + "params" in by_type:
        out.params = json.loads(blob(by_type[MEDIA + "params"]).read_text())
    return out


def modelfile(gguf_name: str, model: OllamaModel) -> str:
    """A Modelfile that rebuilds the Ollama model around the edited GGUF beside it."""
    lines = [f"FROM ./{gguf_name}"]
    if model.template is not None:
        lines.append(f'TEMPLATE """{model.template}"""')
    if model.system is not None:
        lines.append(f'SYSTEM """{model.system}"""')
    for key, value in model.params.items():
        for v in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(v) if isinstance(v, str) else v}")
    return "\n".join(lines) + "\n"
