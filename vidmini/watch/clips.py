"""Short clips cut from recorded segments (an alert's evidence, a review), by wall clock, with stream copy.

    ffmpeg -hide_banner -nostdin -nostats -loglevel error -itsoffset 10 -f concat -safe 0 -i <list.ffconcat>
           -map 0 -c copy -ss <keyframe's dts + 10> -t <length> [-movflags +faststart] -f mp4|mpegts <out>

The list names the segments the padded range touches, each but the last with a `duration` that places it exactly
where it was recorded (so the concat timeline is the run's own pts; audio that starts before a segment's first
keyframe stays put). Stream copy cannot start between keyframes: the clip starts at the last keyframe at or
before start - pad (up to a GOP earlier than asked; never later), and ends at end + pad. `-ss` after the input
drops what comes before that keyframe without seeking, so the start is exact whatever the container's seeking.
ffmpeg compares a copied packet's dts (not its pts) with `-ss`, so `-ss` names the keyframe's dts (earlier than
its pts with B-frames); `-itsoffset` keeps that time positive when the dts is before the first file's start.

The asked range [start, end] must be recorded without a break (one run, consecutive segments whose files still
exist): a range that was retained away, lies in a gap, or is not recorded yet raises `RangeNotRecorded`. The pads
are best effort: they stop where the recording does.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from vidmini.ingest.decode_ffmpeg import ffmpeg_exe
from vidmini.watch.recorder import Segment

_FORMATS = {".mp4": ["-movflags", "+faststart", "-f", "mp4"], ".ts": ["-f", "mpegts"]}
_CONTIGUOUS_S = 0.5  # consecutive segments of one run whose pts are further apart than this are not contiguous
_EPS_S = 0.001
_SHIFT_S = 10.0  # -itsoffset: more than any B-frame delay
_SLACK_S = 0.1  # wall-clock starts of one run's segments may disagree by a few tens of ms (clock estimate)


class RangeNotRecorded(ValueError):
    """The asked range is not (or no longer) in the recording."""


class ClipError(RuntimeError):
    """ffmpeg could not cut the clip."""


@dataclass(frozen=True)
class Clip:
    """`start`: wall clock of the clip's first frame (a keyframe); `end`: where it stops."""

    path: Path
    start: datetime
    end: datetime
    segments: tuple[Segment, ...]

    @property
    def duration_s(self) -> float:
        return (self.end - self.start).total_seconds()


@dataclass(frozen=True)
class _FileInfo:
    start: float  # the container's start time (any stream), s
    first: float  # first video packet's pts (the segment's keyframe), s
    keyframes: tuple[tuple[float, float], ...]  # (pts, dts), s
    end: float  # end of the last video packet, s


def _probe(path: Path) -> _FileInfo:
    """Timestamps of a segment file by reading its packets (no decoding); fine on one still being written."""
    import av

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        first = end = None
        keys = []
        for pkt in c.demux(vs):
            if pkt.pts is None:
                continue
            t = float(pkt.pts * vs.time_base)
            first = t if first is None else first
            end = max(end or t, t + float((pkt.duration or 0) * vs.time_base))
            if pkt.is_keyframe:
                keys.append((t, t if pkt.dts is None else float(pkt.dts * vs.time_base)))
        start = c.start_time / 1e6 if c.start_time is not None else first
    if first is None:
        raise RangeNotRecorded(f"{path.name}: no video in the segment yet")
    return _FileInfo(min(start, first), first, tuple(keys), end)


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.astimezone()  # naive: local time


def _blocks(segments: Sequence[Segment]) -> list[list[Segment]]:
    """Runs of segments recorded back to back whose files still exist, in recording order."""
    blocks: list[list[Segment]] = []
    for s in sorted((s for s in segments if s.path.exists()), key=lambda s: (s.run, s.pts)):
        prev = blocks[-1][-1] if blocks else None
        if (prev is not None and prev.run == s.run and prev.duration is not None
                and abs(prev.pts + prev.duration - s.pts) <= _CONTIGUOUS_S):
            blocks[-1].append(s)
        else:
            blocks.append([s])
    return blocks


def _block_end(block: list[Segment]) -> datetime:
    last = block[-1]
    if last.end is not None:
        return last.end
    try:
        info = _probe(last.path)  # the segment being written: as far as it goes now
    except RangeNotRecorded:  # just opened, nothing in it yet
        return last.start
    return last.start + timedelta(seconds=info.end - info.first)


