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

import math
import os
import re
import sys
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from gguf_abliterate.errors import UserError
from gguf_abliterate.textfile import read_json

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


# a name part or tag as Ollama allows them; anything else (an empty part, '..', a separator)
# could lead a path out of the store
_NAME_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_DIGEST = re.compile(r"^sha256[:-]([0-9a-f]{64})$")
_PARAM_KEY = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_TEXT = 1 << 20  # a template or system prompt larger than this is not a chat template


def _manifest_path(root: Path, name: str) -> Path:
    """`llama3.2`, `llama3.2:1b`, `user/model:tag` or `host/ns/model:tag` -> its manifest file."""
    base, _, tag = name.partition(":")
    parts = base.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_REGISTRY, "library", *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_REGISTRY, *parts]
    tag = tag or "latest"
    if len(parts) != 3 or not all(_NAME_PART.match(p) and p.strip(".") for p in (*parts, tag)):
        raise UserError(f"{name!r} is not an Ollama model name (model, model:tag, namespace/model:tag or "
                        f"host/namespace/model:tag)")
    return root.joinpath("manifests", *parts, tag)


def resolve_ollama(name: str, root: Path | None = None) -> OllamaModel:
    """The GGUF blob and the chat settings of a model in the local Ollama store. Everything in
    the store is checked as input from elsewhere: digests name blobs inside the store only, and
    a malformed manifest, layer or parameter file is one line of error."""
    root = root or ollama_dir()
    manifest_path = _manifest_path(root, name)
    if not manifest_path.is_file():
        raise UserError(f"Ollama model {name!r} not found in {root} (no {manifest_path.relative_to(root)}); "
                        f"`ollama pull {name}` first")
    manifest = read_json(manifest_path, "Ollama manifest")
    layers = manifest.get("layers") if isinstance(manifest, dict) else None
    if not isinstance(layers, list) or not all(isinstance(la, dict) for la in layers):
        raise UserError(f"{manifest_path}: unreadable Ollama manifest (no list of layers)")

    def blob(layer: dict[str, object]) -> Path:
        digest = _DIGEST.match(str(layer.get("digest", "")))
        if digest is None:
            raise UserError(f"{manifest_path}: a layer's digest {str(layer.get('digest'))[:80]!r} is not sha256:<64 hex>")
        path = root / "blobs" / f"sha256-{digest.group(1)}"
        if not path.is_file():
            raise UserError(f"Ollama model {name!r}: blob {path.name} is missing from {root / 'blobs'}")
        return path

    def text(layer: dict[str, object], what: str) -> str:
        path = blob(layer)
        if path.stat().st_size > MAX_TEXT:
            raise UserError(f"Ollama model {name!r}: its {what} ({path.name}) is over {MAX_TEXT // 1024} KB")
        try:
            return path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"Ollama model {name!r}: its {what} ({path.name}) is not UTF-8 text") from None

    by_type = {str(layer.get("mediaType", "")): layer for layer in layers}
    model_layer = by_type.get(MEDIA + "model")
    if model_layer is None:
        raise UserError(f"Ollama model {name!r} has no model layer")
    gguf = blob(model_layer)
    with open(gguf, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"Ollama model {name!r}: its model layer {gguf.name} is not a GGUF file")
    out = OllamaModel(name, gguf)
    if MEDIA + "template" in by_type:
        out.template = text(by_type[MEDIA + "template"], "template")
    if MEDIA + "system" in by_type:
        out.system = text(by_type[MEDIA + "system"], "system prompt")
    if MEDIA + "params" in by_type:
        params = read_json(blob(by_type[MEDIA + "params"]), f"Ollama model {name!r}'s parameters")
        if not isinstance(params, dict):
            raise UserError(f"Ollama model {name!r}: its parameters are not a JSON object")
        out.params = params
    return out


def modelfile(gguf_name: str, model: OllamaModel) -> str:
    """A Modelfile that rebuilds the Ollama model around the edited GGUF beside it. What the
    store supplies is written only where it cannot end its own field: a template or system
    prompt holding the closing quotes, or a parameter with a line break, would add directives
    of its own (ADAPTER, FROM, SYSTEM), so it is refused."""
    lines = [f"FROM ./{_plain(gguf_name, 'the output file name')}"]
    for directive, value in (("TEMPLATE", model.template), ("SYSTEM", model.system)):
        if value is not None:
            if '"""' in value or value.endswith('"'):
                raise UserError(f"Ollama model {model.name!r}: its {directive.lower()} holds quotes that would end "
                                f"the Modelfile's {directive} \"\"\"...\"\"\" early; refusing to write it")
            lines.append(f'{directive} """{value}"""')
    for key, value in model.params.items():
        if not _PARAM_KEY.match(key):
            raise UserError(f"Ollama model {model.name!r}: parameter name {key[:40]!r} is not a parameter")
        for v in value if isinstance(value, list) else [value]:
            if not isinstance(v, (str, int, float)) or (isinstance(v, float) and not math.isfinite(v)):
                raise UserError(f"Ollama model {model.name!r}: parameter {key} has a value of an unknown kind")
            shown = (f'"{_plain(v, f"parameter {key}")}"' if isinstance(v, str) else
                     str(v).lower() if isinstance(v, bool) else repr(v))
            lines.append(f"PARAMETER {key} {shown}")
    return "\n".join(lines) + "\n"


def _plain(text: str, what: str) -> str:
    """`text` if it holds no quote, backslash or control character (which could end its field)."""
    if any(c in '"\\' or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in text):
        raise UserError(f"{what} {text[:40]!r} holds quotes or control characters, which a Modelfile cannot carry")
    return text
