"""The ffmpeg CLI backend: ffmpeg decodes, picks and converts; Python reads rgb24 frames from a pipe.

How the frame for each sampling time is picked, and how we learn its real pts (one ffmpeg process, one pass):
  setpts=PTS-<first frame's pts>  -> time 0 is the first decoded frame, in the stream's own time base
  showinfo                        -> logs every decoded frame's pts (and errors go to the same log)
  fps=fps=F:round=up              -> output tick k carries the last frame with pts <= k/F: with round=up a
                                     frame's pts maps to tick ceil(pts*F), and fps keeps the latest frame at or
                                     before each tick, which is exactly "the frame displayed at t_k"
  showinfo                        -> logs each output tick, right before its picture goes down the pipe
  [scale=W:H:flags=...], format=rgb24, -fps_mode passthrough (no frames added or dropped at the output)
The log is read in order on stderr: when the line of tick k arrives, the lines of every frame up to the one
after t_k have already arrived, so the same `hold` rule as the PyAV backend names the frame (pts, number,
gaps) while ffmpeg supplies its pixels. every_k uses `select=not(mod(n,K))` in place of fps. A frame's
number is showinfo's n (frames decoded so far); after `-ss` (start > 0) it is estimated from the rate.
Damage: ffmpeg conceals broken frames rather than dropping them, so gaps only show where timestamps jump
after logged errors; every error line is counted and logged.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from vidmini.ingest.decode_common import SWS_FLAGS, SampledFrame, SamplerStats, SampleSpec
from vidmini.ingest.errors import CorruptMedia, IngestError
from vidmini.ingest.probe import ProbeInfo, source_name

log = logging.getLogger(__name__)

_LINE = re.compile(r"^\[Parsed_(\w+?)_(\d+) @ [^\]]*\] \[info\] n:\s*(\d+) pts:\s*(-?\d+).* s:(\d+)x(\d+)")
_TB = re.compile(r"^\[Parsed_showinfo_(\d+) @ [^\]]*\] \[info\] config in time_base: (\d+)/(\d+)")
_ERROR = re.compile(r"\[(error|fatal|panic)\]")


def ffmpeg_exe() -> str:
    """The ffmpeg binary: from PATH, else the one imageio-ffmpeg ships."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        raise IngestError("decode backend 'ffmpeg' needs the ffmpeg CLI: install ffmpeg, or pip install "
                          "imageio-ffmpeg") from None


def build_command(spec: SampleSpec, info: ProbeInfo | None, exe: str) -> list[str]:
    """The ffmpeg command line (built with ffmpeg-python); see the module docstring for the filters."""
    import ffmpeg

    source = spec.source
    in_args: dict = {"copyts": None}
    seek = info is not None and info.seekable and spec.start > 0
    if seek:
        # land on a keyframe before the first sampling time and keep every frame from there (no trim)
        margin = 2 * (info.keyframe_interval_s or 1.0)
        in_args.update(ss=f"{max(0.0, info.start_time_s + spec.start - margin):.6f}", noaccurate_seek=None)
    stream = ffmpeg.input(str(source), **in_args)[str(info.stream_index) if info else "v:0"]
    origin = "STARTPTS" if info is None or info.first_pts is None else str(info.first_pts)
    stream = stream.filter("setpts", f"PTS-{origin}")
    if spec.deinterlace:
        stream = stream.filter("yadif", mode="send_frame", deint="interlaced")
    stream = stream.filter("showinfo", checksum=0)
    if spec.every_k:
        stream = stream.filter("select", f"not(mod(n,{spec.every_k}))")
    else:
        rate = 1 / spec.step
        stream = stream.filter("fps", fps=f"{rate.numerator}/{rate.denominator}", round="up")
    stream = stream.filter("showinfo", checksum=0)
    if spec.size is not None:
        stream = stream.filter("scale", spec.size[0], spec.size[1], flags=SWS_FLAGS[spec.sws_interpolation])
    stream = stream.filter("format", "rgb24")
    cmd = stream.output("pipe:", format="rawvideo", fps_mode="passthrough").compile(cmd=exe)
    return [cmd[0], "-hide_banner", "-nostdin", "-nostats", "-loglevel", "level+info", *cmd[1:]]


@dataclass
class _Frame:
    t: Fraction  # from the origin
    index: int
    damaged: bool  # ffmpeg logged errors since the previous frame


