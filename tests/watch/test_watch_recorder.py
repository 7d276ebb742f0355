"""The live-watch recorder and clips, with real parts: ffmpeg serves a live H.264/MPEG-TS stream on loopback TCP
(or appends one to a growing file), and the recorder's ffmpeg records it. The sources stamp every frame's pts with
the wall clock it was made at (pts = RTCTIME - E), which gives the truth the index's wall-clock times are checked
against. Waits are on conditions with timeouts; the only deliberate sleep is the 10 s outage."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from watch_helpers import FPS, GOP, GrowingFile, LiveSource, free_port, stamped_encode_args, wait_until

from vidmini.watch.clips import RangeNotRecorded, cut_clip
from vidmini.watch.recorder import (
    BACKOFF,
    CLOSED,
    CONNECTING,
    GAP,
    INDEX_NAME,
    OPENED,
    RECORDING,
    STOPPED,
    Backoff,
    Recorder,
    RecorderEvent,
    read_gaps,
    read_segments,
)

pytestmark = pytest.mark.skipif(not (shutil.which("ffmpeg") and shutil.which("ffprobe")),
                                reason="needs the ffmpeg and ffprobe CLIs")

FAST = Backoff(base_s=0.2, factor=2.0, max_s=1.0, jitter=0.1)


@pytest.fixture
def live_source(tmp_path):
    src = LiveSource(tmp_path, time.time() - 100)
    src.start()
    yield src
    src.kill()


@pytest.fixture
def recorders():
    made: list[Recorder] = []

    def make(source, folder: Path, **kw) -> tuple[Recorder, list[RecorderEvent]]:
        events: list[RecorderEvent] = []
        rec = Recorder(source, folder, on_event=events.append, **kw)
        made.append(rec)
        return rec.start(), events

    yield make
    for rec in made:
        rec.stop()


@pytest.fixture(scope="module")
def ten_second_ts(tmp_path_factory) -> Path:
    """A finished 10 s stream (frame n at pts n/10 s): a growing-file source the recorder takes in one go."""
    path = tmp_path_factory.mktemp("src") / "ten.ts"
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi",
                    "-i", f"testsrc2=size=160x120:rate={FPS}", "-t", "10", "-c:v", "libx264", "-preset", "ultrafast",
                    "-g", str(GOP), "-f", "mpegts", str(path)], check=True, timeout=60)
    return path


def kinds(events: list[RecorderEvent], kind: str) -> list[RecorderEvent]:
    return [e for e in list(events) if e.kind == kind]


def ffprobe(path: Path, *args: str) -> dict:
    out = subprocess.run(["ffprobe", "-v", "error", *args, "-of", "json", str(path)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def processes_naming(text: str) -> list[str]:
    """Command lines of the processes that mention `text` (the recorder's folder)."""
    found = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and p.name != str(os.getpid()):
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in cmd:
                found.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found


def first_frame(path: Path, select: str | None = None) -> bytes:
    """The first (or the selected) decoded picture, as gray bytes."""
    vf = ["-vf", select] if select else []
    out = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path), *vf,
                          "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
                         capture_output=True, timeout=30, check=True)
    return out.stdout


def test_backoff_grows_capped_and_jittered():
    b = Backoff(base_s=1.0, factor=2.0, max_s=10.0, jitter=0.2)
    rng = random.Random(1)
    for attempt, raw in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (50, 10.0)]:
        delays = [b.delay(attempt, rng) for _ in range(50)]
        assert all(raw * 0.8 - 1e-9 <= d <= min(10.0, raw * 1.2) + 1e-9 for d in delays)
        assert len(set(delays)) > 1  # jittered
    with pytest.raises(ValueError):
        Backoff(base_s=5.0, max_s=1.0)


