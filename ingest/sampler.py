"""Streaming frame sampler: the frame displayed at each sampling time, in bounded memory.

Rule (as in `ingest.simple_decode`): with the first decoded frame's presentation time as the origin, sampling
times are t_k = k / fps while t_k < end of the video stream; the frame for t_k is the last frame, in
presentation order, whose pts <= t_k. Every `SampledFrame` reports t_k and the real pts of the frame returned.

Modes: `exact` decodes every frame (frame-exact). `fast` lets the decoder skip non-reference frames
(`skip_frame = NONREF`), so the frame returned may be up to about one frame older than the displayed one; its
real pts is reported. `every_k` returns every k-th frame instead of sampling by time. `size` scales inside
FFmpeg's reformat so no full-size RGB frame is built. Packets that fail to decode are skipped (the decoder
resyncs at the next keyframe); sampling times whose frame was lost that way are not returned but recorded in
`gaps`, as (start, end) seconds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import numpy as np

from ingest.errors import CorruptMedia, IngestError, one_line
from ingest.probe import open_container, pick_stream

log = logging.getLogger(__name__)
MIN_FPS, MAX_FPS = 0.05, 30.0


@dataclass
class SampledFrame:
    t: float  # the sampling time, seconds from the first frame
    pts: float  # the presentation time of the frame returned, same origin
    index: int  # position of that frame among the decoded frames
    image: np.ndarray  # (H, W, 3) uint8 RGB, upright


def _rotate(rgb: np.ndarray, rotation: float) -> np.ndarray:
    k = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


@dataclass
class FrameSampler:
    """Iterate to get `SampledFrame`s; `gaps` and `decode_errors` fill in as decoding goes."""

    source: object
    fps: float | None = 1.0
    every_k: int | None = None
    mode: str = "exact"
    size: tuple[int, int] | None = None  # (width, height) of the output, scaled inside FFmpeg
    interpolation: str = "BILINEAR"
    stream: int | None = None
    backend: str = "pyav"
    gaps: list[tuple[float, float]] = field(default_factory=list)
    decode_errors: int = 0

    def __post_init__(self) -> None:
        if self.every_k is None:
            if self.fps is None or not math.isfinite(self.fps) or not MIN_FPS <= self.fps <= MAX_FPS:
                raise ValueError(f"fps must be between {MIN_FPS} and {MAX_FPS}, got {self.fps!r}")
        elif self.every_k < 1:
            raise ValueError("every_k must be >= 1")
        if self.mode not in ("exact", "fast"):
            raise ValueError("mode must be 'exact' or 'fast'")
        if self.backend != "pyav":
            raise IngestError(f"decode backend {self.backend!r} is not available in this build (use pyav)")

    @property
    def name(self) -> str:
        return str(getattr(self.source, "name", self.source))

    def _rgb(self, frame: av.VideoFrame) -> np.ndarray:
        rotation = frame.rotation or 0
        if self.size is not None:
            w, h = self.size
            if round(rotation / 90) % 2:
                w, h = h, w
            rgb = frame.to_ndarray(width=w, height=h, format="rgb24", interpolation=self.interpolation)
        else:
            rgb = frame.to_ndarray(format="rgb24")
        return _rotate(rgb, rotation) if rotation else rgb

    def _frames(self, container, vs) -> Iterator[tuple[Fraction, av.VideoFrame]]:
        """Decoded frames with their time from the origin; bad packets are skipped and counted."""
        tb = vs.time_base or Fraction(1, 90000)
        rate = vs.average_rate or vs.guessed_rate
        step = 1 / Fraction(rate) if rate else Fraction(1, 25)
        origin = last_t = None
        resync = False  # after damage, frames until the next keyframe are concealment guesses: dropped
        try:
            for packet in container.demux(vs):
                if packet.is_corrupt:
                    self.decode_errors += 1
                    resync = True
                try:
                    frames = packet.decode()
                except av.FFmpegError as e:
                    self.decode_errors += 1
                    resync = True
                    log.warning("%s: skipped a damaged packet: %s", self.name, one_line(e))
                    continue
                for frame in frames:
                    if resync and origin is not None:
                        if not frame.key_frame:
                            continue
                        resync = False
                    ts = frame.pts if frame.pts is not None else frame.dts
                    if ts is None:
                        t = Fraction(0) if last_t is None else last_t + step
                    else:
                        if origin is None:
                            origin = Fraction(ts) * tb
                        t = Fraction(ts) * tb - origin
                    if last_t is not None and t <= last_t:
                        continue  # out-of-order or repeated after damage: keep presentation order
                    last_t = t
                    yield t, frame
        except av.FFmpegError as e:  # the demuxer gave up: a truncated or damaged tail
            self.decode_errors += 1
            log.warning("%s: reading stopped: %s", self.name, one_line(e))

    def __iter__(self) -> Iterator[SampledFrame]:
        container = open_container(self.source)
        with container:
            vs = pick_stream(container, self.stream, self.name)
            vs.thread_type = "AUTO"
            if self.mode == "fast":
                vs.codec_context.skip_frame = "NONREF"
            discard_all = getattr(getattr(av.stream, "Discard", None), "all", None)
            for other in container.streams:
                if other.index != vs.index and discard_all is not None:
                    other.discard = discard_all
            tb = vs.time_base or Fraction(1, 90000)
            rate = vs.average_rate or vs.guessed_rate
            nominal = 1 / Fraction(rate) if rate else Fraction(1, 25)
            yield from (self._every_k(container, vs) if self.every_k else self._by_time(container, vs, tb, nominal))

    def _every_k(self, container, vs) -> Iterator[SampledFrame]:
        got = False
        for i, (t, frame) in enumerate(self._frames(container, vs)):
            if i % self.every_k == 0:
                got = True
                yield SampledFrame(float(t), float(t), i, self._rgb(frame))
        if not got:
            raise CorruptMedia(f"{self.name}: no decodable video frames")

    def _by_time(self, container, vs, tb: Fraction, nominal: Fraction) -> Iterator[SampledFrame]:
        exact = Fraction(float(self.fps))
        step = 1 / (exact.limit_denominator(1_000_000) or exact)
        # a jump this long between decoded frames, after decode errors, is a hole in the video
        gap_after = max(3 * nominal, step)
        k = 0
        held = None  # (t, index, frame, rgb)
        interval = None
        errors_seen = 0
        for index, (t, frame) in enumerate(self._frames(container, vs)):
            if held is not None:
                if t > held[0]:
                    interval = t - held[0]
                lost = self.decode_errors > errors_seen and t - held[0] > gap_after
                errors_seen = self.decode_errors
                if lost:
                    # the held frame stays valid for one nominal frame; later times up to t were lost
                    valid_until = held[0] + nominal
                    while k * step < valid_until:
                        yield self._emit(k, step, held)
                        k += 1
                    first_lost = k
                    while k * step < t:
                        k += 1
                    if k > first_lost:
                        self.gaps.append((float(first_lost * step), float(t)))
                else:
                    while k * step < t:
                        yield self._emit(k, step, held)
                        k += 1
            held = [t, index, frame, None]
        if held is None:
            raise CorruptMedia(f"{self.name}: no decodable video frames")
        dur = getattr(held[2], "duration", None)
        last = Fraction(dur) * tb if dur else (interval or nominal)
        end = held[0] + last
        while k * step < end:
            yield self._emit(k, step, held)
            k += 1

    def _emit(self, k: int, step: Fraction, held: list) -> SampledFrame:
        if held[3] is None:
            held[3] = self._rgb(held[2])
            image = held[3]
        else:
            image = held[3].copy()  # one picture held across several samples: independent arrays
        return SampledFrame(float(k * step), float(held[0]), held[1], image)
