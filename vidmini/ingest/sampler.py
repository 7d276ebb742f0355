"""Streaming frame sampler: the frame displayed at each sampling time, in bounded memory, from any backend.

Rule (as in `ingest.simple_decode`, spelled out in `ingest.decode_common`): time 0 is the stream's first
decoded frame; sampling times are t_k = k / fps with start <= t_k < min(end, end of the video stream); the
frame for t_k is the last one in presentation order with pts <= t_k. Each `SampledFrame` carries t_k, the
real pts and frame number of the frame returned, and its RGB picture (upright, scaled inside FFmpeg when
`size` is given). `every_k` returns every k-th frame in presentation order instead.

Modes: `exact` returns exactly that frame; `fast` may return one up to about a frame older where the
stream's timing is irregular, and seeks more eagerly (see `ingest.decode_pyav` for the strategies).
Backends: "pyav" (default; all features), "ffmpeg" (the ffmpeg CLI through a pipe, `ingest.decode_ffmpeg`),
"decord" (optional, `ingest.decode_decord`). Damage: sampling times whose frame was lost are not returned
but recorded in `gaps` as (start, end) seconds, and every damage event is logged and counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from vidmini.ingest.backends import get_backend
from vidmini.ingest.decode_common import MAX_FPS, MIN_FPS, SampledFrame, SamplerStats, SampleSpec
from vidmini.ingest.live import is_stream_url
from vidmini.ingest.probe import ProbeInfo, probe

__all__ = ["MAX_FPS", "MIN_FPS", "FrameSampler", "SampledFrame", "sample"]


@dataclass
class FrameSampler:
    """Iterate to get `SampledFrame`s; `gaps`, `decode_errors` and `strategy` fill in as decoding goes.

    Each iteration is a fresh pass over the source (and resets those statistics).
    """

    source: object
    fps: float | None = 1.0
    every_k: int | None = None
    mode: str = "exact"
    size: tuple[int, int] | None = None  # (width, height) of the output, scaled inside FFmpeg
    interpolation: str = "BILINEAR"  # "NEAREST" matches the engine's nearest resize
    stream: int | None = None
    backend: str = "pyav"
    start: float = 0.0
    end: float | None = None
    deinterlace: bool = False
    hwaccel: str | None = None  # "cuda": decode on the GPU when possible (pyav backend), else software
    stats: SamplerStats = field(default_factory=SamplerStats, init=False, repr=False)
    info: ProbeInfo | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        fps = None if self.every_k is not None else self.fps
        size = tuple(int(v) for v in self.size) if self.size is not None else None
        self._spec = SampleSpec(self.source, fps, self.every_k, self.mode, size, self.interpolation, self.stream,
                                float(self.start), None if self.end is None else float(self.end),
                                self.deinterlace, self.hwaccel)
        self._run = get_backend(self.backend)  # raises IngestError now if the backend is not installed

    @property
    def gaps(self) -> list[tuple[float, float]]:
        return self.stats.gaps

    @property
    def decode_errors(self) -> int:
        return self.stats.decode_errors

    @property
    def strategy(self) -> str:
        return self.stats.strategy

    def __iter__(self) -> Iterator[SampledFrame]:
        self.stats = SamplerStats()
        src = self.source
        if isinstance(src, str | Path) and not (isinstance(src, str) and is_stream_url(src)):
            self.info = probe(src, stream=self.stream)  # typed errors for bad inputs, and the plan's facts
        return self._run(self._spec, self.stats, self.info)


def sample(source, fps: float | None = 1.0, every_k: int | None = None, mode: str = "exact",
           size: tuple[int, int] | None = None, stream: int | None = None, backend: str = "pyav",
           start: float = 0.0, end: float | None = None, **options) -> Iterator[SampledFrame]:
    """Stream `SampledFrame`s (see the module docstring); `options`: interpolation, deinterlace, hwaccel.

    Use `FrameSampler` directly to read `gaps` after iterating.
    """
    return iter(FrameSampler(source, fps=fps, every_k=every_k, mode=mode, size=size, stream=stream,
                             backend=backend, start=start, end=end, **options))
