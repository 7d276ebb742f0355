"""A video's audio track as 16 kHz mono float32 windows on the video's clock.

The clock is the frames' (`ingest.decode_common`): time 0 is the presentation time of the video stream's first
decoded frame (`ProbeInfo.first_pts`), so a container start offset, an MPEG-TS's 1.4 s, a video that starts
after its audio or an audio track that starts late all map the same way: a sample's time is its container time
minus the first frame's. Samples before 0 (audio that starts before the first frame) are dropped; an audio
track that starts 5 s after the first frame has its first sample at 5.0. Rotation and variable frame rate do not
touch the clock: it is read from timestamps, never from frame counts.

Decoding is PyAV's, resampled and downmixed by its `AudioResampler`. Samples are placed by their timestamps:
a frame that lands within `RESYNC_S` of where the previous one ended is appended (timestamp jitter is ignored);
a jump forward (lost packets, a hole in the track) is filled with silence when shorter than a window and
starts a new run of windows when longer; a jump back drops the overlap. Packets that do not decode are
skipped and counted; when the stream ends, `audio_windows` raises `AudioError` naming them and the spans lost
(after yielding every window that did decode), and a stream that decodes nothing raises it with nothing
yielded. Files only: stream URLs are not read here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from vidmini.ingest.errors import IngestError, one_line
from vidmini.ingest.probe import choose_stream, codec_name, open_container, probe, source_name
from vidmini.speech.types import SAMPLE_RATE, AudioWindow

log = logging.getLogger(__name__)

RESYNC_S = 0.1  # a frame further than this from where the previous one ended is placed by its timestamp
SEEK_MARGIN_S = 1.0  # a resumed read seeks this far before `start` (decoder warm-up: Opus pre-roll, AAC overlap)


class AudioError(Exception):
    """An audio stream that did not decode, or not all of it.

    `gaps`: (start, end) seconds on the video's clock lost to it (end None: to the end of the track);
    `decoded_until`: the end of the last sample decoded (None: nothing decoded)."""

    def __init__(self, message: str, gaps: list[tuple[float, float | None]] | None = None,
                 decoded_until: float | None = None):
        super().__init__(message)
        self.gaps = list(gaps or [])
        self.decoded_until = decoded_until


@dataclass(frozen=True)
class AudioInfo:
    """An audio stream, as the container header describes it; times in seconds on the video's clock."""

    stream_index: int
    codec: str  # FFmpeg's name, as ffprobe prints it ("aac", "opus", "mp2")
    sample_rate: int  # of the stream (windows are always SAMPLE_RATE)
    channels: int
    start_s: float  # where its first sample lies (negative: before the first video frame; those are dropped)
    duration_s: float | None  # of the stream, when the header says
    clock_origin_s: float  # the container time that is 0 on the video's clock

    @property
    def end_s(self) -> float | None:
        return None if self.duration_s is None else self.start_s + self.duration_s


def clock_origin(path) -> float | None:
    """Container seconds that are 0 on the video's clock: the first decoded video frame's pts, as the frame
    sampler takes it (`ingest.probe`). None for a file without a decodable video stream."""
    try:
        info = probe(path)
    except IngestError:
        return None
    if info.first_pts is None:
        return None
    return float(info.first_pts * Fraction(info.time_base))


def _pick_audio(container, stream: int | None, name: str):
    """The chosen audio stream (as `ingest.probe.choose_stream` picks), or None when the file has none."""
    try:
        return choose_stream(container, "audio", stream)
    except LookupError as e:
        raise AudioError(f"{name}: {e}") from None


def _stream_start(a) -> float | None:
    return float(a.start_time * a.time_base) if a.start_time is not None and a.time_base else None


def _tag_duration(metadata: dict) -> float | None:
    """Matroska's per-stream DURATION tag ("00:00:26.012000000"), which FFmpeg writes and reads back."""
    tag = next((v for k, v in (metadata or {}).items() if k.upper() == "DURATION"), None)
    try:
        h, m, sec = str(tag).split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except (TypeError, ValueError):
        return None


def _check_codec(a, name: str) -> None:
    cc = a.codec_context
    if cc is None or cc.codec is None or cc.name in ("", "none"):
        raise AudioError(f"{name}: audio stream {a.index} has a codec this FFmpeg cannot decode")


