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
import re
import shutil
import subprocess
from collections import deque
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

from ingest.decode_common import SWS_FLAGS, Decoded, SampledFrame, SamplerStats, SampleSpec, hold
from ingest.errors import CorruptMedia, IngestError
from ingest.probe import ProbeInfo, source_name

log = logging.getLogger(__name__)

_LINE = re.compile(r"^\[Parsed_(\w+?)_(\d+) @ [^\]]*\] \[info\] n:\s*(\d+) pts:\s*(-?\d+)")
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


class _Run:
    """One ffmpeg process: its log lines in order, and its frames on demand."""

    def __init__(self, spec: SampleSpec, stats: SamplerStats, info: ProbeInfo | None) -> None:
        self.spec, self.stats, self.name = spec, stats, source_name(spec.source)
        self.proc = subprocess.Popen(build_command(spec, info, ffmpeg_exe()), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        w, h = spec.size or ((info.display_width, info.display_height) if info else (0, 0))
        self.frame_bytes = w * h * 3
        self.shape = (h, w, 3)
        self.tb: dict[int, Fraction] = {}
        self.outputs: deque = deque()  # (n, pts) of output lines read while looking for frames
        self.frames: deque = deque()  # (n, pts) of decoded-frame lines read while looking for outputs
        self.pre_filter: int | None = None  # the showinfo instance that logs decoded frames
        self.errors = 0
        self.done = False
        self.out_count = 0

    def _read_line(self) -> bool:
        raw = self.proc.stderr.readline()
        if not raw:
            self.done = True
            return False
        line = raw.decode("utf-8", "replace").rstrip()
        if m := _LINE.match(line):
            if m.group(1) == "showinfo":
                idx, n, pts = int(m.group(2)), int(m.group(3)), int(m.group(4))
                if self.pre_filter is None:
                    self.pre_filter = idx
                (self.frames if idx == self.pre_filter else self.outputs).append((n, pts, self.errors))
                self.errors = 0
        elif m := _TB.match(line):
            self.tb.setdefault(int(m.group(1)), Fraction(int(m.group(2)), int(m.group(3))))
        elif _ERROR.search(line):
            self.errors += 1
            self.stats.error(self.name, "ffmpeg: " + line.split("] ", 1)[-1])
        return True

    def next_frame(self) -> tuple[int, int, int] | None:
        """(n, pts, errors before it) of the next decoded frame, or None at the end."""
        while not self.frames:
            if self.done or not self._read_line():
                return None
        return self.frames.popleft()

    def next_output(self) -> tuple[int, np.ndarray] | None:
        """(pts of the output tick or frame, its picture) of the next frame on the pipe, or None at the end."""
        while not self.outputs:
            if self.done or not self._read_line():
                return None
        _, pts, _ = self.outputs.popleft()
        buf = bytearray(self.frame_bytes)  # writable: the caller owns the array, no copy needed
        view, got = memoryview(buf), 0
        while got < self.frame_bytes:
            n = self.proc.stdout.readinto(view[got:])
            if not n:
                return None
            got += n
        self.out_count += 1
        return pts, np.frombuffer(buf, np.uint8).reshape(self.shape)

    def pre_tb(self) -> Fraction:
        return self.tb.get(self.pre_filter or 0, Fraction(1, 90000))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()


def _decoded(run: _Run, rate: Fraction, index_exact: bool) -> Iterator[Decoded]:
    last_t: Fraction | None = None
    while (item := run.next_frame()) is not None:
        n, pts, errors = item
        t = Fraction(pts) * run.pre_tb()
        if last_t is not None and t <= last_t:
            continue
        last_t = t
        index = n if index_exact else round(t * rate)
        yield Decoded(t, index, None, _no_image, damaged=errors > 0)


def _no_image():  # pragma: no cover - pictures come from the pipe, never from Decoded
    raise RuntimeError("ffmpeg backend frames carry no picture")


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
    run = _Run(spec, stats, info)
    got = False
    try:
        frames = _decoded(run, rate, index_exact)
        if spec.every_k:
            for d in frames:
                if d.index % spec.every_k:
                    continue
                out = run.next_output()
                if out is None:
                    break
                if d.t >= spec.start and (spec.end is None or d.t < spec.end):
                    got = True
                    yield SampledFrame(float(d.t), float(d.t), d.index, out[1])
                elif spec.end is not None and d.t >= spec.end:
                    break
        else:
            expected = None
            if info is not None and info.duration_s and info.first_pts is not None:
                tb = Fraction(info.time_base)
                expected = Fraction(info.start_time_s + info.duration_s).limit_denominator(10**9) - info.first_pts * tb
            last: tuple[int, np.ndarray] | None = None
            for k, d in hold(frames, spec, stats, 1 / rate, (lambda: expected) if expected else None):
                first_use = False
                while last is None or last[0] < k:
                    last = run.next_output()
                    first_use = True
                    if last is None:
                        break
                if last is None or last[0] != k:
                    log.warning("%s: ffmpeg gave no picture for t=%.3f s", run.name, float(k * spec.step))
                    break
                got = True
                yield SampledFrame(float(k * spec.step), float(d.t), d.index, last[1] if first_use else last[1].copy())
        stats.frames_decoded = run.out_count
    finally:
        run.close()
    if not got and run.pre_filter is None:
        raise CorruptMedia(f"{run.name}: ffmpeg decoded no video frames ({stats.decode_errors} errors)")
