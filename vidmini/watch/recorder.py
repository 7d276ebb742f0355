"""Recording for live watches: one ffmpeg process copies a camera, stream or growing file into MPEG-TS segments,
indexed by wall clock, and reconnects when the source drops. Nothing here knows the model.

The ffmpeg command (`Recorder.command`), stream copy only:
  ffmpeg -hide_banner -nostdin -nostats -loglevel level+verbose -progress pipe:2 -stats_period 0.25
         [input args] -analyzeduration <probe_s> -i <url | pipe:0>
         -map 0:v -map 0:a? -c copy -muxdelay 0 -muxpreload 0
         -f segment -segment_format mpegts -segment_format_options flush_packets=1
         -segment_time <segment_s> -segment_start_number <n> -segment_list pipe:2 -segment_list_type csv
         <folder>/seg-%08d.ts
MPEG-TS needs no index and every packet is flushed to the file as it comes (not per 32 KB buffer), so the
segment being written is readable, up to the last packet received, at any time. Segments are cut at video
keyframes. Everything ffmpeg tells us comes in order on one pipe (stderr): a verbose log line when a segment
starts (its first packet's pts), the csv line of the segment list when it ends, and a progress block every 0.25 s.
`-muxdelay 0` keeps the pts in the files equal to the logged ones (modulo MPEG-TS's 33-bit wrap, 26.5 h).

A run is one ffmpeg process that recorded (runs are numbered 0, 1, ... across restarts of the recorder): its
segments are back to back on one pts timeline; between runs there is a gap.

Wall clock: wall(pts) = pts + offset, per run; offset = min(arrival - pts) over the (pts, time read)
pairs ffmpeg reports, over the last `CLOCK_WINDOW_S`. A packet is never reported before it arrived, and bursts
(the probe at connect, catching up a growing file, HLS' initial segments) only make arrival - pts larger, so the
minimum is the best estimate, reached as soon as ffmpeg is caught up with the source; the window lets it follow a
source clock that drifts against ours. File mtimes are not used (they say when a segment was written). The
first estimate (made during the probe burst) is late; when a better one comes, the starts of this run's recent
segments (and of the gap it ended) are revised: a new index line, and a `revised` event.

Files in the folder: seg-NNNNNNNN.ts; segments.jsonl, one JSON object per line, appended (and fsynced) when a
segment opens (duration null) and when it closes or is revised, the last line of a file name winning:
  {"file": "seg-00000042.ts", "run": 3, "start": "2026-01-02T03:04:05.678901+00:00", "pts": 84.0, "duration": 60.0}
gaps.jsonl, one line per outage (by the run that ended it; last line wins):
  {"run": 4, "from": "...+00:00", "until": "...+00:00", "reason": "no data for 10 s; back after 3 attempts"}
`retain` rewrites both atomically (temp file + rename), so they also stay compact.

Sources: URLs of `ingest.live.LIVE_SCHEMES` (RTSP over TCP by default, HTTP(S)/HLS, SRT, UDP, TCP, RTMP) and
devices go to ffmpeg as they are; a local path is a growing file, copied into ffmpeg's stdin like `tail -f`,
from its first byte the first time, from the start again when it was replaced or truncated, and otherwise from
where the copy got to: after an outage, and for MPEG-TS also across restarts (source.json in the folder holds the
file's identity and the byte position, saved before each piece is handed to ffmpeg, so a recorder killed
outright loses what was in flight and never records anything twice; a restarted recorder re-reads other
containers from the start, as they cannot be joined without their header). MPEG-TS is joined and left on a
frame's first packet (payload_unit_start_indicator): a stop hands ffmpeg the rest of the frame it was in, a start
in the middle of a frame skips to the next one, so no picture is recorded cut short (the frames up to the next
keyframe are lost).
Drops: ffmpeg exits (end of stream, error) or reports no new data for `stall_s` -> it gets SIGINT, and a second
one `INTERRUPT_AGAIN_S` later if it is still there (blocked in a read), so it finishes the segment cleanly; SIGKILL
`KILL_AFTER_S` after that; a growing file's ffmpeg first gets EOF on its stdin. After a `Backoff` delay a new
ffmpeg connects. `stop()` ends ffmpeg the same way.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import queue
import random
import re
import signal
import subprocess
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

from vidmini.ingest.decode_ffmpeg import ffmpeg_exe
from vidmini.ingest.live import is_stream_url

log = logging.getLogger(__name__)

INDEX_NAME = "segments.jsonl"
GAPS_NAME = "gaps.jsonl"
POSITION_NAME = "source.json"  # a growing file: how far it has been read
LOCK_NAME = ".recorder.lock"
SEGMENT_PATTERN = "seg-%08d.ts"
CONNECTING, RECORDING, BACKOFF, STOPPED = "connecting", "recording", "backoff", "stopped"
OPENED, CLOSED, REVISED, GAP = "opened", "closed", "revised", "gap"

TS_HZ = 90_000  # MPEG-TS time base: the segment muxer logs pts in these ticks
TS_PACKET = 188
_TS_SCAN = 4 << 20  # how far to look for a frame's first packet before giving up on finding one
_REVISE_TOL_S = 0.05  # a better clock estimate rewrites index lines only when it moves them more than this

_OPENED = re.compile(r"segment:'(?P<path>.+)' starts with packet stream:\d+ pts:(?P<pts>-?\d+|NOPTS) ")
_LISTED = re.compile(r"^(?P<file>seg-\d+\.ts),(?P<start>-?[\d.]+),(?P<end>-?[\d.]+)$")
_PROGRESS = re.compile(r"^out_time_us=(?P<us>-?\d+)$")
_ERROR = re.compile(r"\[(error|fatal|panic)\] ")
_NUMBER = re.compile(r"^seg-(\d+)\.ts$")
_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


@dataclass(frozen=True)
class Backoff:
    """Wait before reconnect attempt n (n = attempts since the source last recorded): base·factor^(n-1), capped
    at max_s, ±jitter (a fraction) so that many recorders of one site don't all reconnect in the same instant."""

    base_s: float = 1.0
    factor: float = 2.0
    max_s: float = 60.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.base_s < 0 or self.max_s < self.base_s or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"bad backoff: {self}")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        raw = min(self.max_s, self.base_s * self.factor ** max(0, attempt - 1))
        spread = raw * self.jitter
        return min(self.max_s, max(0.0, raw + (rng or random).uniform(-spread, spread)))


