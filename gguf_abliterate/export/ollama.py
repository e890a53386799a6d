"""Ollama's model store, read: a model's GGUF blob and chat settings, and a Modelfile for the edit.

The store is `$OLLAMA_MODELS` if set, else `~/.ollama/models` on every platform (on Windows
`%USERPROFILE%\\.ollama\\models`), and on Linux, where the installer runs Ollama as a system
service, `/usr/share/ollama/.ollama/models` when the user has none. Inside it,
`manifests/<registry>/<namespace>/<model>/<tag>`
is a JSON manifest whose layers name blobs by digest (`blobs/sha256-<hex>`); the layer with
media type `application/vnd.ollama.image.model` is the GGUF, and `...template`, `...system`,
`...params` hold the chat template, system prompt and parameters. We only read the store and
write a Modelfile beside the output; `ollama create` imports it.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
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


# where Ollama's Linux installer puts the store of its system service
LINUX_SERVICE_STORE = Path("/usr/share/ollama/.ollama/models")


def ollama_dirs(env: Mapping[str, str] | None = None, home: Path | None = None,
                platform: str = sys.platform) -> list[Path]:
    """Where the store may be, in the order Ollama itself would use."""
    env = os.environ if env is None else env
    if env.get("OLLAMA_MODELS"):
        return [Path(env["OLLAMA_MODELS"])]
    dirs = [(home or Path.home()) / ".ollama" / "models"]
    if platform.startswith("linux"):
        dirs.append(LINUX_SERVICE_STORE)
    return dirs


def ollama_dir(env: Mapping[str, str] | None = None, home: Path | None = None,
               platform: str = sys.platform) -> Path:
    """The first store that exists (the user's own if none does)."""
    dirs = ollama_dirs(env, home, platform)
    return next((d for d in dirs if d.is_dir()), dirs[0])


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
