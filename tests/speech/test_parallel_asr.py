"""Transcription on several cores (`--asr-workers`, vidmini/speech/parallel.py): windows recognized by worker
processes and committed in order make byte for byte the transcript one process makes, on real espeak-ng speech,
a broken audio stream included; a two-worker child killed (SIGKILL) or stopped (SIGTERM, the service's cancel)
part-way leaves no worker running and resumes to that same transcript; a worker count below 1 and Whisper without
a model are refused up front, in one line, before anything is ingested (CLI, the transcription child, REST)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import speech_media as media

from vidmini.engine.load import SHIPPED_MODEL_DIR
from vidmini.speech.store import TranscriptStore

needs_media = pytest.mark.skipif(not media.have_tools(), reason="needs espeak-ng and ffmpeg")
needs_model = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")
FP = "5eec4000aaaa0002"
WINDOW_S = 4.0  # 26 s of audio: 7 windows, speech in several of them


def files(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def transcript_dir(root: Path) -> Path:
    (path,) = (root / "transcripts" / FP).iterdir()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("parallel-asr-videos")


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory) -> tuple[media.SpeechVideo, dict[str, bytes]]:
    """The speech video and its transcript's files made by one process (the path with no pool)."""
    from vidmini.speech.ingest import transcribe_file

    video = media.make_speech_video(videos, "mp4_aac_16k_mono")
    root = tmp_path_factory.mktemp("one-worker")
    result = transcribe_file(root, FP, str(video.path), "pocketsphinx", window_s=WINDOW_S, workers=1)
    assert result.state == "complete" and result.segments >= 3
    expected = files(transcript_dir(root))
    assert len([f for f in expected if f.startswith("windows/")]) == 7
    return video, expected


# ---- the same transcript, whoever recognizes the windows ------------------------------------------------------
@needs_media
def test_two_workers_make_the_one_worker_transcript_byte_for_byte(reference, videos, tmp_path):
    from vidmini.speech.backends import make_backend
    from vidmini.speech.ingest import plan_file_workers, run_transcription
    from vidmini.speech.parallel import BackendSpec, RecognizerPool

    video, expected = reference
    assert plan_file_workers(str(video.path), "pocketsphinx", 2, WINDOW_S) == 2  # a pool, not the one-process path
    broken, span = media.make_corrupt_audio_video(videos)
    heard_alone: list[str] = []
    alone = TranscriptStore.open(tmp_path / "alone", FP, "pocketsphinx-en-us", None, WINDOW_S, source=str(broken.path))
    run_transcription(str(broken.path), alone, make_backend("pocketsphinx"), warn=heard_alone.append)

    with RecognizerPool(BackendSpec("pocketsphinx"), 2) as pool:
        assert pool.name == "pocketsphinx-en-us"
        store = TranscriptStore.open(tmp_path / "pool", FP, pool.name, None, WINDOW_S, source=str(video.path))
        result = run_transcription(str(video.path), store, pool)
        assert (result.state, result.gaps) == ("complete", [])
        assert files(store.path) == expected

        # a broken audio stream: the windows around the break committed, the gap recorded after them, one line
        heard: list[str] = []
        other = TranscriptStore.open(tmp_path / "broken", FP, pool.name, None, WINDOW_S, source=str(broken.path))
        result = run_transcription(str(broken.path), other, pool, warn=heard.append)
    assert result.state == "complete" and len(result.gaps) == 1
    assert abs(result.gaps[0]["start"] - span[0]) < 0.5 and abs(result.gaps[0]["end"] - span[1]) < 0.5
    assert heard == heard_alone and len(heard) == 1 and "frames are not affected" in heard[0]
    assert files(other.path) == files(alone.path)


