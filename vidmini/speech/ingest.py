"""Transcribe a video's audio track into its transcript store: window by window, each committed, resumable.

The frames' ingest never waits on this: the service runs it beside them (vidmini/service/library.py), in a
child process (`python -m vidmini.speech.ingest`, `transcribe_file`) at a lower CPU priority: a recognizer
holds the interpreter lock while it decodes (PocketSphinx does), which in a thread would stall the frames. A
video without audio is recorded as such; a broken audio stream keeps what decoded around the break, records the
lost span as a gap and says so in one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vidmini.common.errors import one_line
from vidmini.speech.store import TranscriptStore
from vidmini.speech.types import AsrBackend


@dataclass
class TranscriptProgress:
    covered_s: float  # audio transcribed so far (seconds on the video's clock)
    duration_s: float | None
    segments: int  # segments committed in this run


@dataclass
class TranscriptResult:
    state: str  # complete | no_audio | cancelled
    backend: str
    path: str
    covered_until: float
    segments: int  # committed in this run
    resumed_from: float = 0.0
    reused: bool = False
    gaps: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


def _track_end(info) -> float | None:
    """Where the audio track ends on the video's clock, when its header says."""
    end = info.end_s
    return float(end) if end is not None and end > 0 else None


def run_transcription(path: str, store: TranscriptStore, backend: AsrBackend, language: str | None = None,
                      window_s: float | None = None, progress: Callable[[TranscriptProgress], None] | None = None,
                      cancel: threading.Event | None = None, warn: Callable[[str], None] | None = None
                      ) -> TranscriptResult:
    """Transcribe `path`'s audio into `store` from its first uncommitted window on. `window_s` defaults to the
    store's own (a resume continues its windows); `warn(line)` (default: stderr) hears of a broken stream."""
    from vidmini.speech.audio import AudioError, audio_windows, probe_audio
    from vidmini.speech.backends import transcribe_window

    say = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    resumed_from = store.covered_until
    if store.complete:
        return TranscriptResult(store.state, store.backend, str(store.path), resumed_from, 0, resumed_from,
                                reused=True, gaps=store.gaps)
    info = probe_audio(path)
    if info is None:
        store.mark_no_audio()
        return TranscriptResult("no_audio", store.backend, str(store.path), 0.0, 0)
    duration = _track_end(info)
    language = language if language is not None else store.language
    window = float(window_s or store.window_s)
    done = 0
    try:
        # From the start even on a resume: decoding is cheap next to recognition, and a decoder started
        # part-way (a seek) gives samples that differ slightly, words then too; from the start, a resumed
        # transcript ends byte-identical to an uninterrupted one.
        for w in audio_windows(path, start=0.0, window_s=window):
            if cancel is not None and cancel.is_set():
                break
            if w.end <= store.covered_until + 1e-3:
                continue  # committed before the run that was stopped
            segments = transcribe_window(w, backend, language)
            store.append_window(w.start, w.end, segments)
            done += len(segments)
            if progress is not None:
                progress(TranscriptProgress(store.covered_until, duration, done))
    except AudioError as e:  # raised after every window that did decode was yielded (and committed above)
        gaps = [(a, b) for a, b in e.gaps if b is None or b > a] or [(store.covered_until, None)]
        for a, b in gaps:
            store.record_gap(a, b if b is not None else duration, one_line(e))
        say(f"vidmini: warning: {one_line(e)}; the transcript skips it, the frames are not affected")
    if cancel is not None and cancel.is_set():
        return TranscriptResult("cancelled", store.backend, str(store.path), store.covered_until, done, resumed_from)
    store.mark_complete(duration)
    return TranscriptResult("complete", store.backend, str(store.path), store.covered_until, done, resumed_from,
                            gaps=store.gaps)


# ---- in a child process --------------------------------------------------------------------------------------
CHILD_NICENESS = 10  # the transcription runs this much below the frames' process


def transcribe_file(root: str | Path, video_fp: str, source: str, kind: str, model: str | None = None,
                    language: str | None = None, device: str = "cpu", window_s: float = 30.0) -> TranscriptResult:
    """Load the recognizer of `kind` and transcribe `source` into its transcript under `root` (the child's work;
    a failure marks the transcript failed and is re-raised)."""
    from vidmini.speech.backends import make_backend

    backend = make_backend(kind, model=model, language=language, device=device)
    store = TranscriptStore.open(root, video_fp, backend.name, language, window_s, source=source)
    try:
        return run_transcription(source, store, backend, language)
    except Exception as e:
        store.refresh()
        if not store.complete:
            store.mark_failed(f"{type(e).__name__}: {one_line(e)}")
        raise


def start_child(root: str | Path, video_fp: str, source: str, kind: str, model: str | None = None,
                language: str | None = None, device: str = "cpu", window_s: float = 30.0) -> subprocess.Popen:
    """`transcribe_file` in a child process (its stderr is this process's: the one-line warnings show there).
    Stop it with terminate(): a killed transcription resumes where its commits stopped."""
    args = [sys.executable, "-m", "vidmini.speech.ingest", "--root", str(root), "--video-fp", video_fp,
            "--source", str(source), "--asr", kind, "--device", device, "--window-s", repr(float(window_s))]
    if model is not None:
        args += ["--asr-model", model]
    if language is not None:
        args += ["--language", language]
    package_parent = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": package_parent + (os.pathsep + path if path else ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the voice activity model: one core, the rest the frames'
    return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


def _exit_with_parent(parent: int) -> None:
    """A transcription outlives nothing: when the process that started it is gone, stop (what is committed stays,
    and a later ingest resumes from there)."""
    while os.getppid() == parent:
        threading.Event().wait(1.0)
    os._exit(3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vidmini.speech.ingest", description="transcribe one video's audio "
                                "into its transcript store (run by the service beside the frames' ingest)")
    p.add_argument("--root", required=True)
    p.add_argument("--video-fp", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--asr", required=True)
    p.add_argument("--asr-model", default=None)
    p.add_argument("--language", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--window-s", type=float, default=30.0)
    args = p.parse_args(argv)
    try:
        os.nice(CHILD_NICENESS)
    except OSError:
        pass
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    try:
        transcribe_file(args.root, args.video_fp, args.source, args.asr, args.asr_model, args.language, args.device,
                        args.window_s)
    except Exception as e:  # noqa: BLE001 - one line, as every face reports
        print(f"vidmini: warning: {Path(args.source).name}: no transcript ({type(e).__name__}: {one_line(e)}); "
              "the frames are not affected", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
