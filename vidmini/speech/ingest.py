"""Transcribe a video's audio track into its transcript store: window by window, each committed, resumable.

The frames' ingest never waits on this: the service runs it beside them (vidmini/service/library.py), in a
child process (`python -m vidmini.speech.ingest`, `transcribe_file`) at a lower CPU priority: a recognizer
holds the interpreter lock while it decodes (PocketSphinx does), which in a thread would stall the frames. A
video without audio is recorded as such; a broken audio stream keeps what decoded around the break, records the
lost span as a gap and says so in one line on stderr. With `workers` > 1 the windows are recognized by that many
worker processes at once (`speech.parallel`) and still committed one by one, in order: the transcript is byte for
byte the one a single process makes, and a killed run resumes the same way.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vidmini.common.errors import one_line
from vidmini.speech.store import TranscriptStore
from vidmini.speech.types import AsrBackend, AudioWindow, Segment

if TYPE_CHECKING:
    from vidmini.speech.parallel import RecognizerPool


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


def _one_by_one(windows: Iterable[AudioWindow], backend: AsrBackend, language: str | None,
                cancel: threading.Event | None) -> Iterator[tuple[AudioWindow, list[Segment]]]:
    """Each window with its segments, recognized here, one after the other (a set `cancel` stops before the
    next one)."""
    from vidmini.speech.backends import transcribe_window

    for w in windows:
        if cancel is not None and cancel.is_set():
            return
        yield w, transcribe_window(w, backend, language)


def run_transcription(path: str, store: TranscriptStore, backend: AsrBackend | RecognizerPool,
                      language: str | None = None, window_s: float | None = None,
                      progress: Callable[[TranscriptProgress], None] | None = None,
                      cancel: threading.Event | None = None, warn: Callable[[str], None] | None = None,
                      follow_idle_s: float | None = None) -> TranscriptResult:
    """Transcribe `path`'s audio into `store` from its first uncommitted window on. `backend`: a recognizer
    here, or a `RecognizerPool` of worker processes (the audio is decoded and committed here either way).
    `window_s` defaults to the store's own (a resume continues its windows); `warn(line)` (default: stderr)
    hears of a broken stream. `follow_idle_s`: `path` is a recording still being written (a live ingest):
    it is read as it grows (`ingest.live.FollowFile`), each window committed once its audio has arrived, until
    the file has not grown for that many seconds."""
    from vidmini.ingest.live import FollowFile
    from vidmini.speech.audio import AudioError, audio_windows, clock_origin, probe_audio
    from vidmini.speech.parallel import RecognizerPool

    say = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    resumed_from = store.covered_until
    if store.complete:
        return TranscriptResult(store.state, store.backend, str(store.path), resumed_from, 0, resumed_from,
                                reused=True, gaps=store.gaps)
    info = probe_audio(path)
    if info is None:
        store.mark_no_audio()
        return TranscriptResult("no_audio", store.backend, str(store.path), 0.0, 0)
    duration = _track_end(info) if follow_idle_s is None else None  # a growing file's header knows no end
    language = language if language is not None else store.language
    window = float(window_s or store.window_s)
    done = 0
    # From the start even on a resume: decoding is cheap next to recognition, and a decoder started part-way (a
    # seek) gives samples that differ slightly, words then too; from the start, a resumed transcript ends
    # byte-identical to an uninterrupted one. Windows committed before the run that was stopped are skipped.
    reader = None
    if follow_idle_s is not None:  # the clock origin from the file as it is now; the audio as it comes
        origin = clock_origin(path)
        reader = FollowFile(path, idle_timeout=follow_idle_s)
        source = audio_windows(reader, start=0.0, window_s=window, origin=origin)
    else:
        source = audio_windows(path, start=0.0, window_s=window)
    windows = (w for w in source if w.end > resumed_from + 1e-3)
    if isinstance(backend, RecognizerPool):
        recognized = backend.recognize(windows, language, cancel)
    else:
        recognized = _one_by_one(windows, backend, language, cancel)
    try:
        with closing(recognized):  # in order, whichever recognizes them: the store takes no other
            for w, segments in recognized:
                store.append_window(w.start, w.end, segments)
                done += len(segments)
                if progress is not None:
                    progress(TranscriptProgress(store.covered_until, duration, done))
    except AudioError as e:  # raised after every window that did decode was yielded (and committed above)
        gaps = [(a, b) for a, b in e.gaps if b is None or b > a] or [(store.covered_until, None)]
        for a, b in gaps:
            store.record_gap(a, b if b is not None else duration, one_line(e))
        say(f"vidmini: warning: {one_line(e)}; the transcript skips it, the frames are not affected")
    finally:
        if reader is not None:
            reader.close()
    if cancel is not None and cancel.is_set():
        return TranscriptResult("cancelled", store.backend, str(store.path), store.covered_until, done, resumed_from)
    store.mark_complete(duration)
    return TranscriptResult("complete", store.backend, str(store.path), store.covered_until, done, resumed_from,
                            gaps=store.gaps)


# ---- in a child process --------------------------------------------------------------------------------------
CHILD_NICENESS = 10  # the transcription runs this much below the frames' process


def plan_file_workers(source: str, kind: str, workers: int | None, window_s: float) -> int:
    """The worker processes `transcribe_file` starts for `source`: `workers` (None: the backend's default, see
    `speech.parallel.default_workers`), no more than the audio has windows."""
    from vidmini.ingest.options import check_asr_workers
    from vidmini.speech.audio import probe_audio
    from vidmini.speech.parallel import default_workers, plan_workers

    asked = default_workers(kind) if check_asr_workers(workers) is None else workers
    if asked == 1:
        return 1
    try:
        info = probe_audio(source)
    except Exception:  # noqa: BLE001 - the transcription itself reports an unreadable file
        return asked
    return plan_workers(kind, asked, _track_end(info) if info is not None else window_s, window_s)


def transcribe_file(root: str | Path, video_fp: str, source: str, kind: str, model: str | None = None,
                    language: str | None = None, device: str = "cpu", window_s: float = 30.0,
                    workers: int | None = None, cancel: threading.Event | None = None,
                    follow_idle_s: float | None = None) -> TranscriptResult:
    """Load the recognizer of `kind` and transcribe `source` into its transcript under `root` (the child's work;
    a failure marks the transcript failed and is re-raised). `workers` > 1: that many worker processes
    recognize windows at once (`plan_file_workers`; 1: all in this process; a followed recording, whose audio
    comes in real time, gets 1 unless asked); a set `cancel` stops the run between commits; `follow_idle_s`:
    see `run_transcription`."""
    from vidmini.speech.parallel import BackendSpec, RecognizerPool

    spec = BackendSpec(kind, model, language, device)
    workers = 1 if follow_idle_s is not None and workers is None else plan_file_workers(source, kind, workers,
                                                                                         window_s)
    if workers == 1:
        return _transcribe_with(root, video_fp, source, spec.make(), language, window_s, cancel, follow_idle_s)
    pool = RecognizerPool(spec, workers)
    ended = False
    try:
        result = _transcribe_with(root, video_fp, source, pool, language, window_s, cancel, follow_idle_s)
        ended = result.state != "cancelled"
        return result
    finally:
        pool.close(now=not ended)  # a cancelled or failed run does not wait for windows it will never commit


def _transcribe_with(root: str | Path, video_fp: str, source: str, backend: AsrBackend | RecognizerPool,
                     language: str | None, window_s: float, cancel: threading.Event | None,
                     follow_idle_s: float | None = None) -> TranscriptResult:
    """`run_transcription` into the transcript `backend`'s name says; a failure is recorded in it."""
    store = TranscriptStore.open(root, video_fp, backend.name, language, window_s, source=source)
    try:
        return run_transcription(source, store, backend, language, cancel=cancel, follow_idle_s=follow_idle_s)
    except Exception as e:
        store.refresh()
        if not store.complete:
            store.mark_failed(f"{type(e).__name__}: {one_line(e)}")
        raise