def probe_audio(path: str | Path, stream: int | None = None, origin: float | None = None) -> AudioInfo | None:
    """The audio stream FFmpeg picks (or `stream`, by container index); None when the file has none.

    Reads the header only. `origin`: the clock origin when the caller knows it (`clock_origin`), else probed.
    Missing or unreadable files raise the typed errors of `ingest.errors`."""
    name = source_name(path)
    with open_container(path) as c:
        a = _pick_audio(c, stream, name)
        if a is None:
            return None
        cc = a.codec_context
        if origin is None:
            origin = clock_origin(path)
        start = _stream_start(a)
        if origin is None:
            origin = start or 0.0
        start = origin if start is None else start
        duration = _tag_duration(a.metadata)
        if a.duration and a.time_base:
            duration = float(a.duration * a.time_base)
        elif duration is None and c.duration:  # the container's end: the longest stream's
            end = ((c.start_time or 0) + c.duration) / 1e6
            duration = max(0.0, end - start)
        channels = int(getattr(cc, "channels", 0) or getattr(getattr(cc, "layout", None), "nb_channels", 0) or 0)
        return AudioInfo(stream_index=a.index, codec=codec_name(a), sample_rate=int(cc.sample_rate or 0),
                         channels=channels, start_s=start - origin, duration_s=duration, clock_origin_s=origin)


class _Placer:
    """Lays 16 kHz samples on the clock's sample grid (index = time * SAMPLE_RATE) and cuts windows.

    Windows start at the first sample kept (at or after `first`) and follow each other without gaps; a hole
    longer than a window ends the current window and the next begins where samples resume."""

    def __init__(self, first: int, window_len: int):
        self.first = first
        self.window_len = window_len
        self.cursor: int | None = None  # grid index of the next sample
        self.drop = 0  # samples still to discard (a timestamp that went back)
        self.win_start: int | None = None
        self.parts: list[np.ndarray] = []
        self.filled = 0

    def anchor(self, index: int) -> Iterator[AudioWindow]:
        """The next samples begin at grid `index`."""
        if self.cursor is None:
            self.cursor = index
            return
        self.drop = 0
        if index > self.cursor:
            hole = index - self.cursor
            if hole <= self.window_len:
                while hole > 0:
                    n = min(hole, self.window_len)
                    yield from self.put(np.zeros(n, np.float32))
                    hole -= n
            else:
                yield from self.finish()
                self.cursor = index
        elif index < self.cursor:
            self.drop = self.cursor - index

    def put(self, samples: np.ndarray) -> Iterator[AudioWindow]:
        if self.drop:
            k = min(self.drop, len(samples))
            samples, self.drop = samples[k:], self.drop - k
        if self.cursor < self.first:
            k = min(self.first - self.cursor, len(samples))
            samples, self.cursor = samples[k:], self.cursor + k
        while len(samples):
            if self.win_start is None:
                self.win_start = self.cursor
            take = samples[: self.window_len - self.filled]
            samples = samples[len(take):]
            self.parts.append(take)
            self.filled += len(take)
            self.cursor += len(take)
            if self.filled == self.window_len:
                yield from self.finish()

    def finish(self) -> Iterator[AudioWindow]:
        if self.filled:
            samples = np.concatenate(self.parts).astype(np.float32, copy=False)
            yield AudioWindow(self.win_start / SAMPLE_RATE, samples)
        self.win_start, self.parts, self.filled = None, [], 0


