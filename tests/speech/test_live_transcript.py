"""A recording still being written (`IngestOptions(live=True)` on a local file): its audio is transcribed as the
file grows, window by window beside its frames, not after it ends. The test appends real espeak-ng speech in
MPEG-TS to the file at four times real time while the library ingests it. At two points it slows to a trickle
(the file still grows, by one 188-byte packet every 0.2 s) until the transcript has caught up: first past 30 s of
media until the first 30 s window is committed, then past 66 s until the second. The slowdown means the test
measures no speed. A transcript that only starts after the file stops growing never catches up, and the test
fails after a deadline."""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import av
import pytest
import speech_media as media

from vidmini.engine.load import SHIPPED_MODEL_DIR

pytestmark = [pytest.mark.skipif(not media.have_tools(), reason="needs espeak-ng and ffmpeg"),
              pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")]
LOOPS = 3  # the 26 s speech video three times: 78 s, more than two 30 s windows
PACKET = 188  # bytes in an MPEG-TS packet
# (media seconds written, transcript seconds covered before more is written)
GATES = ((36.0, 30.0), (66.0, 60.0))
GATE_DEADLINE_S = 240.0


def byte_offset(path: Path, seconds: float) -> int:
    """Where in the file the first packet at or after `seconds` of media starts, on a packet boundary."""
    with av.open(str(path)) as container:
        for packet in container.demux():
            if packet.pts is not None and packet.pos is not None and packet.pos >= 0 and \
                    float(packet.pts * packet.time_base) - float(container.start_time or 0) / 1e6 >= seconds:
                return packet.pos // PACKET * PACKET
    raise AssertionError(f"the recording is shorter than {seconds} s")


def test_a_recording_being_written_is_transcribed_as_it_grows(tmp_path):
    from vidmini.service.library import Library, video_fp_of
    from vidmini.service.options import IngestOptions

    video = media.make_speech_video(tmp_path / "media", "ts_mp2")
    whole = tmp_path / "whole.ts"
    subprocess.run(["ffmpeg", "-v", "error", "-stream_loop", str(LOOPS - 1), "-i", str(video.path), "-c", "copy",
                    "-f", "mpegts", str(whole)], check=True, timeout=60)
    data = whole.read_bytes()
    gates = [(byte_offset(whole, at), covered) for at, covered in GATES]
    growing = tmp_path / "recording.ts"
    lib = Library(tmp_path / "home")
    stored: list[str] = []
    covered_now = [0.0]  # the transcript's reach, as last read
    reached: list[tuple[float, float]] = []  # (covered, bytes written) at each gate, read while the file grew
    failure: list[str] = []

    def covered() -> float:
        if stored:
            covered_now[0] = max(covered_now[0], lib.transcript_state(video_fp_of(stored[0])).get("covered_until")
                                 or 0.0)
        return covered_now[0]

    def write() -> None:  # four times real time, a trickle at each gate until the transcript has caught up
        rate = len(data) / video.duration_s / LOOPS * 4
        with open(growing, "ab", buffering=0) as out:
            written = 0
            for offset, need in [*gates, (len(data), None)]:
                while written < offset:
                    step = min(offset - written, max(PACKET, int(rate * 0.05) // PACKET * PACKET))
                    out.write(data[written:written + step])
                    written += step
                    time.sleep(0.05)
                if need is None:
                    return
                deadline = time.monotonic() + GATE_DEADLINE_S
                while covered() < need - 1e-6:
                    if time.monotonic() > deadline:
                        failure.append(f"the transcript reached {covered_now[0]} s, not {need} s, in "
                                       f"{GATE_DEADLINE_S} s while the file grew")
                        return
                    out.write(data[written:written + PACKET])  # a packet of the next media: still growing
                    written += PACKET
                    time.sleep(0.2)
                reached.append((covered_now[0], written))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        deadline = time.time() + 30
        while not (growing.exists() and growing.stat().st_size > 64_000):
            assert writer.is_alive() and time.time() < deadline, "the writer did not start"
            time.sleep(0.05)
        result: list = []
        options = IngestOptions(live=True, idle_timeout=3.0, chunk_frames=8, asr="pocketsphinx")
        ingest = threading.Thread(target=lambda: result.append(
            lib.ingest(str(growing), options, on_store=stored.append, wait_transcript=True)))
        ingest.start()
        writer.join()
        ingest.join(240)
        assert not ingest.is_alive() and result, "the live ingest did not end after the recording stopped"
    finally:
        writer.join()
        lib.close()
    assert not failure, failure
    # the transcript grew while the file did: each window committed before the media after it was written
    assert len(reached) == len(GATES) and all(c >= need - 1e-6 and written < len(data)
                                              for (c, written), (_, need) in zip(reached, GATES, strict=True)), reached
    done = result[0]
    assert done.frames >= 70  # about 78 s at 1 fps
    assert done.extra["transcript"]["state"] == "complete", done.extra["transcript"]
    words = [w for s in lib.transcript(done.video_id) for w in s.words]
    for loop in range(LOOPS):
        for truth in video.words:  # each keyword, in each pass of the loop, on the frames' clock
            at = truth.start + loop * video.duration_s
            assert any(w.text == truth.word and abs(w.start - at) <= 1.0 for w in words), \
                (truth.word, at, [(w.text, w.start) for w in words])