def _explain(start: datetime, end: datetime, spans: list[tuple[datetime, datetime]]) -> str:
    asked = f"{start.isoformat()} .. {end.isoformat()}"
    if not spans:
        return f"{asked} is not recorded: there are no segments (none recorded, or all retained away)"
    if start < spans[0][0]:
        return (f"{asked} is not recorded: it starts before the oldest segment left ({spans[0][0].isoformat()}; "
                f"older ones were retained away or never recorded)")
    if end > spans[-1][1]:
        return f"{asked} is not recorded (yet): the recording ends at {spans[-1][1].isoformat()}"
    for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False):
        if start < b_start and end > a_end:
            return (f"{asked} is not recorded: the recording has a gap from {a_end.isoformat()} "
                    f"to {b_start.isoformat()}")
    return f"{asked} is not recorded in one piece"


def cut_clip(segments: Sequence[Segment], start: datetime, end: datetime, out: str | Path,
             pad_s: float = 2.0) -> Clip:
    """Cut [start - pad_s, end + pad_s] (wall clock; naive datetimes are local time) from `segments` (e.g.
    `Recorder.segments()`) into `out` (.mp4, with the index first for streaming, or .ts), written atomically."""
    start, end, out = _aware(start), _aware(end), Path(out)
    if end <= start:
        raise ValueError(f"empty range: {start.isoformat()} .. {end.isoformat()}")
    if out.suffix.lower() not in _FORMATS:
        raise ValueError(f"{out.name}: clips are .mp4 or .ts")
    blocks = _blocks(segments)
    spans = [(b[0].start, _block_end(b)) for b in blocks]
    eps = timedelta(seconds=_SLACK_S)
    found = [i for i, (a, b) in enumerate(spans) if a - eps <= start and end <= b + eps]
    if not found:
        raise RangeNotRecorded(_explain(start, end, spans))
    block, (b_start, b_end) = blocks[found[0]], spans[found[0]]
    lo = max(start - timedelta(seconds=pad_s), b_start)
    hi = min(end + timedelta(seconds=pad_s), b_end)
    chosen = [s for s in block if (s.end or b_end) > lo and s.start < hi]
    infos = [_probe(s.path) for s in chosen]

    # Concat timeline = the run's pts - that of file 0's start: file i sits at (pts_i - pts_0) - (lead_i - lead_0),
    # lead = its keyframe's pts - its start (audio may start earlier).
    first, info0 = chosen[0], infos[0]
    lead = [i.first - i.start for i in infos]
    places = [(s.pts - first.pts) - (lead[i] - lead[0]) for i, s in enumerate(chosen)]
    target = info0.first + (lo - first.start).total_seconds()  # lo on file 0's timeline
    key, key_dts = max((k for k in info0.keyframes if k[0] <= target + _EPS_S), default=(info0.first, info0.first))
    ss = _SHIFT_S + key_dts - info0.start - _EPS_S
    length = _SHIFT_S + (hi - first.start).total_seconds() + lead[0] - ss

    def quoted(p: Path) -> str:
        return "'" + str(p.resolve()).replace("'", "'\\''") + "'"

    lines = ["ffconcat version 1.0"]
    for i, s in enumerate(chosen):
        lines.append(f"file {quoted(s.path)}")
        if i + 1 < len(chosen):
            lines.append(f"duration {places[i + 1] - places[i]:.6f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    with tempfile.TemporaryDirectory(prefix="vidmini-clip-") as d:
        listing = Path(d) / "segments.ffconcat"
        listing.write_text("\n".join(lines) + "\n")
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error", "-y",
               "-itsoffset", f"{_SHIFT_S:g}", "-f", "concat", "-safe", "0", "-i", str(listing),
               "-map", "0", "-c", "copy", "-ss", f"{ss:.6f}", "-t", f"{length:.6f}",
               *_FORMATS[out.suffix.lower()], str(tmp)]
        try:
            done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=60 + 2 * length)
        except subprocess.TimeoutExpired:
            tmp.unlink(missing_ok=True)
            raise ClipError(f"{out.name}: ffmpeg took too long") from None
    if done.returncode != 0 or not tmp.exists() or tmp.stat().st_size == 0:
        tmp.unlink(missing_ok=True)
        raise ClipError(f"{out.name}: ffmpeg failed ({done.returncode}): {' '.join(done.stderr.split())[-500:]}")
    os.replace(tmp, out)
    return Clip(out, first.start + timedelta(seconds=key - info0.first), hi, tuple(chosen))
