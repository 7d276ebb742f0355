"""The source kinds a watch follows besides TCP, UDP and growing files, each with a real server on loopback: a live
HLS playlist (ffmpeg writing a rolling playlist, a Python HTTP server as the origin) watched end to end with the
demo model; SRT (ffmpeg as the listener, the recorder calling); RTSP (a small RTSP server in the test helpers
relaying ffmpeg's RTP, as an IP camera serves it; no RTSP server is packaged here). Their frames carry the wall clock they were
made at as pts (see `watch_helpers.stamp_filter`): the truth for the recorder's wall-clock estimates. The only
deliberate sleeps are the outages."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from watch_helpers import HlsOrigin, LiveSource, RtspCamera, wait_until

from vidmini.watch.recorder import CLOSED, GAP, RECORDING, Backoff, Recorder, RecorderEvent
from vidmini.watch.rules import RuleSpec
from vidmini.watch.spec import WatchFolders, WatchSpec

pytestmark = pytest.mark.skipif(not (shutil.which("ffmpeg") and shutil.which("ffprobe")),
                                reason="needs the ffmpeg and ffprobe CLIs")

FAST = Backoff(base_s=0.2, factor=2.0, max_s=1.0, jitter=0.1)
HLS_TIME = 2.0


def ffmpeg_has_protocol(name: str) -> bool:
    out = subprocess.run(["ffmpeg", "-hide_banner", "-protocols"], capture_output=True, text=True, timeout=30)
    return name in out.stdout.split()


def video_frames(path: Path) -> int:
    """Frames decoded from a recorded segment."""
    out = subprocess.run(["ffprobe", "-v", "error", "-count_frames", "-select_streams", "v:0",
                          "-show_entries", "stream=nb_read_frames", "-of", "json", str(path)],
                         capture_output=True, text=True, timeout=60, check=True)
    return int(json.loads(out.stdout)["streams"][0]["nb_read_frames"])


@pytest.mark.slow
def test_a_live_hls_playlist_watched_through_an_origin_outage(demo_engine, tmp_path):
    """The watch follows http://.../live.m3u8 (2 s media segments, 5 in the playlist, old ones deleted): frames are
    recorded and judged; the origin goes away for 10 s (the playlist goes on being written): the recorder
    reconnects with backoff, resumes from the playlist's window (3 segments back: part of the outage is
    recovered), records the rest as a gap, and the frames after it are judged. Wall-clock times are late by
    HLS' latency (a segment is fetched after it is complete), never early."""
    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline
    from vidmini.watch.runner import WatchRunner

    timeline = generate_timeline(4150, 60)
    spans = {w.text: (w.t_in, w.t_out) for w in timeline.words}
    assert spans["RED"][1] < 12 and 26 < spans["SUN"][0]  # before the outage, and after it
    video = write_video(timeline, tmp_path / "world.mp4")
    epoch = time.time() - 100
    origin = HlsOrigin(tmp_path / "origin", video, epoch, hls_time=HLS_TIME, list_size=5)
    folders = WatchFolders(tmp_path / "home")
    spec = folders.add(WatchSpec("lobby", origin.url, retain_s=3600, segment_s=4,
                                 rules=tuple(RuleSpec(f'the word "{w}" appears', name=w).to_dict()
                                             for w in ("RED", "SUN"))))
    alerts = []
    runner = WatchRunner(spec, folders, demo_engine, alerts.append, stall_s=3.0, recorder_options={"backoff": FAST})
    try:
        origin.start_serving()
        wait_until(lambda: (origin.www / "live.m3u8").exists(), 30, "the first playlist")
        runner.start()
        # recorded until well past RED's showing (and the outage well before SUN's), and judged as it comes
        wait_until(lambda: sum(s.duration or 0 for s in runner.recorder.segments()) >= 12, 60, "12 s recorded")
        wait_until(lambda: runner.status().frames >= 3, 30, "frames judged")
        before = runner.status()
        assert before.state == RECORDING and before.gaps == 0 and before.error is None

        stopped_at = time.time()
        origin.stop_serving()
        wait_until(lambda: runner.recorder.stats.drops == 1, 20, "the drop")
        wait_until(lambda: runner.recorder.stats.failures >= 2, 10, "refused reconnects")
        time.sleep(max(0.0, stopped_at + 10 - time.time()))  # the deliberate outage
        back_at = time.time()
        origin.start_serving()
        wait_until(lambda: runner.recorder.stats.connects == 2, 20, "reconnected")
        assert origin.writer.wait(timeline.duration_s + 60) == 0  # the whole video has been written
        # the frames recorded after the outage are judged, to the last segment
        wait_until(lambda: runner.recorder.state != RECORDING, 20, "the end of the stream (a drop)")
        recorded_until = max(s.end for s in runner.recorder.segments() if s.duration is not None)
        wait_until(lambda: runner.status().last_frame is not None and recorded_until - timedelta(seconds=2)
                   <= datetime.fromisoformat(runner.status().last_frame), 90,
                   "the frames after the outage judged")
        status = runner.status()
    finally:
        runner.stop()
        origin.close()
    assert status.error is None and status.gaps >= 1

    segs = runner.recorder.segments()
    runs = sorted({s.run for s in segs})
    assert runs[:2] == [0, 1]
    assert all(video_frames(s.path) > 0 for s in segs)
    # the truth: run r's first frame is the first frame of the first media segment served to it
    first_served = [origin.served_after(0)[0], origin.served_after(back_at)[0]]
    lateness = {}
    for s in [s for s in segs if s.run in (0, 1)]:
        made_at = epoch + origin.first_pts(first_served[s.run]) + s.pts
        lateness[s.file] = late = s.start.timestamp() - made_at
        assert -0.3 <= late <= 2 * HLS_TIME + 1.0, (s, late)  # fetched once complete, at a reload

    gap = runner.recorder.gaps()[0]
    last0 = [s for s in segs if s.run == 0][-1]
    first1 = [s for s in segs if s.run == 1][0]
    assert gap.run == 1 and "source ended" in gap.reason and "attempts" in gap.reason
    assert abs((gap.start - last0.end).total_seconds()) < 0.001
    assert abs((gap.end - first1.start).total_seconds()) < 0.001
    assert stopped_at - 2 * HLS_TIME - 1 <= gap.start.timestamp() <= stopped_at + 2 * HLS_TIME + 1
    # the playlist's window (5 x 2 s, played from 3 segments back) recovered part of the 10 s, not all of it
    assert 0 < gap.duration_s <= back_at - stopped_at, gap
    assert first1.start.timestamp() < back_at

    # the rules saw RED before the outage and SUN after it, when the origin says they were shown
    t0 = epoch + origin.first_pts(first_served[0])  # the wall clock the video's first frame was made at
    news = {a.rule: a for a in alerts if a.kind == "new"}
    assert {"RED", "SUN"} <= set(news), [a.key for a in alerts]
    print(f"\nHLS: segments late by {sorted(round(v, 2) for v in lateness.values())} s; gap {gap.duration_s:.1f} s "
          f"of an outage of {back_at - stopped_at:.1f} s; alerts late by "
          f"{[round(datetime.fromisoformat(news[w].start).timestamp() - t0 - spans[w][0], 2) for w in news]} s")
    for word in ("RED", "SUN"):
        shown = t0 + spans[word][0]
        started = datetime.fromisoformat(news[word].start).timestamp()
        assert shown - 1.5 <= started <= shown + 2 * HLS_TIME + 2.5, (word, started - shown)
    assert news["RED"].start < gap.start.isoformat() < news["SUN"].start


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("ffmpeg") or not ffmpeg_has_protocol("srt"),
                    reason="this ffmpeg has no SRT (libsrt)")