@pytest.mark.slow
def test_live_stream_indexed_by_wall_clock_readable_while_recording_and_stopped_cleanly(
        tmp_path, live_source, recorders):
    folder = tmp_path / "rec"
    rec, events = recorders(live_source.url, folder, segment_s=2, stall_s=5, backoff=FAST)
    wait_until(lambda: len(kinds(events, CLOSED)) >= 2 and rec.current is not None, 20, "two closed segments")
    assert rec.state == RECORDING and rec.pid is not None

    # the segment being written is a valid stream already, and listed without a duration
    current = rec.current
    wait_until(lambda: current.path.stat().st_size > 0, 5, "the first packet in the open segment")
    probed = ffprobe(current.path, "-count_packets", "-select_streams", "v:0",
                     "-show_entries", "stream=codec_name,nb_read_packets")["streams"][0]
    assert probed["codec_name"] == "h264" and int(probed["nb_read_packets"]) > 0
    assert rec.segments()[-1].file == current.file and rec.segments()[-1].duration is None
    closed = rec.segments()[0]
    assert abs(float(ffprobe(closed.path, "-show_entries", "format=duration")["format"]["duration"]) - 2.0) < 0.15

    pid = rec.pid
    rec.stop()
    assert rec.state == STOPPED and rec.pid is None
    assert not Path(f"/proc/{pid}").exists()
    assert processes_naming(str(folder)) == []
    segs = rec.segments()
    assert len(segs) >= 3 and all(s.duration is not None for s in segs)  # the last one finalized by stop()
    assert segs[-1].duration > 0 and segs[-1].file == current.file
    assert sorted(p.name for p in folder.glob("seg-*.ts")) == [s.file for s in segs]
    for e in kinds(events, OPENED):  # every opened segment was closed, in order
        assert any(c.segment.file == e.segment.file for c in kinds(events, CLOSED))

    # wall clock: each segment's first frame was made at epoch + its source pts; source pts = the first packet
    # the server sent + the segment's pts on the recording's timeline
    origin = live_source.epoch + live_source.first_pts() - segs[0].pts
    for s in segs:
        assert abs(s.start.timestamp() - (origin + s.pts)) < 1.0, s
        assert s.start.utcoffset() == timedelta(0)
    for a, b in zip(segs, segs[1:], strict=False):  # back to back
        assert abs((b.start - a.end).total_seconds()) < 0.1
    for line in (folder / INDEX_NAME).read_text().splitlines():  # ISO 8601 with the time zone
        assert re.search(r'"start": "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+\+00:00"', line)


@pytest.mark.slow
def test_outage_reconnects_with_backoff_and_records_the_gap(tmp_path, live_source, recorders):
    folder = tmp_path / "rec"
    rec, events = recorders(live_source.url, folder, segment_s=2, stall_s=5, backoff=FAST)
    followed = rec.subscribe()
    wait_until(lambda: kinds(events, CLOSED), 20, "a closed segment")

    killed_at = time.time()
    live_source.kill()
    wait_until(lambda: rec.stats.drops == 1, 10, "the drop")
    wait_until(lambda: rec.state in (BACKOFF, CONNECTING) and rec.stats.failures >= 1, 10, "failed reconnects")
    time.sleep(max(0.0, killed_at + 10 - time.time()))  # the deliberate outage
    back_at = time.time()
    live_source.start()

    deadline = time.monotonic() + 15
    while (event := followed.get(timeout=max(0.01, deadline - time.monotonic()))).kind != GAP:
        pass
    assert event.gap.run == 1 and event.gap.start.timestamp() < back_at
    wait_until(lambda: any(e.segment.run == 1 for e in kinds(events, CLOSED)), 15, "recording again")
    assert rec.state == RECORDING
    stats = rec.stats
    assert stats.connects == 2 and stats.attempts >= 4 and stats.failures == 0  # several refused, then back

    (gap,) = rec.gaps()
    assert abs(gap.start.timestamp() - killed_at) < 2.0, gap
    assert abs(gap.end.timestamp() - back_at) < 2.0, gap
    assert "source ended" in gap.reason and "attempts" in gap.reason
    before = [s for s in rec.segments() if s.run == 0]
    after = [s for s in rec.segments() if s.run == 1]
    assert abs((before[-1].end - gap.start).total_seconds()) < 0.001
    assert abs((after[0].start - gap.end).total_seconds()) < 0.001
    # the new server's frames: still on the wall clock
    origin = live_source.epoch + live_source.first_pts(1) - after[0].pts
    assert abs(after[0].start.timestamp() - origin - after[0].pts) < 1.0

    with pytest.raises(RangeNotRecorded, match="gap"):
        cut_clip(rec.segments(), gap.start - timedelta(seconds=0.5), gap.end + timedelta(seconds=0.5),
                 tmp_path / "across.mp4")
    rec.stop()
    assert processes_naming(str(folder)) == []


