"""The transcript store: per-window commits, reading back by time, gaps and no-audio records, identity checks,
cleanup after a killed writer, and a real SIGKILL mid-run resumed to a byte-identical transcript."""

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

from vidmini.speech.store import TranscriptStore, remove_transcripts, transcript_name, transcript_state
from vidmini.speech.types import Segment, Word
from vidmini.store.video_store import StoreConflict, StoreMismatch

REPO = Path(__file__).resolve().parents[2]
FP = "0123456789abcdef"


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def seg(start: float, text: str) -> Segment:
    words = tuple(Word(start + 0.4 * i, start + 0.4 * i + 0.35, w, 0.9) for i, w in enumerate(text.split()))
    return Segment(start, words[-1].end, text, words, 0.8)


def test_windows_commit_and_read_back_by_time(tmp_path):
    store = TranscriptStore.open(tmp_path, FP, "pocketsphinx-en-us", None, 30.0, source="/v.mp4")
    assert store.path == tmp_path / "transcripts" / FP / "pocketsphinx-en-us"
    assert (store.covered_until, store.complete, store.state) == (0.0, False, "incomplete")
    store.append_window(0.0, 30.0, [seg(12.0, "the red apple"), seg(2.0, "hello there")])
    store.append_window(30.0, 60.0, [])
    store.append_window(60.0, 75.5, [seg(61.25, "banana split")])
    assert store.covered_until == 75.5 and store.windows == 3
    assert [s.text for s in store.segments()] == ["hello there", "the red apple", "banana split"]
    assert [s.text for s in store.segments(10, 40)] == ["the red apple"]
    assert [s.text for s in store.segments(start=61.0)] == ["banana split"]
    assert store.segments(20, 55) == []
    got = store.segments(60, None)[0]
    assert got.words[1] == Word(61.65, 62.0, "split", 0.9) and got.confidence == 0.8
    with pytest.raises(ValueError, match="before the committed audio ends"):
        store.append_window(30.0, 60.0, [])
    store.mark_complete(duration=75.5)
    assert store.complete and store.state == "complete"
    with pytest.raises(ValueError, match="complete"):
        store.append_window(75.5, 80.0, [])
    reader = TranscriptStore.load(store.path)
    assert reader.segments() == store.segments() and reader.verify() == []
    assert reader.summary() == {"state": "complete", "backend": "pocketsphinx-en-us", "language": None,
                                "covered_until": 75.5, "segments": 3, "gaps": [], "error": None}


def test_times_are_stored_to_the_millisecond(tmp_path):
    store = TranscriptStore.open(tmp_path, FP, "asr")
    store.append_window(0.0, 10.00049, [Segment(1.23456789, 2.0000001, "x", (Word(1.23456789, 2.0, "x", 0.123456),))])
    data = json.loads((store.path / "windows" / "window-000000.json").read_text())
    assert data["end"] == 10.0
    assert data["segments"][0]["start"] == 1.235 and data["segments"][0]["words"][0]["confidence"] == 0.1235


def test_gaps_no_audio_and_failures_are_recorded(tmp_path):
    store = TranscriptStore.open(tmp_path, FP, "asr")
    store.append_window(0.0, 30.0, [seg(1.0, "before the break")])
    store.record_gap(30.0, 90.0, "Invalid data found\nwhen processing input")
    store.mark_complete(90.0)
    assert store.gaps == [{"start": 30.0, "end": 90.0, "error": "Invalid data found when processing input"}]
    assert [s.text for s in store.segments()] == ["before the break"]

    silent = TranscriptStore.open(tmp_path, "fedcba9876543210", "asr")
    silent.mark_no_audio()
    assert silent.complete and silent.no_audio and silent.state == "no_audio"
    assert transcript_state(tmp_path, "fedcba9876543210")["state"] == "no_audio"

    other = TranscriptStore.open(tmp_path, "1111111111111111", "whisper-tiny", "de")
    other.mark_failed("the model would not load")
    assert other.state == "failed"
    assert transcript_state(tmp_path, "1111111111111111", running=True)["state"] == "running"
    assert transcript_state(tmp_path, "2222222222222222") == {"state": "none"}
    assert transcript_state(tmp_path, "2222222222222222", running=True) == {"state": "running"}
    remove_transcripts(tmp_path, FP)
    assert not (tmp_path / "transcripts" / FP).exists()