def test_srt_caller_records_and_reconnects_after_the_camera_restarts(tmp_path):
    """ffmpeg is an SRT listener (a camera or encoder), the recorder the caller: frames arrive on the wall clock;
    the camera dies and comes back 6 s later on the same port: the recorder notices, calls again with backoff,
    and records the outage as a gap."""
    source = LiveSource(tmp_path, time.time() - 100, protocol="srt")
    source.start()
    events: list[RecorderEvent] = []
    # stall_s also bounds the wait for the first data of an attempt: an SRT call waits up to 3 s for the listener
    rec = Recorder(source.url, tmp_path / "rec", segment_s=2, stall_s=5, backoff=FAST, on_event=events.append)
    followed = rec.subscribe()
    try:
        rec.start()
        wait_until(lambda: len([e for e in events if e.kind == CLOSED]) >= 2, 30, "two closed segments")
        assert rec.state == RECORDING
        killed_at = time.time()
        source.kill()
        wait_until(lambda: rec.stats.drops == 1, 15, "the drop")  # the silence, or SRT giving up on its peer
        time.sleep(max(0.0, killed_at + 6 - time.time()))  # the deliberate outage
        back_at = time.time()
        source.start()
        deadline = time.monotonic() + 20
        while (event := followed.get(timeout=max(0.01, deadline - time.monotonic()))).kind != GAP:
            pass
        assert event.gap.run == 1 and event.gap.start.timestamp() < back_at
        wait_until(lambda: any(e.kind == CLOSED and e.segment.run == 1 for e in events), 20, "recording again")
    finally:
        rec.stop()
        source.kill()
    stats = rec.stats
    assert stats.connects == 2 and stats.failures == 0
    segs = rec.segments()
    assert all(s.duration is not None for s in segs) and all(video_frames(s.path) > 0 for s in segs)
    errors = []
    for s in segs:  # each segment's first frame was made at epoch + the server's first pts + its pts in the run
        made_at = source.epoch + source.first_pts(s.run) + s.pts
        errors.append(round(s.start.timestamp() - made_at, 3))
        assert abs(errors[-1]) < 1.0, (s, errors[-1])
    print(f"\nSRT: segment starts minus when their first frame was made: {errors} s")
    (gap,) = rec.gaps()
    assert gap.reason.startswith(("no data for 5 s", "source ended")) and "attempt" in gap.reason
    assert abs(gap.start.timestamp() - killed_at) < 1.5 and abs(gap.end.timestamp() - back_at) < 2.0, gap


