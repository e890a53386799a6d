"""LM Studio's models folder: where an output goes so the app lists it.

LM Studio lists every GGUF under `<models>/<publisher>/<name>/`, with `<models>` =
`$LMSTUDIO_MODELS`, else `~/.lmstudio/models`, else the older `~/.cache/lm-studio/models` (if
only that exists). The same on macOS, Linux and Windows, where `~` is `%USERPROFILE%`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def lmstudio_dir(env: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("LMSTUDIO_MODELS"):
        return Path(env["LMSTUDIO_MODELS"])
    home = home or Path.home()
    new, old = home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"
    return old if old.is_dir() and not new.is_dir() else new


def lmstudio_path(output_name: str, publisher: str = "local") -> Path:
    """Where LM Studio will list a GGUF: <models>/<publisher>/<name>/<file>."""
    name = output_name.removesuffix(".gguf")
    return lmstudio_dir() / publisher / name / output_name