def test_identity_names_and_the_best_transcript(tmp_path):
    assert transcript_name("whisper-openai/whisper-tiny", "en") == "whisper-openai_whisper-tiny--en"
    with pytest.raises(ValueError, match="safe folder"):
        TranscriptStore.open(tmp_path, "../evil", "asr")
    a = TranscriptStore.open(tmp_path, FP, "pocketsphinx-en-us", window_s=30.0)
    a.append_window(0.0, 30.0, [])
    b = TranscriptStore.open(tmp_path, FP, "whisper-tiny", "en")
    b.append_window(0.0, 30.0, [])
    b.mark_complete(30.0)
    assert TranscriptStore.best(tmp_path, FP).backend == "whisper-tiny"  # complete beats incomplete
    assert TranscriptStore.best(tmp_path, FP, prefer="pocketsphinx-en-us").backend == "pocketsphinx-en-us"
    # a resume keeps the stored window length
    assert TranscriptStore.open(tmp_path, FP, "pocketsphinx-en-us", window_s=10.0).window_s == 30.0
    manifest = a.path / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(m | {"backend": "someone-else"}))
    with pytest.raises(StoreMismatch, match="belongs to"):
        TranscriptStore.open(tmp_path, FP, "pocketsphinx-en-us")


def test_a_second_writer_is_refused(tmp_path):
    first = TranscriptStore.open(tmp_path, FP, "asr")
    second = TranscriptStore.open(tmp_path, FP, "asr")
    first.append_window(0.0, 30.0, [])
    with pytest.raises(StoreConflict, match="another writer"):
        second.append_window(0.0, 30.0, [])


def test_leftovers_of_a_killed_writer_are_cleaned_on_open(tmp_path):
    store = TranscriptStore.open(tmp_path, FP, "asr")
    store.append_window(0.0, 30.0, [seg(1.0, "kept")])
    for junk in ("windows/window-000001.json", "windows/window-000001.json.tmp", "manifest.json.tmp"):
        (store.path / junk).write_text("junk")
    again = TranscriptStore.open(tmp_path, FP, "asr")
    assert sorted(files(again.path)) == ["manifest.json", "windows/window-000000.json"]
    assert [s.text for s in again.segments()] == ["kept"]


WRITER = r"""
import sys, time
from pathlib import Path
from vidmini.speech.store import TranscriptStore
from vidmini.speech.types import Segment, Word

WINDOWS = 40

def main(root):
    store = TranscriptStore.open(Path(root), "feedc0ffee123456", "pocketsphinx-en-us", None, 30.0, source="/x.mp4")
    while store.covered_until < WINDOWS * 30.0:
        i = int(round(store.covered_until / 30.0))
        t = 30.0 * i
        segs = [Segment(t + 1 + j, t + 2.5 + j, f"window {i} line {j}",
                        (Word(t + 1 + j, t + 1.6 + j, "window", 0.5), Word(t + 1.7 + j, t + 2.5 + j, str(i), 0.7)))
                for j in range(i % 3)]
        store.append_window(t, t + 30.0, segs)
    store.record_gap(WINDOWS * 30.0, None, "the stream broke")
    store.mark_complete(duration=WINDOWS * 30.0 + 12.0)
"""


def _committed(root: Path) -> int:
    try:
        return len(json.loads(next((root / "transcripts").glob("*/*/manifest.json")).read_text())["windows"])
    except (StopIteration, FileNotFoundError, ValueError):
        return -1


def _run_writer(root: Path, rng: random.Random | None) -> None:
    """The writer in a fresh interpreter; with an rng, SIGKILLed once a random number of windows is committed plus
    a few random milliseconds (mid-window file, mid-manifest, or between commits)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", WRITER + "\nmain(sys.argv[1])", str(root)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if rng is not None:
        target = rng.randrange(1, 38)
        while proc.poll() is None and _committed(root) < target:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.005))
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    if rng is None:
        assert proc.returncode == 0, err.decode()[-2000:]


def test_sigkilled_writer_resumes_to_an_identical_transcript(tmp_path):
    ns: dict = {}
    exec(WRITER, ns)
    ns["main"](tmp_path / "clean")
    (clean,) = (tmp_path / "clean" / "transcripts" / "feedc0ffee123456").iterdir()
    expected = files(clean)
    assert len([f for f in expected if f.startswith("windows/")]) == 40
    for seed in (1, 2, 3):
        root, rng = tmp_path / f"seed{seed}", random.Random(seed)
        for _ in range(2):
            _run_writer(root, rng)
            (path,) = (root / "transcripts" / "feedc0ffee123456").iterdir()
            reader = TranscriptStore.load(path)  # consistent at every kill point
            assert reader.verify() == [] and not reader.complete
            assert reader.covered_until == 30.0 * reader.windows
        _run_writer(root, None)
        assert files(path) == expected, f"seed {seed}"