@pytest.mark.slow
def test_rtsp_camera_recorded_over_tcp_and_reconnected_after_it_reboots(tmp_path):
    """An IP camera's RTSP stream (DESCRIBE / SETUP with RTP interleaved on the TCP connection / PLAY): the
    recorder's ffmpeg plays it (`-rtsp_transport tcp`, the recorder's default), joining the stream mid-GOP; frames
    arrive on the wall clock they were made at. The camera reboots (server, encoder and connection gone, back
    on the same port 6 s later): the recorder reconnects with backoff and records the outage as a gap."""
    camera = RtspCamera(tmp_path, time.time() - 100)
    camera.start()
    events: list[RecorderEvent] = []
    rec = Recorder(camera.url, tmp_path / "rec", segment_s=2, stall_s=3, backoff=FAST, on_event=events.append)
    assert rec.command()[rec.command().index("-rtsp_transport") + 1] == "tcp"
    try:
        rec.start()
        wait_until(lambda: len([e for e in events if e.kind == CLOSED]) >= 2, 30, "two closed segments")
        killed_at = time.time()
        camera.kill()
        wait_until(lambda: rec.stats.drops == 1, 15, "the drop")
        wait_until(lambda: rec.stats.failures >= 1, 10, "a refused reconnect")
        time.sleep(max(0.0, killed_at + 6 - time.time()))  # the deliberate outage
        back_at = time.time()
        camera.start()
        wait_until(lambda: any(e.kind == CLOSED and e.segment.run == 1 for e in events), 30, "recording again")
    finally:
        rec.stop()
        camera.kill()
    assert rec.stats.connects == 2 and len(camera.joined) == 2
    segs = rec.segments()
    assert all(s.duration is not None for s in segs) and all(video_frames(s.path) > 0 for s in segs)
    errors = []
    for s in segs:  # the run's pts 0 is the first keyframe the client got; the truth from the RTP timestamps
        made_at = camera.epoch + camera.first_pts(s.run) + s.pts
        errors.append(round(s.start.timestamp() - made_at, 3))
        assert abs(errors[-1]) < 1.0, (s, errors[-1])
    print(f"\nRTSP: segment starts minus when their first frame was made: {errors} s")
    (gap,) = rec.gaps()
    assert gap.run == 1 and "source ended" in gap.reason and "attempts" in gap.reason
    assert abs(gap.start.timestamp() - killed_at) < 1.5 and abs(gap.end.timestamp() - back_at) < 2.0, gap
