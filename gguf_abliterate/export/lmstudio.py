"""LM Studio's models folder: where an output goes so the app lists it.

LM Studio lists every GGUF under `<models>/<publisher>/<name>/`, with `<models>` =
`$LMSTUDIO_MODELS`, else `~/.lmstudio/models`, else the older `~/.cache/lm-studio/models`.
"""

from __future__ import annotations

import os
from pathlib import Path


def lmstudio_dir() -> Path:
    if env := os.environ.get("LMSTUDIO_MODELS"):
        return Path(env)
    new, old = Path.home() / ".lmstudio" / "models", Path.home() / ".cache" / "lm-studio" / "models"
    return old if old.is_dir() and not new.is_dir() else new


def lmstudio_path(output_name: str, publisher: str = "local") -> Path:
    """Where LM Studio will list a GGUF: <models>/<publisher>/<name>/<file>."""
    name = output_name.removesuffix(".gguf")
    return lmstudio_dir() / publisher / name / output_name