# ---- killed or stopped part-way, then resumed ------------------------------------------------------------------
def _windows(root: Path) -> int:
    try:
        return len(json.loads(next((root / "transcripts").glob("*/*/manifest.json")).read_text())["windows"])
    except (StopIteration, FileNotFoundError, ValueError):
        return -1


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _nice(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def _is_worker(pid: int) -> bool:
    """A spawned pool worker (not multiprocessing's resource tracker, the other child)."""
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _child(root: Path, video: Path):
    from vidmini.speech.ingest import start_child

    return start_child(root, FP, str(video), "pocketsphinx", window_s=WINDOW_S, workers=2)


@needs_media
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the workers in /proc")
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_two_worker_run_stopped_part_way_resumes_byte_identical(reference, tmp_path, capfd, how):
    video, expected = reference
    root = tmp_path / "home"
    capfd.readouterr()
    proc = _child(root, video.path)
    deadline = time.time() + 60
    while proc.poll() is None and _windows(root) < 2:  # windows 2 and 4 hold speech: some still to do
        assert time.time() < deadline
        time.sleep(0.005)
    workers = [pid for pid in _children(proc.pid) if _is_worker(pid)]
    assert len(workers) == 2, workers
    for pid in workers:  # as low a priority as the child, and one thread for torch's math
        assert _nice(pid) == _nice(proc.pid) == min(19, os.nice(0) + 10), (pid, _nice(pid))
        assert b"OMP_NUM_THREADS=1\0" in Path(f"/proc/{pid}/environ").read_bytes()
    proc.send_signal(how)
    proc.wait(timeout=30)
    assert proc.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 128 + signal.SIGTERM)
    deadline = time.time() + 10  # a worker notices its parent is gone within a second (after its window)
    while [w for w in workers if _running(w)]:
        assert time.time() < deadline, f"orphan workers still running: {[w for w in workers if _running(w)]}"
        time.sleep(0.05)
    reader = TranscriptStore.load(transcript_dir(root))
    assert reader.verify() == [] and not reader.complete and 2 <= reader.windows < 7
    assert capfd.readouterr().err == ""  # no traceback, no leaked-semaphore warning

    proc = _child(root, video.path)
    assert proc.wait(timeout=120) == 0
    assert files(transcript_dir(root)) == expected


# ---- refused up front ------------------------------------------------------------------------------------------
def test_fewer_than_one_worker_is_refused_in_one_line(tmp_path, capsys):
    from vidmini.service.options import IngestOptions
    from vidmini.speech.ingest import main as child

    assert child(["--root", str(tmp_path), "--video-fp", FP, "--source", str(tmp_path / "v.mp4"), "--asr",
                  "pocketsphinx", "--asr-workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "vidmini: error: --asr-workers must be >= 1, got 0\n", err
    assert not (tmp_path / "transcripts").exists()
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="asr-workers must be an integer >= 1"):
            IngestOptions(asr_workers=bad).check()
    assert IngestOptions(asr_workers=3).check().asr_workers == 3


@needs_media
def test_whisper_without_a_model_is_refused_before_the_frames(videos, tmp_path, capsys, monkeypatch):
    from vidmini.cli.main import main as cli

    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path))
    video = media.make_speech_video(videos, "mp4_aac_16k_mono").path
    assert cli(["ingest", str(video), "--asr", "whisper"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vidmini: error: --asr whisper needs --asr-model") and err.count("\n") == 1, err
    assert not (tmp_path / "videos").exists() and not (tmp_path / "transcripts").exists()
    assert cli(["list", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []


@needs_media
@needs_model
def test_rest_refuses_whisper_without_a_model_and_bad_worker_counts_with_400(videos, tmp_path):
    from fixtures.serve_helpers import call_json, start_server, stop

    video = media.make_speech_video(videos, "mp4_aac_16k_mono").path
    env = {**os.environ, "VIDMINI_HOME": str(tmp_path / "home")}
    env.pop("VIDMINI_MODEL", None)
    proc, base = start_server(["--media-root", str(videos)], env)
    try:
        for body in ({"asr": "whisper"}, {"asr": "whisper", "language": "de"}):
            status, reply = call_json(base, "POST", "/v1/videos", {"source": str(video), **body})
            assert status == 400 and reply["error"]["param"] == "asr_model", reply
            assert "asr whisper needs asr_model" in reply["error"]["message"], reply
        cores = len(os.sched_getaffinity(0))
        for workers in (0, -1, "2", 2.5, True, cores + 1):
            status, reply = call_json(base, "POST", "/v1/videos", {"source": str(video), "asr_workers": workers})
            assert status == 400 and reply["error"]["param"] == "asr_workers", (workers, reply)
            assert f"from 1 to {cores}" in reply["error"]["message"], reply
        assert call_json(base, "GET", "/v1/videos")[1]["data"] == [] and call_json(base, "GET", "/v1/jobs")[1]["data"] == []
        remote = subprocess.run([sys.executable, "-m", "vidmini.cli.main", "summarize", str(video), "--server", base,
                                 "--out", str(tmp_path / "out"), "--asr-workers", str(cores + 1)],
                                capture_output=True, text=True, env=env, cwd=tmp_path,
                                timeout=120)  # the CLI hands the count to the server, which refuses it
        failed = [line for line in remote.stderr.splitlines() if "vidmini: failed:" in line]
        assert remote.returncode != 0 and len(failed) == 1, remote.stderr
        assert "answered 400: asr_workers must be an integer from 1" in failed[0], remote.stderr
        schema = call_json(base, "GET", "/openapi.json")[1]
        add = schema["paths"]["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert add["properties"]["asr_workers"]["minimum"] == 1
    finally:
        stop(proc)