@dataclass(frozen=True)
class Segment:
    """One recorded file. `start`: wall clock of its first frame (a keyframe); `pts`: that frame's pts in seconds
    on its run's timeline (the file's own pts modulo 2^33/90000 s); `duration`: None while it is being written."""

    path: Path
    run: int
    start: datetime
    pts: float
    duration: float | None

    @property
    def file(self) -> str:
        return self.path.name

    @property
    def end(self) -> datetime | None:
        return None if self.duration is None else _dt(self.start.timestamp() + self.duration)

    def to_json(self) -> dict:
        return {"file": self.file, "run": self.run, "start": self.start.isoformat(timespec="microseconds"), "pts": round(self.pts, 6),
                "duration": None if self.duration is None else round(self.duration, 6)}

    @classmethod
    def from_json(cls, folder: Path, obj: dict) -> Segment:
        return cls(Path(folder) / obj["file"], int(obj["run"]), datetime.fromisoformat(obj["start"]),
                   float(obj["pts"]), None if obj.get("duration") is None else float(obj["duration"]))


@dataclass(frozen=True)
class Gap:
    """An outage: nothing recorded from `start` to `end` (wall clock); `run`: the run that ended it."""

    run: int
    start: datetime
    end: datetime
    reason: str

    @property
    def duration_s(self) -> float:
        return (self.end - self.start).total_seconds()

    def to_json(self) -> dict:
        return {"run": self.run, "from": self.start.isoformat(timespec="microseconds"),
                "until": self.end.isoformat(timespec="microseconds"),
                "reason": self.reason}

    @classmethod
    def from_json(cls, obj: dict) -> Gap:
        return cls(int(obj["run"]), datetime.fromisoformat(obj["from"]), datetime.fromisoformat(obj["until"]),
                   str(obj.get("reason", "")))


@dataclass(frozen=True)
class RecorderEvent:
    """`opened` / `closed` / `revised` (better wall-clock times) carry a segment; `gap` (or `revised`) a gap."""

    kind: str
    segment: Segment | None = None
    gap: Gap | None = None


@dataclass
class RecorderStats:
    """Counters since `start()`. attempts: ffmpeg processes started; connects: runs that recorded; drops: recorded
    runs that ended without stop(); stalls: runs stopped for no data; failures: attempts in a row that recorded
    nothing (now); revisions: index lines rewritten by a better clock estimate."""

    attempts: int = 0
    connects: int = 0
    drops: int = 0
    stalls: int = 0
    failures: int = 0
    segments_opened: int = 0
    segments_closed: int = 0
    gaps: int = 0
    revisions: int = 0
    removed: int = 0
    last_error: str | None = None
    last_data: datetime | None = None


def _redact(text: str) -> str:
    """rtsp://user:password@camera/... -> rtsp://***@camera/...: errors go to logs and gaps.jsonl."""
    return _CREDENTIALS.sub("***@", text)


