"""Rolling retention of a whole watch: a live camera (UDP, real time) recorded in 2 s segments under a byte budget
of about three segments. Old segments go with their stores, the state forgets them, the one being written stays,
and the watch's disk use stops growing once the ring is full (long runs: research/bench/watch.py)."""

from __future__ import annotations

import time

from watch_helpers import Camera, wait_until

from vidmini.watch.recorder import read_segments
from vidmini.watch.spec import WatchFolders, WatchSpec


def test_old_segments_and_their_stores_are_removed_and_disk_use_stays_bounded(demo_engine, tmp_path):
    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline
    from vidmini.watch.runner import WatchRunner

    mp4 = write_video(generate_timeline(4201, 24), tmp_path / "world.mp4")
    sent = Camera.encode(mp4, tmp_path / "camera.ts")
    per_segment = sent.stat().st_size / 12
    camera = Camera(sent, "udp", copy=True)
    folders = WatchFolders(tmp_path / "home")
    spec = folders.add(WatchSpec("ring", camera.url, retain_s=None, retain_bytes=int(3.5 * per_segment),
                                 segment_s=2, rules=({"event": 'the word "RED" appears'},)))
    clips = folders.folder("ring") / "clips"
    clips.mkdir()
    now_ms = int(time.time() * 1000)
    (clips / f"{now_ms - 3_600_000}-old-event.mp4").write_bytes(b"an event an hour before the recording kept")
    (clips / f"{now_ms + 3_600_000}-new-event.mp4").write_bytes(b"an event after it")
    alerts = []
    runner = WatchRunner(spec, folders, demo_engine, alerts.append, stall_s=2.0, retain_every_s=0.0).start()
    folder = folders.folder("ring")
    disk: list[int] = []

    def size(path) -> int:  # retention may remove a file between the listing and this
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def judged_all() -> bool:
        disk.append(sum(size(p) for p in (folder / "segments").glob("seg-*.ts")))
        return runner.status().frames >= 20
    try:
        wait_until(judged_all, 90, "the recording judged")
        runner.retain()
    finally:
        runner.stop()
        camera.kill()
    segments = read_segments(folder / "segments")
    files = sorted(p.name for p in (folder / "segments").glob("seg-*.ts"))
    assert files == sorted(s.file for s in segments)  # the index and the folder agree
    assert 2 <= len(files) <= 5 and files[0] != "seg-00000000.ts"  # the oldest gone, the newest kept
    stores = folders.read_state("ring")["stores"]
    assert set(stores) <= set(files)  # the state forgets removed segments
    on_disk = sorted(p.name for p in (folder / "videos").iterdir())
    assert len(on_disk) == len(stores) and all(any(s.endswith(n) for s in stores.values()) for n in on_disk)
    assert max(disk) <= 6 * per_segment  # never more than the budget and the segments in flight
    assert sorted(p.name.split("-", 1)[1] for p in clips.iterdir()) == ["new-event.mp4"]  # its footage is gone
