"""Typed ingest errors; every message is one line naming the input and the cause.

One family: every class here, `MediaError` of the in-memory reader (`ingest.simple_decode`) included, is an
`IngestError`, which is a `ValueError`, so a caller catches bad media the same way whichever decoder ran.
"""

from __future__ import annotations


class IngestError(ValueError):
    """Base: an input that cannot be ingested (expected failures: no traceback for the user)."""


class SourceNotFound(IngestError):
    """A path that does not exist."""


class SourcePermissionError(IngestError):
    """A path that exists but this process may not read."""


class NotAVideo(IngestError):
    """Zero bytes, text, an image, audio only, a directory, or no such video stream."""


class UnsupportedCodec(IngestError):
    """A video stream whose codec this FFmpeg build cannot decode."""


class CorruptMedia(IngestError):
    """Truncated, missing its index, or undecodable."""


class SourceUnreachable(IngestError):
    """A stream URL that does not answer."""


class MediaError(IngestError):
    """A file the in-memory reader (`ingest.simple_decode`: images, `ask --no-store`) cannot use."""


def one_line(e: BaseException) -> str:
    """FFmpeg messages may span lines; ours are one line."""
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