def _die_with_parent() -> None:
    """In the ffmpeg child before exec (Linux): SIGKILL when the recorder's thread dies. A service killed outright
    would otherwise leave its ffmpeg recording on, holding the source (a UDP port, a camera's one connection)
    from the service's next start."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned ffmpeg ends at its next write to the closed pipe


def _dt(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def _epoch(t: datetime | float) -> float:
    """A datetime (naive = local time) or an epoch time, as epoch seconds."""
    return t.timestamp() if isinstance(t, datetime) else float(t)


def _read_lines(path: Path) -> list[dict]:
    """The JSON objects of a JSON-lines file; a torn last line (a crash mid-write) is skipped."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            log.warning("%s: skipping a damaged line", path)
    return out


def read_segments(folder: str | Path) -> list[Segment]:
    """The index: the last line of each file, in the order the files were first listed (recording order)."""
    folder = Path(folder)
    latest: dict[str, dict] = {}
    for obj in _read_lines(folder / INDEX_NAME):
        latest[obj["file"]] = obj  # dicts keep the first insertion's position
    return [Segment.from_json(folder, o) for o in latest.values()]


def read_gaps(folder: str | Path) -> list[Gap]:
    """The outages, oldest first. A gap that a better clock estimate revised to nothing (the new run's first
    frame turned out to be no later than the old run's last: e.g. HLS serving its last segments again) is left out."""
    latest: dict[int, dict] = {}
    for obj in _read_lines(Path(folder) / GAPS_NAME):
        latest[int(obj["run"])] = obj
    gaps = (Gap.from_json(o) for o in latest.values())
    return sorted((g for g in gaps if g.end > g.start), key=lambda g: g.start)