@pytest.mark.slow
def test_growing_file_followed_through_a_stall(tmp_path, recorders):
    source = tmp_path / "camera.ts"
    epoch = time.time() - 100
    writer = GrowingFile(source, epoch)
    writer.start()
    wait_until(lambda: source.exists() and source.stat().st_size > 0, 10, "the writer's first bytes")
    rec, events = recorders(source, tmp_path / "rec", segment_s=2, stall_s=2, backoff=FAST)
    wait_until(lambda: len(kinds(events, CLOSED)) >= 2, 20, "two closed segments")

    first_pts = float(ffprobe(source, "-select_streams", "v:0", "-read_intervals", "%+#1",
                              "-show_entries", "packet=pts_time")["packets"][0]["pts_time"])
    origin = epoch + first_pts - rec.segments()[0].pts
    for s in rec.segments():
        assert abs(s.start.timestamp() - (origin + s.pts)) < 1.0, s

    writer.stop()  # the file stops growing: after stall_s the run ends
    stopped_at = time.time()
    wait_until(lambda: rec.stats.drops == 1, 10, "the stall")
    assert rec.stats.stalls >= 1
    time.sleep(max(0.0, stopped_at + 4 - time.time()))  # the deliberate outage
    resumed_at = time.time()
    writer.start()  # appends a new stream to the same file
    wait_until(lambda: any(e.segment.run > 0 for e in kinds(events, CLOSED)), 20, "recording again")

    (gap,) = rec.gaps()
    assert "no data for 2 s" in gap.reason
    assert abs(gap.start.timestamp() - stopped_at) < 2.0 and abs(gap.end.timestamp() - resumed_at) < 2.0, gap
    # resumed at the byte it had reached: the new run starts with the new writer, nothing is recorded twice
    before = [s for s in rec.segments() if s.run == 0]
    after = [s for s in rec.segments() if s.run > 0]
    assert after[0].start >= before[-1].end and after[0].start >= gap.end - timedelta(seconds=0.001)
    writer.stop()
    rec.stop()


class Pictures:
    """The decoded pictures of an MPEG-TS file (gray, hashed) with their pts: what a recording holds, comparable with
    its source frame by frame (stream copy: a recorded frame decodes to the source's picture)."""

    def __init__(self, path: Path) -> None:
        raw = subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-i", str(path),
                              "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "gray", "pipe:1"],
                             capture_output=True, timeout=120, check=True).stdout
        size = 160 * 120
        self.hashes = [hashlib.md5(raw[i:i + size]).hexdigest() for i in range(0, len(raw), size)]
        frames = ffprobe(path, "-select_streams", "v:0", "-show_entries", "frame=pts_time")["frames"]
        self.pts = [float(f["pts_time"]) for f in frames]
        assert len(self.pts) == len(self.hashes)


def check_recorded_once(source: Path, folder: Path, epoch: float) -> tuple[list[int], list[list[int]]]:
    """Every recorded picture is one of the source's, none twice, in the source's order; each segment's start is
    the wall clock its first frame was made at (the source's pts + epoch). Returns the source frame numbers
    recorded, and per run."""
    src = Pictures(source)
    assert len(set(src.hashes)) == len(src.hashes)  # testsrc2's pictures are all different
    number = {h: i for i, h in enumerate(src.hashes)}
    recorded, by_run = [], {}
    for seg in read_segments(folder):
        got = Pictures(seg.path)
        unknown = [h for h in got.hashes if h not in number]
        assert not unknown, f"{seg.file}: {len(unknown)} pictures not in the source (a frame cut short)"
        frames = [number[h] for h in got.hashes]
        recorded += frames
        by_run.setdefault(seg.run, []).extend(frames)
        made_at = epoch + src.pts[frames[0]]
        assert abs(seg.start.timestamp() - made_at) < 1.0, (seg, seg.start.timestamp() - made_at)
    assert len(set(recorded)) == len(recorded), "recorded twice: " + str(
        sorted({f for f in recorded if recorded.count(f) > 1})[:20])
    assert recorded == sorted(recorded)
    return recorded, [by_run[r] for r in sorted(by_run)]


