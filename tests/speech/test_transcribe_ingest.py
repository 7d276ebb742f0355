"""Transcription at ingest, on real speech (espeak-ng sentences muxed by ffmpeg, transcribed by PocketSphinx): the
keywords land in the transcript store at their times; a SIGKILLed transcription resumes to a byte-identical
transcript; through the service the frames never wait for the audio, a video without audio or with a broken
audio stream still ingests its frames (the state says so, the gap is recorded, one line on stderr), a removed
video takes its transcript along; the CLI's ingest and list say the transcript's state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import speech_media as media

from vidmini.engine.load import SHIPPED_MODEL_DIR
from vidmini.speech.store import TranscriptStore

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not media.have_tools(), reason="needs espeak-ng and ffmpeg")
needs_model = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")
FP = "5eec4000aaaa0001"


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("speech-videos")


def heard_words(store: TranscriptStore) -> list:
    return [w for s in store.segments() for w in s.words]


def assert_keywords_at_their_times(words, video: media.SpeechVideo) -> None:
    for truth in video.words:
        found = [w for w in words if w.text == truth.word]
        assert found, f"{truth.word} not heard; heard {[w.text for w in words]}"
        assert any(abs(w.start - truth.start) <= 1.0 for w in found), (truth, found)


# ---- the transcription into its store --------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["mp4_aac_16k_mono", "mp4_audio_late_5s"])
def test_the_transcript_holds_the_spoken_keywords_at_their_times(videos, tmp_path, variant):
    from vidmini.speech.backends import make_backend
    from vidmini.speech.ingest import run_transcription

    video = media.make_speech_video(videos, variant)
    backend = make_backend("pocketsphinx")
    store = TranscriptStore.open(tmp_path, FP, backend.name, None, 10.0, source=str(video.path))
    result = run_transcription(str(video.path), store, backend)
    assert (result.state, result.reused, result.gaps) == ("complete", False, [])
    assert store.complete and store.covered_until >= video.audio_end - 0.1
    words = heard_words(store)
    assert_keywords_at_their_times(words, video)
    assert not [w for w in words if w.start > media.SILENT_FROM + video.audio_start + 0.5]  # silence: no words
    if variant == "mp4_audio_late_5s":
        assert min(w.start for w in words) >= 5.0  # nothing before the track starts
    again = run_transcription(str(video.path), store, backend)
    assert again.reused and again.segments == 0


WRITER = r"""
import sys
from vidmini.speech.backends import make_backend
from vidmini.speech.ingest import run_transcription
from vidmini.speech.store import TranscriptStore

