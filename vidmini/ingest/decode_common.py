"""What every decode backend shares: the request, the sampling rule, the gap rule, image helpers.

Sampling rule (as in `ingest.simple_decode`): time 0 is the presentation time of the stream's first decoded
frame; sampling times lie on the grid t_k = k / fps, those with start <= t_k < end (the grid does not move
with `start`, so a range gives the same times as the whole video); the frame for t_k is the frame displayed
at t_k, the last one in presentation order with pts <= t_k. The video ends at its last frame's pts plus that
frame's duration. Backends turn packets into `Decoded` frames; `hold` applies the rule to them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np

from vidmini.ingest.options import MAX_FPS, MIN_FPS, MODES

log = logging.getLogger(__name__)

# Names accepted for `interpolation` -> PyAV's swscale name; NEAREST is swscale's POINT.
INTERPOLATIONS = {"NEAREST": "POINT", "POINT": "POINT", "BILINEAR": "BILINEAR", "FAST_BILINEAR": "FAST_BILINEAR",
                  "BICUBIC": "BICUBIC", "AREA": "AREA", "LANCZOS": "LANCZOS"}
# ... and the ffmpeg CLI's scale flags for the same.
SWS_FLAGS = {"POINT": "neighbor", "BILINEAR": "bilinear", "FAST_BILINEAR": "fast_bilinear", "BICUBIC": "bicubic",
             "AREA": "area", "LANCZOS": "lanczos"}


@dataclass
class SampledFrame:
    t: float  # the sampling time, seconds from the first frame (every_k: the frame's own time)
    pts: float  # presentation time of the frame returned, same origin
    index: int  # position of that frame in presentation order (0 = first frame)
    image: np.ndarray  # (H, W, 3) uint8 RGB, upright (prefetched: already squared to the model's frame side)
    thumbnail: bytes | None = None  # its JPEG thumbnail, when made where it was decoded


@dataclass(frozen=True)
class SampleSpec:
    """A validated sampling request; backends read it, never change it."""

    source: object
    fps: float | None = 1.0
    every_k: int | None = None
    mode: str = "exact"
    size: tuple[int, int] | None = None  # (width, height) of the output, upright
    interpolation: str = "BILINEAR"
    stream: int | None = None
    start: float = 0.0
    end: float | None = None
    deinterlace: bool = False
    hwaccel: str | None = None

    def __post_init__(self) -> None:
        if self.every_k is None:
            if self.fps is None or not math.isfinite(self.fps) or not MIN_FPS <= self.fps <= MAX_FPS:
                raise ValueError(f"fps must be between {MIN_FPS} and {MAX_FPS}, got {self.fps!r}")
        elif isinstance(self.every_k, bool) or not isinstance(self.every_k, int) or self.every_k < 1:
            raise ValueError(f"every_k must be an int >= 1, got {self.every_k!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            raise ValueError(f"size must be (width, height) in pixels, got {self.size!r}")
        if self.interpolation.upper() not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not (math.isfinite(self.start) and self.start >= 0):
            raise ValueError(f"start must be >= 0 seconds, got {self.start!r}")
        if self.end is not None and not self.end > self.start:
            raise ValueError(f"end must be > start, got end={self.end!r}, start={self.start!r}")

    @property
    def step(self) -> Fraction:
        """Exact rational sampling interval, so fps=0.3 gives t_k = 10k/3 exactly."""
        exact = Fraction(float(self.fps or 1.0))
        return 1 / (exact.limit_denominator(1_000_000) or exact)

    @property
    def sws_interpolation(self) -> str:
        return INTERPOLATIONS[self.interpolation.upper()]

    def first_k(self) -> int:
        return math.ceil(Fraction(self.start) / self.step)

    def end_k(self) -> int | None:
        """One past the last k with t_k < end (None: no end)."""
        return None if self.end is None else math.ceil(Fraction(self.end) / self.step)


@dataclass
class SamplerStats:
    """What happened while decoding: the caller reads these after (or during) iteration."""

    gaps: list[tuple[float, float]] = field(default_factory=list)  # sampling times with no valid frame
    decode_errors: int = 0  # damaged packets, decode failures, dropped concealment frames, read errors
    frames_decoded: int = 0
    strategy: str = ""
    index_exact: bool = True  # False after a seek in a container that does not index every frame

    def error(self, name: str, what: str) -> None:
        """Count and log a damage event: never silent."""
        self.decode_errors += 1
        log.warning("%s: %s", name, what)


@dataclass
class Decoded:
    """A decoded frame: its time from the origin, presentation index, and its picture on demand."""

    t: Fraction
    index: int
    duration: Fraction | None
    image: Callable[[], np.ndarray]
    damaged: bool = False  # data was lost between the previous Decoded and this one
    after_seek: bool = False


def hold(frames: Iterator[Decoded], spec: SampleSpec, stats: SamplerStats, nominal: Fraction,
         expected_end: Callable[[], Fraction | None] | None = None) -> Iterator[tuple[int, Decoded]]:
    """(k, frame displayed at t_k) for each sampling time; sampling times lost to damage go to `stats.gaps`.

    After damage the last good frame stays valid for its own duration; later sampling times until the next
    good frame are lost. A video stream that ends well before its header says records a trailing gap.
    """
    step, k, end_k = spec.step, spec.first_k(), spec.end_k()
    gap_after = max(3 * nominal, step)
    held: Decoded | None = None
    interval: Fraction | None = None

    def due(t: Fraction) -> bool:
        return k * step < t and (end_k is None or k < end_k)

    for d in frames:
        if held is not None:
            if d.t > held.t:
                interval = d.t - held.t
            if d.damaged and d.t - held.t > gap_after:
                valid_until = held.t + (held.duration or nominal)
                while due(min(valid_until, d.t)):
                    yield k, held
                    k += 1
                lost = k
                while due(d.t):
                    k += 1
                if k > lost:
                    stats.gaps.append((float(lost * step), float(d.t)))
            else:
                while due(d.t):
                    yield k, held
                    k += 1
        held = d
        if end_k is not None and k >= end_k:
            return
    if held is None:
        return
    end = held.t + (held.duration or interval or nominal)
    while due(end):
        yield k, held
        k += 1
    expected_end = expected_end() if expected_end is not None else None
    if expected_end is not None and expected_end - end > gap_after and due(expected_end):
        lost = k
        while due(expected_end):
            k += 1
        stats.gaps.append((float(lost * step), float(expected_end)))
        stats.error(str(spec.source), f"video stops at {float(end):.3f} s but its header says "
                                      f"{float(expected_end):.3f} s: truncated?")


def every_k(frames: Iterator[Decoded], spec: SampleSpec) -> Iterator[SampledFrame]:
    """Every k-th frame in presentation order (by frame index), within [start, end); t is the frame's time."""
    for d in frames:
        if spec.end is not None and d.t >= spec.end:
            return
        if d.index % spec.every_k == 0 and d.t >= spec.start:
            yield SampledFrame(float(d.t), float(d.t), d.index, d.image())