class _Decoder:
    """One pass over an audio stream: decode, resample, place; counts what did not decode."""

    def __init__(self, container, a, origin: float, placer: _Placer, name: str):
        self.c, self.a, self.origin, self.placer, self.name = container, a, origin, placer, name
        self.tb = a.time_base
        self.resampler = None
        self.anchor_t: float | None = None  # clock time of the samples fed since the last anchor
        self.fed_s = 0.0
        self.bad_packets = 0
        self.first_error = ""
        self.gaps: list[tuple[float, float | None]] = []
        self.bad_since: float | None = None  # clock time of the first packet of a run that did not decode
        self.end_t: float | None = None  # end of the last sample decoded

    def _time(self, pts) -> float | None:
        return None if pts is None else float(pts * self.tb) - self.origin

    def _new_resampler(self):
        self.resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)

    def _emit(self, frames) -> Iterator[AudioWindow]:
        for out in frames:
            if out.samples:
                yield from self.placer.put(out.to_ndarray().reshape(-1))

    def _flush(self) -> Iterator[AudioWindow]:
        if self.resampler is not None:
            yield from self._emit(self.resampler.resample(None))
            self.resampler = None

    def _lost(self, t: float | None, e: Exception) -> None:
        self.bad_packets += 1
        if not self.first_error:
            self.first_error = one_line(e)
        if self.bad_since is None:
            self.bad_since = t if t is not None else (self.end_t or 0.0)

    def frame(self, f) -> Iterator[AudioWindow]:
        if not f.samples:
            return
        t = self._time(f.pts)
        if self.bad_since is not None:
            self.gaps.append((max(0.0, self.bad_since), max(0.0, t if t is not None else self.bad_since)))
            self.bad_since = None
        expected = None if self.anchor_t is None else self.anchor_t + self.fed_s
        if t is None:
            t = expected if expected is not None else 0.0
        if expected is None or abs(t - expected) > RESYNC_S:
            yield from self._flush()
            yield from self.placer.anchor(round(t * SAMPLE_RATE))
            self.anchor_t, self.fed_s = t, 0.0
        self.fed_s += f.samples / f.sample_rate
        self.end_t = t + f.samples / f.sample_rate
        if self.resampler is None:
            self._new_resampler()
        try:
            frames = self.resampler.resample(f)
        except ValueError:  # the stream changed layout or rate: a fresh resampler for the new format
            yield from self._flush()
            self._new_resampler()
            frames = self.resampler.resample(f)
        yield from self._emit(frames)

    def run(self) -> Iterator[AudioWindow]:
        demux = self.c.demux(self.a)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except av.FFmpegError as e:  # the demuxer gave up: a truncated or damaged tail
                self._lost(self.end_t, e)
                self.gaps.append((max(0.0, self.bad_since), None))
                self.bad_since = None
                break
            if packet.size == 0 and packet.pts is None and packet.dts is None:
                continue  # end of stream: drained below
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                self._lost(self._time(packet.pts), e)
                continue
            for f in frames:
                yield from self.frame(f)
        try:
            for f in self.a.codec_context.decode(None):
                yield from self.frame(f)
        except av.FFmpegError as e:
            self._lost(self.end_t, e)
        if self.bad_since is not None:
            self.gaps.append((max(0.0, self.bad_since), None))
            self.bad_since = None
        yield from self._flush()
        yield from self.placer.finish()

    def error(self) -> AudioError | None:
        if not self.bad_packets:
            return None
        kind = f"audio stream {self.a.index} ({self.a.codec_context.name})"
        spans = ", ".join(f"{s:.2f}-{'end' if e is None else f'{e:.2f}'}s" for s, e in self.gaps)
        if self.end_t is None:
            msg = f"{self.name}: {kind} does not decode ({self.bad_packets} packets failed: {self.first_error})"
        else:
            msg = (f"{self.name}: {kind}: {self.bad_packets} packets did not decode, audio lost at {spans} "
                   f"({self.first_error})")
        return AudioError(msg, self.gaps, self.end_t)


def audio_windows(path: str | Path, start: float = 0.0, window_s: float = 30.0, *, stream: int | None = None,
                  origin: float | None = None) -> Iterator[AudioWindow]:
    """Consecutive windows of `window_s` seconds (the last one shorter) of the audio track, 16 kHz mono
    float32, times on the video's clock, from `start` on (a resumed transcription seeks there).

    The first window starts at `start` or at the track's first sample, whichever is later. Nothing is yielded
    for a file without audio. `stream`: an audio stream's container index (default: FFmpeg's best);
    `origin`: the clock origin (`clock_origin`) when the caller has it. Raises `AudioError` at the end when
    packets did not decode (see the module docstring), and at once for a codec FFmpeg lacks."""
    if not window_s > 0:
        raise ValueError(f"window_s must be positive, got {window_s!r}")
    name = source_name(path)
    if isinstance(path, str) and "://" in path:
        raise AudioError(f"{name}: audio is read from files only, not stream URLs")
    if origin is None:
        origin = clock_origin(path)
    with open_container(path) as c:
        a = _pick_audio(c, stream, name)
        if a is None:
            return
        _check_codec(a, name)
        if origin is None:
            origin = _stream_start(a) or 0.0
        start = max(0.0, float(start))
        track_start = (_stream_start(a) or origin) - origin
        if start > track_start + SEEK_MARGIN_S:
            try:
                c.seek(int((start - SEEK_MARGIN_S + origin) / a.time_base), stream=a, backward=True)
            except av.FFmpegError as e:  # not seekable: decode from the start and drop what comes before
                log.debug("%s: audio seek to %.2f s failed (%s), decoding from the start", name, start, one_line(e))
                c.seek(0)
        placer = _Placer(round(start * SAMPLE_RATE), max(1, round(window_s * SAMPLE_RATE)))
        decoder = _Decoder(c, a, origin, placer, name)
        yield from decoder.run()
        error = decoder.error()
    if error is not None:
        raise error