class _Run:
    """One ffmpeg process, read strictly in the order it writes: a picture is read as soon as its log line is,
    so ffmpeg never waits on a full pipe while we wait on its log (no deadlock, no picture buffered)."""

    def __init__(self, spec: SampleSpec, stats: SamplerStats, info: ProbeInfo | None) -> None:
        self.spec, self.stats, self.name = spec, stats, source_name(spec.source)
        self.proc = subprocess.Popen(build_command(spec, info, ffmpeg_exe()), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self.tb: dict[int, Fraction] = {}
        self.pre_filter: int | None = None  # the showinfo instance that logs decoded frames
        self.errors = 0
        self.outputs = 0

    def events(self) -> Iterator[tuple[str, int, int, object]]:
        """("frame", n, pts, errors before it) for each decoded frame, ("out", n, pts, picture) for each output."""
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            if m := _LINE.match(line):
                if m.group(1) != "showinfo":
                    continue
                idx, n, pts = int(m.group(2)), int(m.group(3)), int(m.group(4))
                if self.pre_filter is None:
                    self.pre_filter = idx
                if idx == self.pre_filter:
                    yield "frame", n, pts, self.errors
                    self.errors = 0
                else:  # the output picture's size: the requested one, else as logged (after autorotation)
                    w, h = self.spec.size or (int(m.group(5)), int(m.group(6)))
                    picture = self._picture(w, h)
                    if picture is None:
                        return
                    yield "out", n, pts, picture
            elif m := _TB.match(line):
                self.tb.setdefault(int(m.group(1)), Fraction(int(m.group(2)), int(m.group(3))))
            elif _ERROR.search(line):
                self.errors += 1
                self.stats.error(self.name, "ffmpeg: " + line.split("] ", 1)[-1])

    def _picture(self, w: int, h: int) -> np.ndarray | None:
        size = w * h * 3
        buf = bytearray(size)  # writable: the caller owns the array, no copy needed
        view, got = memoryview(buf), 0
        while got < size:
            n = self.proc.stdout.readinto(view[got:])
            if not n:
                return None
            got += n
        self.outputs += 1
        return np.frombuffer(buf, np.uint8).reshape(h, w, 3)

    def frame_tb(self) -> Fraction:
        return self.tb.get(self.pre_filter or 0, Fraction(1, 90000))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


def _by_time(run: _Run, spec: SampleSpec, stats: SamplerStats, rate: Fraction, index_exact: bool,
             expected_end: Fraction | None) -> Iterator[SampledFrame]:
    """Name the frame behind each output tick with the `hold` rule (and its gap rule) over the logged frames."""
    step, k0, end_k = spec.step, spec.first_k(), spec.end_k()
    nominal = 1 / rate
    gap_after = max(3 * nominal, step)
    frames: deque[_Frame] = deque()  # from the frame displayed at the last tick on
    interval = None
    for kind, n, pts, payload in run.events():
        if kind == "frame":
            t = Fraction(pts) * run.frame_tb()
            if frames and t <= frames[-1].t:
                continue
            if frames:
                interval = t - frames[-1].t
            frames.append(_Frame(t, n if index_exact else round(t * rate), payload > 0))
            continue
        k, t_k = pts, pts * step  # the fps filter's output time base is one sampling interval
        while len(frames) > 1 and frames[1].t <= t_k:
            frames.popleft()
        if end_k is not None and k >= end_k:
            return
        if not frames or k < k0 or frames[0].t > t_k:
            continue
        held, nxt = frames[0], frames[1] if len(frames) > 1 else None
        if nxt is None and t_k >= held.t + (interval or nominal):
            continue  # ffmpeg's end rule gave one tick more than ours
        if nxt is not None and nxt.damaged and nxt.t - held.t > gap_after and t_k >= held.t + nominal:
            if stats.gaps and stats.gaps[-1][1] == float(nxt.t):
                continue
            stats.gaps.append((float(t_k), float(nxt.t)))
            continue
        yield SampledFrame(float(t_k), float(held.t), held.index, payload)
    if frames and expected_end is not None:
        end = frames[-1].t + (interval or nominal)
        if expected_end - end > gap_after:
            first = max(k0, math.ceil(end / step))
            if first * step < expected_end and (end_k is None or first < end_k):
                stats.gaps.append((float(first * step), float(expected_end)))
                stats.error(run.name, f"video stops at {float(end):.3f} s but its header says "
                                      f"{float(expected_end):.3f} s: truncated?")


def _every_k(run: _Run, spec: SampleSpec, rate: Fraction, index_exact: bool) -> Iterator[SampledFrame]:
    index: dict[int, int] = {}  # pts -> frame number, for frames selected but not yet output
    for kind, n, pts, payload in run.events():
        t = Fraction(pts) * run.frame_tb()
        if kind == "frame":
            number = n if index_exact else round(t * rate)
            if number % spec.every_k == 0:
                index[pts] = number
            continue
        if spec.end is not None and t >= spec.end:
            return
        number = index.pop(pts, round(t * rate))
        if t >= spec.start:
            yield SampledFrame(float(t), float(t), number, payload)


def sample_ffmpeg(spec: SampleSpec, stats: SamplerStats, info: ProbeInfo | None) -> Iterator[SampledFrame]:
    """The ffmpeg CLI backend: same rule and fields as the PyAV one (rotation by ffmpeg's autorotate)."""
    if not isinstance(spec.source, str | Path):
        raise IngestError(f"{source_name(spec.source)}: the ffmpeg backend reads paths and URLs, not file objects")
    if spec.hwaccel:
        log.warning("%s: hwaccel is only supported by the pyav backend; decoding in software", spec.source)
    rate = Fraction(info.avg_fps).limit_denominator(100_000) if info and info.avg_fps else Fraction(25)
    index_exact = not (info is not None and info.seekable and spec.start > 0)
    stats.index_exact = index_exact
    stats.strategy = "ffmpeg CLI: " + ("select every k-th frame" if spec.every_k else "fps filter, round=up")
    expected = None
    if info is not None and info.duration_s and info.first_pts is not None:
        first = info.first_pts * Fraction(info.time_base)
        expected = Fraction(info.start_time_s + info.duration_s).limit_denominator(10**9) - first
    run = _Run(spec, stats, info)
    got = False
    try:
        frames = (_every_k(run, spec, rate, index_exact) if spec.every_k
                  else _by_time(run, spec, stats, rate, index_exact, expected))
        for f in frames:
            got = True
            yield f
    finally:
        stats.frames_decoded = run.outputs
        run.close()
    if not got and run.pre_filter is None:
        raise CorruptMedia(f"{run.name}: ffmpeg decoded no video frames ({stats.decode_errors} errors)")
