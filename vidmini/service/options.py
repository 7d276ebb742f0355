"""The options the faces offer, importable without torch: their names and defaults, stated once here."""

from __future__ import annotations

from vidmini.engine.names import CLIP_REPO, DEFAULT_REPO, DTYPE_NAMES, PROMPT_STYLES

__all__ = ["CLIP_REPO", "DEFAULT_REPO", "DTYPE_NAMES", "PROMPT_STYLES", "user_error_types"]


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, reported as one line (exit 2). Only the modules a command actually
    loaded are consulted: an error class of a module never imported cannot have been raised, and importing it
    here would make every light command pay for torch and transformers."""
    import sys

    from vidmini.common.errors import UsageError

    types: list[type[BaseException]] = [UsageError, FileNotFoundError]
    for module, name in (("vidmini.engine.checkpoint", "CheckpointError"), ("vidmini.ingest.simple_decode", "MediaError"),
                         ("vidmini.ingest.errors", "IngestError"), ("vidmini.service.library", "LibraryError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            types.append(getattr(loaded, name))
    return tuple(types)