def _append(path: Path, objs: Iterable[dict]) -> None:
    """Appended and fsynced: a line is on disk before the event about it goes out."""
    text = "".join(json.dumps(o) + "\n" for o in objs)
    if not text:
        return
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _rewrite(path: Path, objs: Iterable[dict]) -> None:
    """Replace a JSON-lines file atomically: a reader sees the old file or the new one, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write("".join(json.dumps(o) + "\n" for o in objs))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def probe_span(path: Path) -> tuple[float, float]:
    """(first video pts, end of the last video packet) in seconds of the file's timeline, by reading packets (no
    decoding); works on a segment still being written. Used to close segments a crash left open."""
    import av

    with av.open(str(path)) as c:
        vs = c.streams.video[0]
        first = None
        end = None
        for pkt in c.demux(vs):
            if pkt.pts is None:
                continue
            t = float(pkt.pts * vs.time_base)
            first = t if first is None else first
            stop = t + float((pkt.duration or 0) * vs.time_base)
            end = stop if end is None else max(end, stop)
    if first is None:
        raise ValueError(f"{path}: no video packets")
    return first, end


def _pes_start(data: bytes) -> int | None:
    """Where in `data` (MPEG-TS) the first packet starting a frame or a table (payload_unit_start_indicator) is, on
    the 188-byte grid that two sync bytes in a row give; None when there is none, or too little data to tell."""
    s = 0
    while True:
        s = data.find(b"\x47", s)
        if s < 0 or s + TS_PACKET > len(data):
            return None
        if s + TS_PACKET == len(data) or data[s + TS_PACKET] == 0x47:
            break
        s += 1
    for p in range(s, len(data) - TS_PACKET + 1, TS_PACKET):
        if data[p] != 0x47:
            return None
        if data[p + 1] & 0x40:
            return p
    return None


def _is_ts(path: str | Path) -> bool:
    """The file starts like MPEG-TS (a sync byte): it can be joined at any frame."""
    try:
        with open(path, "rb") as f:
            return f.read(1) == b"\x47"
    except OSError:
        return False


def read_position(folder: str | Path) -> dict | None:
    """A growing file's saved read position: {"file", "dev", "ino", "offset"}, or None."""
    try:
        return json.loads((Path(folder) / POSITION_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return None


class _Clock:
    """Sliding-window minimum of arrival - pts (see the module docstring); O(1) per observation."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._mins: deque[tuple[float, float]] = deque()  # (arrival, arrival - pts), offsets increasing

    def observe(self, arrival: float, pts: float) -> None:
        d = arrival - pts
        while self._mins and self._mins[-1][1] >= d:
            self._mins.pop()
        self._mins.append((arrival, d))
        while self._mins[0][0] < arrival - self.window_s:
            self._mins.popleft()

    @property
    def offset(self) -> float | None:
        return self._mins[0][1] if self._mins else None


@dataclass
class _Seg:
    """A segment of the current run, while its start may still be revised."""

    file: str
    pts: float
    seen: float  # when ffmpeg reported it
    offset: float  # the clock offset its start was computed with
    duration: float | None = None

    @property
    def start(self) -> float:
        return self.pts + self.offset


@dataclass
class _Run:
    clock: _Clock
    number: int = -1  # given when it records its first segment: runs with segments are numbered 0, 1, 2...
    started: float = field(default_factory=time.monotonic)
    last_data: float | None = None  # monotonic time of the last new data ffmpeg reported
    last_input: float | None = None  # monotonic time of the last bytes fed (growing file)
    last_pts: float | None = None
    current: _Seg | None = None
    first: _Seg | None = None
    last_closed: _Seg | None = None
    recent: list[_Seg] = field(default_factory=list)
    gap: Gap | None = None  # the outage this run ended
    stalled: bool = False
    error: str | None = None  # ffmpeg's last error line


_LIVE: weakref.WeakSet[Recorder] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """An interpreter that exits with recorders still running leaves no ffmpeg behind."""
    for rec in list(_LIVE):
        rec._kill()


class Recorder:
    """Records `source` into `folder` (one recorder per folder: a lock file says so) until `stop()`.

    Follow it with `on_event` (called in the recorder's thread; keep it short) or `subscribe()` (a queue per
    consumer) for `RecorderEvent`s; read `segments()`, `gaps()`, `state`, `stats`; trim with `retain`.
    `input_args` go before `-i` (e.g. ["-rtsp_transport", "udp"]); `streams` are the `-map`s (drop audio a TS
    can't hold, e.g. G.711 from a camera, with ("0:v",)).
    """

    CLOCK_WINDOW_S = 300.0
    DRAIN_S = 2.0  # a growing file's ffmpeg gets this long to finish after its stdin closed, then SIGINT
    # ffmpeg acts on a first SIGINT between packets: one waiting in a read (a UDP source gone quiet) only once a
    # packet comes. A second signal makes its interrupt callback abort the read; it still finishes the segment
    # (trailer, list line) as on a first one. A third would make it exit at once, so the next is SIGKILL.
    INTERRUPT_AGAIN_S = 0.5
    KILL_AFTER_S = 5.0  # the second SIGINT, then this long, then SIGKILL

    def __init__(self, source: str | Path, folder: str | Path, segment_s: float = 60.0, *, stall_s: float = 10.0,
                 backoff: Backoff | None = None, probe_s: float = 1.0, input_args: Sequence[str] = (),
                 streams: Sequence[str] = ("0:v", "0:a?"),
                 on_event: Callable[[RecorderEvent], None] | None = None) -> None:
        if segment_s <= 0 or stall_s <= 0 or probe_s <= 0:
            raise ValueError("segment_s, stall_s and probe_s must be > 0")
        self.source = str(source)
        self.folder = Path(folder)
        self.segment_s, self.stall_s, self.probe_s = segment_s, stall_s, probe_s
        self.backoff = backoff or Backoff()
        self.input_args, self.streams = list(input_args), list(streams)
        self.on_event = on_event
        self.is_file = not is_stream_url(self.source)
        self._lock = threading.RLock()  # in-memory state and the index/gaps files
        self._subscribers: list[queue.Queue[RecorderEvent]] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._run: _Run | None = None
        self._state = STOPPED
        self._stats = RecorderStats()
        self._lock_fd: int | None = None
        self._next_run = 0
        self._next_number = 0
        self._outage: tuple[float, str, int] | None = None  # (wall clock when recording stopped, why, attempts then)
        self._file_id: tuple[int, int] | None = None  # growing file: (device, inode) and the byte reached
        self._file_offset = 0

    # -- public API -------------------------------------------------------------------------------------------

    @property
    def state(self) -> str:
        return self._state

    @property
    def stats(self) -> RecorderStats:
        with self._lock:
            return replace(self._stats)

    @property
    def pid(self) -> int | None:
        """The ffmpeg process now running, if any."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    @property
    def current(self) -> Segment | None:
        """The segment being written (readable as it grows), if any."""
        with self._lock:
            run = self._run
            return self._segment(run, run.current) if run and run.current else None

    def segments(self) -> list[Segment]:
        """Every indexed segment, oldest first; the one being written last, with duration None."""
        with self._lock:
            return read_segments(self.folder)

    def gaps(self) -> list[Gap]:
        with self._lock:
            return read_gaps(self.folder)

    def subscribe(self, maxsize: int = 0) -> queue.Queue[RecorderEvent]:
        """A queue that receives every event from now on (a full queue drops the event, with a warning)."""
        q: queue.Queue[RecorderEvent] = queue.Queue(maxsize)
        with self._lock:
            self._subscribers.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subscribers:
                self._subscribers.remove(q)

    def command(self, start_number: int = 0) -> list[str]:
        """The ffmpeg command line of one run (see the module docstring)."""
        inputs = list(self.input_args)
        if self.source.lower().startswith(("rtsp://", "rtsps://")) and "-rtsp_transport" not in inputs:
            inputs = ["-rtsp_transport", "tcp", *inputs]  # no packets lost to UDP; works through NAT
        maps = [a for s in self.streams for a in ("-map", s)]
        return [ffmpeg_exe(), "-hide_banner", "-nostdin", "-nostats", "-loglevel", "level+verbose",
                "-progress", "pipe:2", "-stats_period", "0.25",
                *inputs, "-analyzeduration", str(int(self.probe_s * 1e6)),
                "-i", "pipe:0" if self.is_file else self.source,
                *maps, "-c", "copy", "-muxdelay", "0", "-muxpreload", "0",
                "-f", "segment", "-segment_format", "mpegts", "-segment_format_options", "flush_packets=1",
                "-segment_time", f"{self.segment_s:g}", "-segment_start_number", str(start_number),
                "-segment_list", "pipe:2", "-segment_list_type", "csv",
                str(self.folder / SEGMENT_PATTERN)]

    def start(self) -> Recorder:
        if self._thread is not None:
            raise RuntimeError("recorder already started")
        ffmpeg_exe()  # no ffmpeg: fail here, not in the recording thread
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"{self.folder}: another recorder is writing there") from None
        self._lock_fd = fd
        self._resume_folder()
        self._stopping.clear()
        self._stats = RecorderStats()
        _LIVE.add(self)
        self._thread = threading.Thread(target=self._loop, name=f"recorder:{self.folder.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """ffmpeg gets SIGINT and finishes the segment (listed with its duration); returns once it has exited."""
        self._stopping.set()
        thread = self._thread
        if thread is threading.current_thread():  # from an on_event callback: the loop ends by itself
            return
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._kill()
                thread.join(5)
        self._thread = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        _LIVE.discard(self)

    def __enter__(self) -> Recorder:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def retain(self, max_age_s: float | None = None, max_bytes: int | None = None,
               now: datetime | float | None = None) -> list[Segment]:
        """Remove whole segments that ended more than `max_age_s` before `now`, then the oldest ones until all
        of them take at most `max_bytes`; never the one being written. The index loses their lines in one atomic
        rewrite before the files go (a crash in between leaves files no one lists, never lines without files);
        gaps that ended before the oldest segment left go with them. A segment listed without a duration is
        never removed either (it may be another process' open segment; a start closes a crash's leftovers).
        Returns the removed segments."""
        now_t = time.time() if now is None else _epoch(now)
        with self._lock:
            segs = read_segments(self.folder)
            run = self._run
            writing = {s.file for s in segs if s.duration is None}
            if run is not None and run.current is not None:
                writing.add(run.current.file)
            doomed: dict[str, Segment] = {}
            if max_age_s is not None:
                for s in segs:
                    end = s.start.timestamp() + (s.duration or 0.0)
                    if s.file not in writing and end <= now_t - max_age_s:
                        doomed[s.file] = s
            if max_bytes is not None:
                sizes = {s.file: (s.path.stat().st_size if s.path.exists() else 0) for s in segs}
                total = sum(v for k, v in sizes.items() if k not in doomed)
                for s in segs:
                    if total <= max_bytes:
                        break
                    if s.file not in writing and s.file not in doomed:
                        doomed[s.file] = s
                        total -= sizes[s.file]
            if not doomed:
                return []
            kept = [s for s in segs if s.file not in doomed]
            _rewrite(self.folder / INDEX_NAME, [s.to_json() for s in kept])
            if kept:
                oldest = kept[0].start
                gaps = read_gaps(self.folder)
                if any(g.end < oldest for g in gaps):
                    _rewrite(self.folder / GAPS_NAME, [g.to_json() for g in gaps if g.end >= oldest])
            if run is not None:  # a removed segment must not come back through a revision
                run.recent = [s for s in run.recent if s.file not in doomed]
            for s in doomed.values():
                s.path.unlink(missing_ok=True)
            self._stats.removed += len(doomed)
        return list(doomed.values())

    # -- the recording loop -----------------------------------------------------------------------------------

    def _resume_folder(self) -> None:
        """Continue a folder recorded before: run and file numbers go on, segments a crash left open are closed
        (their duration read from the file), and the time since the last recording is a gap on reconnect."""
        segs = read_segments(self.folder)
        fixed = []
        for s in segs:
            if s.duration is None:
                try:
                    first, end = probe_span(s.path)
                    fixed.append(replace(s, duration=max(0.0, end - first)))
                except Exception as e:  # noqa: BLE001 - unreadable: keep it listed, empty, for retain to remove
                    log.warning("%s: %s", s.path, e)
                    fixed.append(replace(s, duration=0.0))
        _append(self.folder / INDEX_NAME, [s.to_json() for s in fixed])
        segs = read_segments(self.folder)
        numbers = [int(m.group(1)) for p in self.folder.iterdir() if (m := _NUMBER.match(p.name))]
        self._next_number = max(numbers, default=-1) + 1
        gaps = read_gaps(self.folder)
        self._next_run = max([s.run for s in segs] + [g.run for g in gaps], default=-1) + 1
        ends = [s.start.timestamp() + (s.duration or 0.0) for s in segs] + [g.end.timestamp() for g in gaps]
        self._outage = (max(ends), "recorder was not running", 0) if ends else None
        position = read_position(self.folder) if self.is_file else None
        if position and position.get("file") == self.source and _is_ts(self.source):
            self._file_id = (int(position["dev"]), int(position["ino"]))
            self._file_offset = int(position["offset"])

    def _set_state(self, state: str) -> None:
        if state != self._state:
            log.info("recorder %s: %s", self.folder, state)
        self._state = state

    def _loop(self) -> None:
        attempt = 0
        try:
            while not self._stopping.is_set():
                self._set_state(CONNECTING)
                recorded = self._run_once()
                if self._stopping.is_set():
                    break
                attempt = 1 if recorded else attempt + 1
                with self._lock:
                    self._stats.failures = 0 if recorded else attempt
                self._set_state(BACKOFF)
                self._stopping.wait(self.backoff.delay(attempt))
        except Exception:  # noqa: BLE001 - a bug here must not leave ffmpeg running unseen
            log.exception("recorder %s failed", self.folder)
            self._kill()
        finally:
            with self._lock:
                events = self._close_outage_at_stop()
            self._emit(events)
            self._set_state(STOPPED)

    def _run_once(self) -> bool:
        """One ffmpeg process, from connect to exit; True if it recorded anything."""
        run = _Run(_Clock(self.CLOCK_WINDOW_S))
        if self.is_file and not Path(self.source).is_file():
            with self._lock:
                self._stats.attempts += 1
                self._stats.last_error = f"{self.source}: no such file"
            return False
        cmd = self.command(self._next_number)
        log.debug("recorder: %s", _redact(" ".join(cmd)))
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE if self.is_file else subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    preexec_fn=_die_with_parent)
        except OSError as e:  # out of processes or descriptors for now: a failed attempt, retried after backoff
            with self._lock:
                self._stats.attempts += 1
                self._stats.last_error = f"cannot start ffmpeg: {e}"
            return False
        lines: queue.Queue[tuple[float, str] | None] = queue.Queue()
        run_done = threading.Event()
        helpers = [threading.Thread(target=self._read_stderr, args=(proc, lines), daemon=True)]
        if self.is_file:
            helpers.append(threading.Thread(target=self._feed, args=(proc, run, run_done), daemon=True))
        with self._lock:
            self._proc, self._run = proc, run
            self._stats.attempts += 1
        for t in helpers:
            t.start()
        interrupted_at: float | None = None  # when the run was told to end (stop or stall)
        signalled, signalled_at = 0, 0.0  # escalation: 1 = SIGINT sent, 2 = SIGINT again, 3 = SIGKILL
        try:
            while True:
                try:
                    item = lines.get(timeout=0.1)
                except queue.Empty:
                    item = ()
                if item is None:
                    break
                if item:
                    with self._lock:
                        events = self._on_line(run, *item)
                    self._emit(events)
                now = time.monotonic()
                # before the first output ffmpeg may probe for probe_s; bytes still flowing in are no stall either
                idle_since = max(t for t in (run.started + self.probe_s, run.last_data, run.last_input) if t)
                if interrupted_at is None and (self._stopping.is_set() or now - idle_since > self.stall_s):
                    if not self._stopping.is_set():
                        run.stalled = True
                    interrupted_at = now
                    # a growing file: the feeder closes stdin and ffmpeg drains what it was given (SIGINT would
                    # drop the packet its demuxer holds, and a read on a pipe may not see it anyway)
                    run_done.set()
                if interrupted_at is not None:
                    if signalled == 0 and (not self.is_file or now - interrupted_at > self.DRAIN_S):
                        self._signal(proc, signal.SIGINT)
                        signalled, signalled_at = 1, now
                    elif signalled == 1 and now - signalled_at > self.INTERRUPT_AGAIN_S:
                        self._signal(proc, signal.SIGINT)
                        signalled, signalled_at = 2, now
                    elif signalled == 2 and now - signalled_at > self.KILL_AFTER_S:
                        self._signal(proc, signal.SIGKILL)
                        signalled = 3
        finally:
            run_done.set()
            for _ in range(signalled, 2):  # leaving early (an error here): the same two interrupts
                if proc.poll() is None:
                    self._signal(proc, signal.SIGINT)
                    try:
                        proc.wait(self.INTERRUPT_AGAIN_S)
                    except subprocess.TimeoutExpired:
                        pass
            try:
                code = proc.wait(self.KILL_AFTER_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            for t in helpers:
                t.join(5)
            with self._lock:
                events = self._end_run(run, code)
                self._proc = None
            self._emit(events)
        return run.first is not None

    def _read_stderr(self, proc: subprocess.Popen, lines: queue.Queue) -> None:
        """Each line with the time it was read: the arrival side of the clock's observations."""
        for raw in proc.stderr:
            lines.put((time.time(), raw.decode("utf-8", "replace").rstrip("\r\n")))
        proc.stderr.close()
        lines.put(None)

    def _feed(self, proc: subprocess.Popen, run: _Run, run_done: threading.Event) -> None:
        """Copy the growing file into ffmpeg's stdin from the byte reached before, following it like `tail -f`
        (`ingest.live.FollowFile`, but resumable at a byte and stoppable); close stdin (so ffmpeg finishes the run)
        after `stall_s` without growth, on stop, or when the file is replaced or truncated under us. MPEG-TS is
        joined and left on a frame's first packet (see the module docstring)."""
        path = Path(self.source)
        idle_since = time.monotonic()
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) != self._file_id or st.st_size < self._file_offset:
                    self._file_id, self._file_offset = (st.st_dev, st.st_ino), 0
                is_ts = f.read(1) == b"\x47"
                joining = is_ts and self._file_offset > 0  # in the middle of the stream: from a frame's start on
                f.seek(self._file_offset)
                while not run_done.is_set():
                    if joining:
                        data = f.read(_TS_SCAN)
                        at = _pes_start(data)
                        if at is not None or len(data) == _TS_SCAN:  # found (or not TS after all): go on from there
                            self._file_offset += at or 0
                            joining = False
                        f.seek(self._file_offset)
                        if not joining:
                            continue
                    elif chunk := f.read(1 << 16):
                        self._hand_over(proc, chunk)
                        idle_since = run.last_input = time.monotonic()
                        continue
                    if time.monotonic() - idle_since > self.stall_s:
                        run.stalled = True
                        break
                    try:
                        now_st = os.stat(path)
                    except FileNotFoundError:
                        break
                    if (now_st.st_dev, now_st.st_ino) != self._file_id or now_st.st_size < f.tell():
                        break
                    run_done.wait(0.05)
                else:
                    if is_ts and not joining:  # stopped: the rest of the frame being handed over, as far as written
                        data = f.read(_TS_SCAN)
                        at = _pes_start(data)
                        tail = data[:at] if at is not None else (data if len(data) < _TS_SCAN else b"")
                        if tail:
                            self._hand_over(proc, tail)
        except OSError as e:  # ffmpeg gone (broken pipe) or the file unreadable: the run ends either way
            log.debug("recorder feed: %s", e)
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def _hand_over(self, proc: subprocess.Popen, chunk: bytes) -> None:
        """The position after `chunk` is saved before ffmpeg gets it: a restart never reads anything twice."""
        self._file_offset += len(chunk)
        self._save_position()
        proc.stdin.write(chunk)
        proc.stdin.flush()

    def _save_position(self) -> None:
        """Atomically (temp file + rename); not fsynced: it is there for a restarted process, and the page cache
        outlives a killed one."""
        dev, ino = self._file_id
        path = self.folder / POSITION_NAME
        tmp = path.with_name(f".{POSITION_NAME}.tmp")
        tmp.write_text(json.dumps({"file": self.source, "dev": dev, "ino": ino, "offset": self._file_offset}))
        os.replace(tmp, path)

    @staticmethod
    def _signal(proc: subprocess.Popen, sig: int) -> None:
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    # -- what ffmpeg says (called with the lock held; return the events to emit) -------------------------------

    def _on_line(self, run: _Run, arrival: float, line: str) -> list[RecorderEvent]:
        if m := _PROGRESS.match(line):
            pts = int(m["us"]) / 1e6
            if run.last_pts is not None and pts <= run.last_pts:
                return []
            run.last_pts = pts
            self._got_data(run, arrival)
            return self._observe(run, arrival, pts)
        if m := _OPENED.search(line):
            pts = (run.last_pts or 0.0) if m["pts"] == "NOPTS" else int(m["pts"]) / TS_HZ
            return self._opened(run, arrival, Path(m["path"]).name, pts)
        if m := _LISTED.match(line):
            cur = run.current
            return self._closed(run, float(m["end"])) if cur is not None and cur.file == m["file"] else []
        if _ERROR.search(line):
            run.error = self._stats.last_error = _redact(re.sub(r"^(\[[^\]]*\] )+", "", line))
        return []

    def _got_data(self, run: _Run, arrival: float) -> None:
        run.last_data = time.monotonic()
        self._stats.last_data = _dt(arrival)

    def _observe(self, run: _Run, arrival: float, pts: float) -> list[RecorderEvent]:
        """A new clock observation; revise this run's recent starts if it moved them earlier (a better estimate)."""
        run.clock.observe(arrival, pts)
        offset = run.clock.offset
        run.recent = [s for s in run.recent if s.duration is None or s.seen >= arrival - self.CLOCK_WINDOW_S]
        stale = [s for s in run.recent if s.offset - offset > _REVISE_TOL_S]
        if not stale:
            return []
        events = []
        for s in stale:
            s.offset = offset
            seg = self._segment(run, s)
            events.append(RecorderEvent(REVISED, segment=seg))
        _append(self.folder / INDEX_NAME, [e.segment.to_json() for e in events])
        self._stats.revisions += len(events)
        if run.gap is not None and any(s is run.first for s in stale):
            run.gap = replace(run.gap, end=max(run.gap.start, _dt(run.first.start)))
            _append(self.folder / GAPS_NAME, [run.gap.to_json()])
            events.append(RecorderEvent(REVISED, gap=run.gap))
        return events

    def _opened(self, run: _Run, arrival: float, file: str, pts: float) -> list[RecorderEvent]:
        events = self._closed(run, pts) if run.current is not None else []  # its list line went missing
        self._got_data(run, arrival)
        events += self._observe(run, arrival, pts)
        seg = _Seg(file, pts, arrival, run.clock.offset)
        if m := _NUMBER.match(file):
            self._next_number = max(self._next_number, int(m.group(1)) + 1)
        run.current = seg
        run.recent.append(seg)
        self._stats.segments_opened += 1
        if run.first is None:
            run.first, run.number = seg, self._next_run
            self._next_run += 1
            self._stats.connects += 1
            self._stats.failures = 0
            self._set_state(RECORDING)
            if self._outage is not None:
                since, why, before = self._outage
                if seg.start > since:
                    attempts = self._stats.attempts - before
                    run.gap = Gap(run.number, _dt(since), _dt(seg.start),
                                  f"{why}; back after {attempts} attempt{'s' if attempts != 1 else ''}")
                    _append(self.folder / GAPS_NAME, [run.gap.to_json()])
                    self._stats.gaps += 1
                    events.append(RecorderEvent(GAP, gap=run.gap))
                self._outage = None
        opened = self._segment(run, seg)
        _append(self.folder / INDEX_NAME, [opened.to_json()])
        events.append(RecorderEvent(OPENED, segment=opened))
        return events

    def _closed(self, run: _Run, end_pts: float) -> list[RecorderEvent]:
        seg = run.current
        seg.duration = max(0.0, end_pts - seg.pts)
        run.current, run.last_closed = None, seg
        self._stats.segments_closed += 1
        closed = self._segment(run, seg)
        _append(self.folder / INDEX_NAME, [closed.to_json()])
        return [RecorderEvent(CLOSED, segment=closed)]

    def _end_run(self, run: _Run, code: int) -> list[RecorderEvent]:
        """ffmpeg has exited: close a segment it could not finish (killed), and note the outage if it was a drop."""
        events = []
        if run.current is not None:
            end = run.last_pts if run.last_pts is not None else run.current.pts
            events = self._closed(run, max(end, run.current.pts))
        if run.stalled:
            self._stats.stalls += 1
        if run.first is not None and not self._stopping.is_set():
            self._stats.drops += 1
            last = run.last_closed
            if run.stalled:
                why = f"no data for {self.stall_s:g} s"
            else:
                why = f"source ended (ffmpeg exit code {code}{': ' + run.error if run.error else ''})"
            self._outage = (last.start + (last.duration or 0.0), why, self._stats.attempts)
            log.warning("recorder %s: %s", self.folder, why)
        elif run.first is None and run.error is None and code != 0:
            self._stats.last_error = f"ffmpeg exit code {code}"
        return events

    def _close_outage_at_stop(self) -> list[RecorderEvent]:
        """Stopped while the source was down: the outage so far is a gap (a later start continues from its end)."""
        if self._outage is None or self._stats.connects == 0:
            return []
        since, why, _ = self._outage
        now = time.time()
        if now <= since:
            return []
        gap = Gap(self._next_run, _dt(since), _dt(now), f"{why}; recorder stopped before the source came back")
        self._next_run += 1
        _append(self.folder / GAPS_NAME, [gap.to_json()])
        self._stats.gaps += 1
        self._outage = None
        return [RecorderEvent(GAP, gap=gap)]

    def _segment(self, run: _Run, s: _Seg) -> Segment:
        return Segment(self.folder / s.file, run.number, _dt(s.start), s.pts, s.duration)

    def _emit(self, events: list[RecorderEvent]) -> None:
        """Outside the lock: a callback may call back into the recorder (e.g. retain)."""
        if not events:
            return
        with self._lock:
            subscribers = list(self._subscribers)
        for ev in events:
            for q in subscribers:
                try:
                    q.put_nowait(ev)
                except queue.Full:
                    log.warning("recorder %s: a subscriber's queue is full; event dropped", self.folder)
            if self.on_event is not None:
                try:
                    self.on_event(ev)
                except Exception:  # noqa: BLE001 - a consumer's bug must not stop the recording
                    log.exception("recorder %s: on_event failed", self.folder)