@pytest.mark.slow
def test_growing_file_resumed_after_a_restart_where_recording_got_to(tmp_path):
    """The service restarts (the recorder is stopped cleanly, a new one opens the same folder) while the file goes
    on growing: the new recorder reads on from the byte the old one had fed (it is in the folder), so what was
    written meanwhile is caught up, nothing is recorded twice and the caught-up burst gets the wall clock the
    frames were made at."""
    source, folder = tmp_path / "camera.ts", tmp_path / "rec"
    epoch = time.time() - 100
    writer = GrowingFile(source, epoch)
    writer.start()
    try:
        wait_until(lambda: source.exists() and source.stat().st_size > 0, 10, "the writer's first bytes")
        first = Recorder(source, folder, segment_s=2, stall_s=5, backoff=FAST).start()
        wait_until(lambda: first.stats.segments_closed >= 3, 30, "three closed segments")
        first.stop()
        time.sleep(4)  # the service is down; the camera goes on writing
        second = Recorder(source, folder, segment_s=2, stall_s=5, backoff=FAST).start()
        wait_until(lambda: second.stats.segments_closed >= 4, 30, "four closed segments after the restart")
        second.stop()
    finally:
        writer.stop()
    recorded, (run0, run1) = check_recorded_once(source, folder, epoch)
    missing = run1[0] - run0[-1] - 1
    assert 0 <= missing <= GOP  # at most the frames from the cut to the next keyframe; the 4 s down caught up
    assert run1[-1] - run1[0] + 1 >= 4 * 2 * FPS - GOP
    assert sum(g.duration_s for g in read_gaps(folder)) <= (GOP + 1) / FPS


@pytest.mark.slow
def test_growing_file_resumed_after_the_service_was_killed_nothing_recorded_twice(tmp_path):
    """The recorder's process is killed outright (SIGKILL, and its ffmpeg with it) while the file grows; a new
    one resumes from the byte position saved before each piece was handed to ffmpeg: what was in flight is lost
    (a gap), nothing is recorded twice."""
    source, folder = tmp_path / "camera.ts", tmp_path / "rec"
    epoch = time.time() - 100
    writer = GrowingFile(source, epoch)
    writer.start()
    script = ("import sys, time\n"
              "from vidmini.watch.recorder import Recorder\n"
              "Recorder(sys.argv[1], sys.argv[2], segment_s=2, stall_s=5).start()\n"
              "time.sleep(3600)\n")
    child = None
    try:
        wait_until(lambda: source.exists() and source.stat().st_size > 0, 10, "the writer's first bytes")
        child = subprocess.Popen([sys.executable, "-c", script, str(source), str(folder)])
        wait_until(lambda: len([s for s in read_segments(folder) if s.duration is not None]) >= 3, 30,
                   "three closed segments")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        wait_until(lambda: processes_naming(str(folder)) == [], 10, "its ffmpeg gone with it")
        time.sleep(3)
        rec = Recorder(source, folder, segment_s=2, stall_s=5, backoff=FAST).start()
        wait_until(lambda: rec.stats.segments_closed >= 3, 30, "three closed segments after the restart")
        rec.stop()
    finally:
        if child is not None and child.poll() is None:
            child.kill()
        writer.stop()
    recorded, (run0, run1) = check_recorded_once(source, folder, epoch)
    assert run1[0] - run0[-1] - 1 <= 2 * FPS + GOP  # lost: what was in flight, up to the next keyframe
    (gap,) = read_gaps(folder)
    assert gap.run == 1 and "not running" in gap.reason