root, video = sys.argv[1], sys.argv[2]
backend = make_backend("pocketsphinx")
store = TranscriptStore.open(root, "5eec4000aaaa0001", backend.name, None, 4.0, source=video)
run_transcription(video, store, backend)
"""


def _windows(root: Path) -> int:
    try:
        return len(json.loads(next((root / "transcripts").glob("*/*/manifest.json")).read_text())["windows"])
    except (StopIteration, FileNotFoundError, ValueError):
        return -1


def _transcribe(root: Path, video: Path, kill_after: int | None = None, rng: random.Random | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(video)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if kill_after is not None:
        while proc.poll() is None and _windows(root) < kill_after:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))  # mid-window, mid-commit or between
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    if kill_after is None:
        assert proc.returncode == 0, err.decode()[-2000:]


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_killed_transcription_resumes_to_a_byte_identical_transcript(videos, tmp_path):
    video = media.make_speech_video(videos, "mp4_aac_16k_mono")
    _transcribe(tmp_path / "clean", video.path)
    (clean,) = (tmp_path / "clean" / "transcripts" / FP).iterdir()
    expected = files(clean)
    assert len([f for f in expected if f.startswith("windows/")]) == 7  # 26 s in 4 s windows
    rng = random.Random(28)
    for kill_after in (1, 2, 3):  # windows 2 and 4 hold speech: still to do at each kill
        root = tmp_path / f"killed-after-{kill_after}"
        _transcribe(root, video.path, kill_after, rng)
        (path,) = (root / "transcripts" / FP).iterdir()
        reader = TranscriptStore.load(path)
        assert reader.verify() == [] and not reader.complete and reader.windows >= kill_after
        _transcribe(root, video.path)
        assert files(path) == expected, f"killed after {kill_after} windows"


# ---- through the service ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    from vidmini.service.library import Library

    library = Library(tmp_path_factory.mktemp("speech-home"))
    yield library
    library.close()


@needs_model
def test_the_frames_do_not_wait_for_the_transcript(lib, videos):
    from vidmini.service.library import video_fp_of

    video = media.make_speech_video(videos, "mkv_opus")
    with lib._asr_turn:  # another video's transcription holds the recognizer: this one's waits its turn
        result = lib.ingest(str(video.path))
        assert result.frames == 26 and result.extra["transcript"]["state"] == "running"
        row = lib.video(result.video_id)
        assert (row.status, row.transcript) == ("ready", "running")
        assert lib.search("a test pattern", result.video_id, k=2).moments  # the frames are usable now
    lib.wait_transcript(video_fp_of(result.video_id), timeout=120)
    assert lib.video(result.video_id).transcript == "complete"
    words = [w for s in lib.transcript(result.video_id) for w in s.words]
    assert_keywords_at_their_times(words, video)
    assert [s.text for s in lib.transcript(result.video_id, 8.0, 13.0)] == \
        [s.text for s in lib.transcript(result.video_id) if s.end >= 8.0 and s.start <= 13.0]
    # a second ingest of the same file reuses both
    again = lib.ingest(str(video.path), wait_transcript=True)
    assert again.reused and again.extra["transcript"]["state"] == "complete"


@needs_model
def test_a_video_without_audio_still_ingests_its_frames(lib, videos):
    path = media.make_silent_video(videos)
    result = lib.ingest(str(path), wait_transcript=True)
    assert result.frames == 8 and result.extra["transcript"]["state"] == "no_audio"
    assert lib.video(result.video_id).transcript == "no_audio" and lib.transcript(result.video_id) == []


@needs_model
def test_a_broken_audio_stream_is_a_recorded_gap_and_one_line(lib, videos, capfd):
    video, broken = media.make_corrupt_audio_video(videos)
    capfd.readouterr()
    result = lib.ingest(str(video.path), wait_transcript=True)
    assert result.frames == 26 and result.gaps == []  # the frames are whole
    state = result.extra["transcript"]
    assert state["state"] == "complete" and len(state["gaps"]) == 1
    gap = state["gaps"][0]
    assert abs(gap["start"] - broken[0]) < 0.5 and abs(gap["end"] - broken[1]) < 0.5 and "did not decode" in gap["error"]
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]  # the transcriber's stderr
    assert len(err) == 1 and err[0].startswith("vidmini: warning: ") and "frames are not affected" in err[0], err
    heard = {w.text for s in lib.transcript(result.video_id) for w in s.words}
    assert {"computer", "restaurant"} <= heard and "hospital" not in heard  # spoken inside the broken span


@needs_model
def test_a_recognizer_that_does_not_load_fails_the_transcript_not_the_frames(lib, videos, tmp_path, capfd):
    from vidmini.service.options import IngestOptions

    video = media.make_speech_video(videos, "ts_mp2")
    capfd.readouterr()
    result = lib.ingest(str(video.path), IngestOptions(asr="whisper", asr_model=str(tmp_path)), wait_transcript=True)
    assert result.frames >= 25 and lib.video(result.video_id).status == "ready"
    state = result.extra["transcript"]
    assert state["state"] == "failed" and state["error"], state
    assert lib.video(result.video_id).transcript == "failed"
    err = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("vidmini: warning: ") and "no transcript" in err[0], err


@needs_model
def test_asr_none_stores_no_transcript_and_removal_takes_the_transcript_along(lib, videos):
    from vidmini.service.library import video_fp_of
    from vidmini.service.options import IngestOptions

    video = media.make_speech_video(videos, "mp4_aac_48k_stereo")
    quiet = lib.ingest(str(video.path), IngestOptions(asr="none"), wait_transcript=True)
    fp = video_fp_of(quiet.video_id)
    assert "transcript" not in quiet.extra and lib.video(quiet.video_id).transcript == "none"
    assert TranscriptStore.all_for(lib.root, fp) == []
    heard = lib.ingest(str(video.path), wait_transcript=True)
    assert heard.extra["transcript"]["state"] == "complete" and TranscriptStore.all_for(lib.root, fp)
    lib.remove(heard.video_id)
    assert not (lib.root / "transcripts" / fp).exists()


@needs_model
def test_cli_ingest_and_list_say_the_transcript_state(videos, tmp_path, monkeypatch, capsys):
    from vidmini.cli.main import main as cli

    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    speech = media.make_speech_video(videos, "mp4_aac_16k_mono").path
    silent = media.make_silent_video(videos)
    assert cli(["ingest", str(speech), str(silent), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(x["frames"], x["transcript"]["state"]) for x in lines] == [(26, "complete"), (8, "no_audio")]
    assert lines[0]["transcript"]["backend"] == "pocketsphinx-en-us" and lines[0]["transcript"]["segments"] >= 3
    assert cli(["list", "--json"]) == 0
    listed = {Path(x["source"]).name: x["transcript"] for x in json.loads(capsys.readouterr().out)}
    assert listed == {speech.name: "complete", silent.name: "no_audio"}
    assert cli(["ingest", str(speech), "--no-audio"]) == 0  # reused: the transcript stays as it is
    out = capsys.readouterr().out
    assert "reused" in out and "transcript" not in out
