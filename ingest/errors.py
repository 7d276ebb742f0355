"""Typed ingest errors; every message is one line naming the input and the cause."""

from __future__ import annotations


class IngestError(ValueError):
    """Base: an input that cannot be ingested (expected failures: no traceback for the user)."""


class SourceNotFound(IngestError):
    pass


class SourcePermissionError(IngestError):
    pass


class NotAVideo(IngestError):
    """Zero bytes, text, an image, audio only."""


class UnsupportedCodec(IngestError):
    pass


class CorruptMedia(IngestError):
    """Truncated, missing its index, or undecodable."""


class SourceUnreachable(IngestError):
    """A stream URL that does not answer."""


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
