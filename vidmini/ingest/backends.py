"""Decode backends behind one call: `get_backend(name)(spec, stats, info) -> Iterator[SampledFrame]`.

Each backend applies the same sampling rule and reports the real pts of what it returns; they differ in what
decodes ("pyav": PyAV in process, every feature; "ffmpeg": the ffmpeg CLI through a pipe; "decord": decord's
VideoReader, optional). Imports are lazy so a missing optional package fails only when it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from vidmini.ingest.decode_common import SampledFrame, SamplerStats, SampleSpec
from vidmini.ingest.errors import IngestError
from vidmini.ingest.probe import ProbeInfo

Backend = Callable[[SampleSpec, SamplerStats, ProbeInfo | None], Iterator[SampledFrame]]
BACKENDS = ("pyav", "ffmpeg", "decord")


def get_backend(name: str) -> Backend:
    """The backend's sampling function; IngestError with the fix when it cannot be used here."""
    if name == "pyav":
        from vidmini.ingest.decode_pyav import sample_pyav

        return sample_pyav
    if name == "ffmpeg":
        from vidmini.ingest.decode_ffmpeg import ffmpeg_exe, sample_ffmpeg

        ffmpeg_exe()  # fail now, not at the first frame
        return sample_ffmpeg
    if name == "decord":
        try:
            import decord  # noqa: F401
        except ImportError:
            raise IngestError("decode backend 'decord' is not installed: pip install vidmini[decord]") from None
        from vidmini.ingest.decode_decord import sample_decord

        return sample_decord
    raise IngestError(f"unknown decode backend {name!r} (choose one of {', '.join(BACKENDS)})")