def materialize(events: Iterator[tuple[int, Decoded]], step: Fraction) -> Iterator[SampledFrame]:
    """SampledFrames from hold(): each picture converted once; repeats are independent copies."""
    last: Decoded | None = None
    image: np.ndarray | None = None
    for k, d in events:
        if d is not last:
            last, image = d, d.image()
            out = image
        else:
            out = image.copy()
        yield SampledFrame(float(k * step), float(d.t), d.index, out)


def rotate(rgb: np.ndarray, rotation: float) -> np.ndarray:
    """Apply the display-matrix rotation (counter-clockwise degrees), as ffmpeg's autorotate does."""
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def deinterlace(rgb: np.ndarray) -> np.ndarray:
    """Keep the top field and interpolate the other: no combing, half the vertical detail; one frame only."""
    out = rgb.copy()
    h = rgb.shape[0]
    if h >= 3:
        above = rgb[0 : h - 2 : 2].astype(np.uint16)
        below = rgb[2:h:2].astype(np.uint16)
        out[1 : h - 1 : 2] = ((above + below + 1) // 2).astype(np.uint8)
    return out


def display_size(size: tuple[int, int], rotation: float) -> tuple[int, int]:
    """The (width, height) to scale to before rotating, so the upright result has `size`."""
    w, h = size
    return (h, w) if round(rotation / 90) % 2 else (w, h)