def test_a_restarted_recorder_reads_a_container_that_cannot_be_joined_midway_from_its_start(tmp_path):
    """Only MPEG-TS is resumed at the saved byte across restarts: a Matroska file (OBS' default) cannot be demuxed
    from the middle, so a new recorder reads it from its header again rather than failing on every attempt."""
    source = tmp_path / "obs.mkv"
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-f", "lavfi",
                    "-i", f"testsrc2=size=160x120:rate={FPS}", "-t", "3", "-c:v", "libx264", "-preset", "ultrafast",
                    "-g", str(GOP), str(source)], check=True, timeout=60)
    folder = tmp_path / "rec"
    for n in (1, 2):
        rec = Recorder(source, folder, segment_s=10, stall_s=1, backoff=FAST).start()
        wait_until(lambda rec=rec: rec.stats.drops == 1, 20, "the file taken in and the stall after it")
        rec.stop()
        assert rec.stats.connects == 1, rec.stats  # it recorded (a demuxer joined midway would record nothing)
        assert [s.run for s in read_segments(folder)] == list(range(n))


class UdpCamera:
    """ffmpeg pushing a stamped stream as UDP datagrams to 127.0.0.1:`port`, whether anyone listens or not."""

    def __init__(self, epoch: float) -> None:
        self.port = free_port()
        self.url = f"udp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error",
                                      *stamped_encode_args(epoch), f"{self.url}?pkt_size=1316"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("camera_on", [False, True], ids=["camera-quiet", "camera-sending"])
def test_stopping_a_udp_recorder_is_quick_and_leaves_the_last_segment_whole(tmp_path, recorders, camera_on):
    """ffmpeg waiting in a UDP read does not act on a first SIGINT until a datagram comes (a camera that went quiet:
    never); stop() still ends it within about a second, and the segment it was writing is closed properly and
    readable to its last frame."""
    camera = UdpCamera(time.time() - 100)
    folder = tmp_path / "rec"
    try:
        rec, events = recorders(camera.url, folder, segment_s=4, stall_s=30, backoff=FAST)
        wait_until(lambda: len(kinds(events, CLOSED)) >= 1, 30, "a closed segment")

        def well_into_a_segment() -> bool:  # so that the one cut short by stop() has a second or two in it
            current, last_data = rec.current, rec.stats.last_data
            return current is not None and 1.0 < (last_data - current.start).total_seconds() < 2.5

        wait_until(well_into_a_segment, 10, "a segment a second old")
        if not camera_on:
            camera.kill()
            time.sleep(1.0)  # the recorder's ffmpeg now waits for a datagram that will not come
        current = rec.current
        pid = rec.pid
        began = time.monotonic()
        rec.stop()
        took = time.monotonic() - began
    finally:
        camera.kill()
    assert took < 1.5, f"stop() took {took:.2f} s"
    assert not Path(f"/proc/{pid}").exists() and processes_naming(str(folder)) == []
    last = rec.segments()[-1]
    assert last.file == current.file and last.duration is not None and last.duration > 0
    assert any(e.segment.file == last.file for e in kinds(events, CLOSED))  # listed by ffmpeg: a clean close
    probed = ffprobe(last.path, "-count_frames", "-select_streams", "v:0",
                     "-show_entries", "stream=nb_read_frames:format=duration")
    frames = int(probed["streams"][0]["nb_read_frames"])
    assert abs(frames - last.duration * FPS) <= 1.5, (frames, last.duration)  # every frame of it decodes
    assert abs(float(probed["format"]["duration"]) - last.duration) < 0.2


