"""Where vidmini keeps its data: `$VIDMINI_HOME`, default `~/.cache/vidmini`."""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    return Path(os.environ.get("VIDMINI_HOME", Path.home() / ".cache" / "vidmini")).expanduser()
