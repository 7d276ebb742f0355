"""Audio windows recognized by several worker processes at once, handed back in window order.

PocketSphinx decodes on one core and holds the interpreter lock while it does, so threads cannot share the work;
processes can, because a window's words depend on that window alone (the VAD's and the decoder's state are reset
for every span: `speech.vad.speech_times`, `speech.pocketsphinx_asr`). The transcription's process keeps the
decoding of the audio and the commits (in order: `TranscriptStore.append_window` accepts no other); the workers
only recognize. Each worker builds its own recognizer once (`BackendSpec.make`), in a process started with
"spawn" (the parent may have loaded torch, which must not be forked), runs its math on one thread, ignores
Ctrl-C (its parent decides when to stop) and exits when its parent is gone, so a killed transcription leaves no
orphan burning a core. At most `in_flight` windows (2 per worker by default) are out at a time: memory stays
bounded whatever the video's length.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import math
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from vidmini.common.cores import usable_cores
from vidmini.ingest.options import check_asr_workers
from vidmini.speech.types import AsrBackend, AudioWindow, Segment

POLL_S = 0.2  # how often a wait for a worker's window looks at the cancel event
PARENT_CHECK_S = 1.0  # how often a worker looks whether its parent is still there


@dataclass(frozen=True)
class BackendSpec:
    """What a worker needs to build its own recognizer (a backend itself does not cross processes)."""

    kind: str
    model: str | None = None
    language: str | None = None
    device: str = "cpu"

    def make(self) -> AsrBackend:
        from vidmini.speech.backends import make_backend

        return make_backend(self.kind, model=self.model, language=self.language, device=self.device)


def default_workers(kind: str) -> int:
    """PocketSphinx: one worker per core (each is single-threaded); Whisper: one (a second copy of the model
    would compete for the same GPU or the same cores its own threads already use)."""
    return usable_cores() if (kind or "").strip().lower() == "pocketsphinx" else 1


def plan_workers(kind: str, workers: int | None, duration_s: float | None, window_s: float) -> int:
    """How many workers to start: the number asked for (None: `default_workers`), but no more than there are
    windows (a 20 s clip in 30 s windows is one window: a pool would only cost its start-up)."""
    n = default_workers(kind) if check_asr_workers(workers) is None else workers
    if duration_s is not None and duration_s > 0 and window_s > 0:
        n = min(n, max(1, math.ceil(duration_s / window_s)))
    return n


# ---- in a worker process ----------------------------------------------------------------------------------------
_backend: AsrBackend | None = None
_load_error: BaseException | None = None


def exit_with_parent(parent: int) -> None:
    """Stop this process once `parent` is gone (run on a daemon thread): an orphaned worker's windows would
    never be collected, an orphaned transcription has nobody to report to (what is committed stays, and a later
    ingest resumes from there)."""
    while os.getppid() == parent:
        threading.Event().wait(PARENT_CHECK_S)
    os._exit(3)


def _init_worker(spec: BackendSpec, parent: int) -> None:
    """Build this worker's recognizer once. A failure is kept and raised by every call, so the parent hears it
    as the exception it is (an initializer's own exception would only break the pool, message lost)."""
    global _backend, _load_error
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=exit_with_parent, args=(parent,), daemon=True).start()
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # one core per worker: the pool is the parallelism
    try:
        from vidmini.speech import vad

        vad.torch.set_num_threads(1)  # torch may have been imported already (by the spawned __main__)
        vad.load_model()
        _backend = spec.make()
    except Exception as e:  # noqa: BLE001 - handed to the parent by the first call
        _load_error = e


def _loaded() -> AsrBackend:
    if _load_error is not None:
        raise _load_error
    assert _backend is not None
    return _backend


def _name() -> str:
    return _loaded().name


def _recognize(window: AudioWindow, language: str | None) -> list[Segment]:
    from vidmini.speech.backends import transcribe_window

    return transcribe_window(window, _loaded(), language)


# ---- in the transcription's process -----------------------------------------------------------------------------
class RecognizerPool:
    """`workers` processes recognizing windows with the recognizer `spec` describes. Use as a context manager
    (or call `close`) from the thread that created it."""

    def __init__(self, spec: BackendSpec, workers: int, in_flight: int | None = None) -> None:
        if check_asr_workers(workers) is None:
            raise ValueError("a recognizer pool needs a number of workers")
        self.spec, self.workers = spec, workers
        self.in_flight = max(1, in_flight or 2 * workers)
        self._pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init_worker, initargs=(spec, os.getpid()))
        self._name: str | None = None

    @property
    def name(self) -> str:
        """The recognizer's name (the transcript store's identity), asked of a worker: the first call waits for
        the workers to load, and raises what stopped one from loading."""
        if self._name is None:
            self._name = self._pool.submit(_name).result()
        return self._name

    def recognize(self, windows: Iterable[AudioWindow], language: str | None = None,
                  cancel: threading.Event | None = None) -> Iterator[tuple[AudioWindow, list[Segment]]]:
        """Each window of `windows` with its segments, in the order given, while later windows are recognized.

        `windows` is read (decoded) here, at most `in_flight` ahead of the window handed back last. An exception
        from `windows` (a broken audio stream's AudioError comes after its last good window) is raised once every
        window before it has been handed back. A set `cancel` ends the iteration within POLL_S, the windows not
        handed back dropped."""
        def stopped() -> bool:
            return cancel is not None and cancel.is_set()

        source = iter(windows)
        pending: collections.deque[tuple[AudioWindow, cf.Future]] = collections.deque()
        deferred: Exception | None = None
        exhausted = False
        try:
            while not stopped():
                while not exhausted and len(pending) < self.in_flight:
                    try:
                        w = next(source)
                    except StopIteration:
                        exhausted = True
                    except Exception as e:  # noqa: BLE001 - raised after the windows before it are handed back
                        deferred, exhausted = e, True
                    else:
                        pending.append((w, self._pool.submit(_recognize, w, language)))
                if not pending:
                    break
                w, future = pending[0]
                while not stopped() and not cf.wait([future], timeout=POLL_S).done:
                    pass
                if stopped():
                    break
                pending.popleft()
                yield w, future.result()
            if deferred is not None and not stopped():
                raise deferred
        finally:
            for _, f in pending:
                f.cancel()

    def close(self, now: bool = False) -> None:
        """Stop the workers: after the windows they hold (the default), or `now`, dropping them (a cancelled or
        failed run: nothing they would return is committed any more)."""
        if now:
            for p in list((getattr(self._pool, "_processes", None) or {}).values()):
                p.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> RecognizerPool:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(now=exc_type is not None)