def test_retain_by_age_and_by_bytes_never_the_segment_being_written(tmp_path, ten_second_ts, recorders):
    folder = tmp_path / "rec"
    rec, events = recorders(ten_second_ts, folder, segment_s=1, stall_s=30, backoff=FAST)
    # the whole file goes through at once; the last segment stays open while ffmpeg waits for more
    wait_until(lambda: len(kinds(events, CLOSED)) >= 9 and rec.current is not None, 20, "nine closed segments")
    segs = rec.segments()
    assert len(segs) == 10 and segs[-1].duration is None
    current = rec.current.file

    removed = rec.retain(max_age_s=100, now=segs[3].end + timedelta(seconds=100))
    assert [s.file for s in removed] == [s.file for s in segs[:4]]
    assert not any(s.path.exists() for s in removed)
    left = rec.segments()
    assert [s.file for s in left] == [s.file for s in segs[4:]]
    assert len((folder / INDEX_NAME).read_text().splitlines()) == len(left)  # rewritten, one line each

    budget = sum(s.path.stat().st_size for s in left[-3:])
    removed = rec.retain(max_bytes=budget)
    assert [s.file for s in removed] == [s.file for s in left[:-3]]
    assert [s.file for s in rec.segments()] == [s.file for s in left[-3:]]

    assert len(rec.retain(max_age_s=0, now=time.time() + 3600)) == 2
    assert rec.retain(max_bytes=0) == []  # only the segment being written is left: it stays
    assert [s.file for s in rec.segments()] == [current]
    assert sorted(p.name for p in folder.glob("seg-*.ts")) == [current]
    assert not list(folder.glob(".*.tmp"))

    rec.stop()  # ffmpeg finishes it; retain may take it now
    (last,) = rec.segments()
    assert last.file == current and last.duration is not None
    assert [s.file for s in rec.retain(max_bytes=0)] == [current]
    assert read_segments(folder) == [] and not list(folder.glob("seg-*.ts"))


def test_cut_clip_across_a_segment_boundary_and_unrecorded_ranges(tmp_path, ten_second_ts, recorders):
    folder = tmp_path / "rec"
    rec, events = recorders(ten_second_ts, folder, segment_s=2, stall_s=30, backoff=FAST)
    wait_until(lambda: len(kinds(events, CLOSED)) >= 4, 20, "four closed segments")
    rec.stop()
    segs = rec.segments()
    assert [s.duration for s in segs] == pytest.approx([2, 2, 2, 2, 2], abs=0.01)

    start = segs[1].start + timedelta(seconds=1.4)
    end = segs[2].start + timedelta(seconds=0.6)  # 1.2 s across the boundary of segments 1 and 2
    for pad, name in [(0.5, "clip.mp4"), (2.0, "padded.mp4"), (0.5, "clip.ts")]:
        clip = cut_clip(segs, start, end, tmp_path / name, pad_s=pad)
        asked = (end - start).total_seconds() + 2 * pad
        duration = float(ffprobe(clip.path, "-show_entries", "format=duration")["format"]["duration"])
        assert asked - 0.15 <= duration <= asked + GOP / FPS + 0.15, (name, duration, asked)
        assert start - timedelta(seconds=pad + GOP / FPS + 0.01) <= clip.start <= start - timedelta(seconds=pad)
        # its first picture is the source's frame at the clip's keyframe (source frame n has pts n/10 s)
        first = clip.segments[0]
        n = round((first.pts + (clip.start - first.start).total_seconds()) * FPS)
        assert first_frame(clip.path) == first_frame(ten_second_ts, rf"select=eq(n\,{n})")
    assert [s.file for s in cut_clip(segs, start, end, tmp_path / "c.mp4", pad_s=0.5).segments] == \
        [segs[1].file, segs[2].file]
    head = (tmp_path / "clip.mp4").read_bytes()
    assert 0 < head.find(b"moov") < head.find(b"mdat")  # +faststart: the index before the media

    # pads stop where the recording does
    clip = cut_clip(segs, segs[0].start, segs[0].start + timedelta(seconds=1), tmp_path / "edge.mp4")
    assert clip.start == segs[0].start

    with pytest.raises(RangeNotRecorded, match="before the oldest"):
        cut_clip(segs, segs[0].start - timedelta(seconds=30), segs[0].start - timedelta(seconds=20),
                 tmp_path / "x.mp4")
    with pytest.raises(RangeNotRecorded, match="ends at"):
        cut_clip(segs, segs[-1].end - timedelta(seconds=1), segs[-1].end + timedelta(seconds=5),
                 tmp_path / "x.mp4")
    rec.retain(max_bytes=segs[-1].path.stat().st_size)  # only the last segment left
    with pytest.raises(RangeNotRecorded, match="retained away"):
        cut_clip(segs, start, end, tmp_path / "x.mp4")
    assert not (tmp_path / "x.mp4").exists()