def start_child(root: str | Path, video_fp: str, source: str, kind: str, model: str | None = None,
                language: str | None = None, device: str = "cpu", window_s: float = 30.0,
                workers: int | None = None, follow_idle_s: float | None = None) -> subprocess.Popen:
    """`transcribe_file` in a child process (its stderr is this process's: the one-line warnings show there).
    Stop it with terminate(): a killed transcription resumes where its commits stopped. Its worker processes
    (`workers`, None: the backend's default) inherit its lower priority and its one-thread math settings."""
    # A killed child's worker pool leaves semaphores that multiprocessing's resource tracker (a helper process,
    # started with these -W flags) cleans up, saying so in a warning: expected, so not printed.
    args = [sys.executable, "-W", "ignore:resource_tracker:UserWarning", "-m", "vidmini.speech.ingest",
            "--root", str(root), "--video-fp", video_fp, "--source", str(source), "--asr", kind, "--device", device,
            "--window-s", repr(float(window_s))]
    if workers is not None:
        args += ["--asr-workers", str(int(workers))]
    if follow_idle_s is not None:
        args += ["--follow-idle", repr(float(follow_idle_s))]
    if model is not None:
        args += ["--asr-model", model]
    if language is not None:
        args += ["--language", language]
    package_parent = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    env = {**os.environ, "PYTHONPATH": package_parent + (os.pathsep + path if path else ""),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # the voice activity model: one core, the rest the frames'
    return subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)


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
    p.add_argument("--asr-workers", type=int, default=None, metavar="N",
                   help="worker processes recognizing windows at once (default: one per core for pocketsphinx, "
                        "1 for whisper; 1: all in this process)")
    p.add_argument("--follow-idle", type=float, default=None, metavar="S",
                   help="the source is a recording still being written: read it as it grows, until it has not "
                        "grown for S seconds")
    args = p.parse_args(argv)
    if args.asr_workers is not None and args.asr_workers < 1:
        print(f"vidmini: error: --asr-workers must be >= 1, got {args.asr_workers}", file=sys.stderr, flush=True)
        return 2
    try:
        os.nice(CHILD_NICENESS)  # before the workers start: they inherit it
    except OSError:
        pass
    from vidmini.speech.parallel import exit_with_parent

    threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    stop = threading.Event()
    try:
        workers = 1 if args.follow_idle is not None and args.asr_workers is None else \
            plan_file_workers(args.source, args.asr, args.asr_workers, args.window_s)
        if workers > 1:  # terminate() stops the workers too (killed, they would linger until they notice)
            signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        result = transcribe_file(args.root, args.video_fp, args.source, args.asr, args.asr_model, args.language,
                                 args.device, args.window_s, workers, stop, args.follow_idle)
    except Exception as e:  # noqa: BLE001 - one line, as every face reports
        print(f"vidmini: warning: {Path(args.source).name}: no transcript ({type(e).__name__}: {one_line(e)}); "
              "the frames are not affected", file=sys.stderr, flush=True)
        return 1
    return 128 + signal.SIGTERM if result.state == "cancelled" else 0


if __name__ == "__main__":
    sys.exit(main())
