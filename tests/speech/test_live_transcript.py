"""A recording still being written (`IngestOptions(live=True)` on a local file): its audio is transcribed as the
file grows, window by window beside its frames, not after it ends. ffmpeg writes real espeak-ng speech into an
MPEG-TS file at four times real time while the library ingests it."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import speech_media as media

from vidmini.engine.load import SHIPPED_MODEL_DIR

pytestmark = [pytest.mark.skipif(not media.have_tools(), reason="needs espeak-ng and ffmpeg"),
              pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")]
LOOPS = 3  # the 26 s speech video three times: 78 s, more than two 30 s windows


def test_a_recording_being_written_is_transcribed_as_it_grows(tmp_path):
    from vidmini.service.library import Library, video_fp_of
    from vidmini.service.options import IngestOptions

    video = media.make_speech_video(tmp_path / "media", "ts_mp2")
    growing = tmp_path / "recording.ts"
    writer = subprocess.Popen(["ffmpeg", "-v", "error", "-readrate", "4", "-stream_loop", str(LOOPS - 1), "-i",
                               str(video.path), "-c", "copy", "-f", "mpegts", str(growing)],
                              stdin=subprocess.DEVNULL)
    lib = Library(tmp_path / "home")
    try:
        deadline = time.time() + 30
        while not (growing.exists() and growing.stat().st_size > 64_000):
            assert writer.poll() is None and time.time() < deadline, "ffmpeg did not start writing"
            time.sleep(0.05)
        stored: list[str] = []
        result: list = []
        options = IngestOptions(live=True, idle_timeout=3.0, chunk_frames=8, asr="pocketsphinx")
        ingest = threading.Thread(target=lambda: result.append(
            lib.ingest(str(growing), options, on_store=stored.append, wait_transcript=True)))
        ingest.start()
        covered_while_writing = 0.0
        while writer.poll() is None:
            if stored:
                state = lib.transcript_state(video_fp_of(stored[0]))
                covered_while_writing = max(covered_while_writing, state.get("covered_until") or 0.0)
            time.sleep(0.2)
        ingest.join(240)
        assert not ingest.is_alive() and result, "the live ingest did not end after the recording stopped"
    finally:
        writer.kill()
        writer.wait()
        lib.close()
    assert writer.returncode in (0, -9)
    done = result[0]
    assert done.frames >= 70  # about 78 s at 1 fps
    # The transcript grew while ffmpeg was still writing: two 30 s windows were committed before it ended.
    assert covered_while_writing >= 60.0 - 1e-6, covered_while_writing
    assert done.extra["transcript"]["state"] == "complete", done.extra["transcript"]
    words = [w for s in lib.transcript(done.video_id) for w in s.words]
    for loop in range(LOOPS):
        for truth in video.words:  # each keyword, in each pass of the loop, on the frames' clock
            at = truth.start + loop * video.duration_s
            assert any(w.text == truth.word and abs(w.start - at) <= 1.0 for w in words), \
                (truth.word, at, [(w.text, w.start) for w in words])
