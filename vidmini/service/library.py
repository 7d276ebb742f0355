"""The library service: the one API that the CLI and the Streamlit app both call.

A `Library` owns a data root, the loaded model (one per process), the on-disk stores, the search index and a
`SessionManager` (questions from many browser tabs and API clients prefill one at a time and decode together,
batched, each getting the answer it would get alone).
Ingest jobs run in a background worker thread and publish their progress in `IngestJob` records that the UI
polls; the page never waits on an ingest, and other videos stay usable meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from vidmini.common.errors import one_line
from vidmini.engine.detokenize import IncrementalDetokenizer
from vidmini.service.options import AskOptions, IngestOptions, checked_ingest
from vidmini.store.video_store import StoreCatalog, StoreInfo, UnknownVideo

if TYPE_CHECKING:  # torch-backed; imported where used, so that listing the library does not load torch
    from vidmini.engine.inference import Engine
    from vidmini.engine.session import SessionAnswer
    from vidmini.ingest.job import IngestResult, Progress
    from vidmini.summaries.summarize import SummarizeOptions, VideoSummary

COPY_CHUNK = 8 << 20  # bytes per read when streaming an upload to disk: memory stays bounded at any file size
UPLOADS = "uploads"
SUMMARIES = "summaries"
SAMPLE_SECONDS, SAMPLE_SEED = 120, 7
DEFAULT_SESSION_BUDGET = 2 << 30
HEARD_PER_RESULT = 3  # heard moments fetched per moment asked for, before the merge with the seen ones
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class LibraryError(ValueError):
    """Bad input or a failed operation, with a message meant for a person (one line)."""


class ModelLoadError(LibraryError):
    """The model asked for does not load (missing, not a checkpoint, not in the local cache)."""


# ---- small helpers --------------------------------------------------------------------------------------------
def sanitize_filename(name: str, max_len: int = 120) -> str:
    """A file name safe to create under the uploads folder: the last path component only (no '..', no
    separators, no leading dot), ASCII letters, digits, '.', '_' and '-', never empty."""
    base = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    base = base.replace("\\", "/").split("/")[-1]
    base = _UNSAFE.sub("_", base).strip("._-")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    ext = ext[:12]
    stem = stem[: max_len - len(ext) - 1] or "upload"
    return f"{stem}.{ext}" if ext else stem


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def process_rss_bytes() -> int | None:
    """Resident memory of this process (Linux /proc), for the model panel."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# ---- state records --------------------------------------------------------------------------------------------
@dataclass
class IngestJob:
    """One ingest, as the UI sees it. Written by the worker thread, read by page reruns (plain fields only)."""

    job_id: str
    source: str
    name: str
    status: str = "queued"  # queued | ingesting | ready | failed | cancelled
    frames_done: int = 0
    total: int | None = None
    rate_fps: float = 0.0
    eta_s: float | None = None
    video_id: str | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    finished: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def fraction(self) -> float | None:
        if self.status == "ready":
            return 1.0
        if self.total:
            return min(1.0, self.frames_done / self.total)
        return None

    @property
    def active(self) -> bool:
        return self.status in ("queued", "ingesting")


@dataclass
class VideoRow:
    """A line of the library listing: a stored video, or an ingest that has no store yet."""

    video_id: str | None
    name: str
    source: str
    status: str  # ready | ingesting | queued | failed | incomplete | cancelled
    frames: int = 0
    duration: float | None = None
    fraction: float | None = None
    error: str | None = None
    model_id: str = ""
    job_id: str | None = None
    bytes_on_disk: int = 0
    transcript: str = "none"  # the audio's transcript: none | running | incomplete | complete | no_audio | failed

    @property
    def usable(self) -> bool:
        """Questions and search work on it (complete, or a live source that has committed frames)."""
        return self.video_id is not None and self.status == "ready"


@dataclass
class ModelInfo:
    name: str
    location: str
    is_demo: bool
    is_random: bool
    notice: str | None
    device: str
    dtype: str
    parameters: int
    parameter_bytes: int
    process_rss_bytes: int | None
    device_memory_bytes: int | None
    searchable: bool


@dataclass
class AskResult:
    answer: SessionAnswer
    video_id: str
    moments: list = field(default_factory=list)  # for "when …" questions: the top matching moments
    heard: list = field(default_factory=list)  # for questions about the speech: the transcript lines that answer

    @property
    def text(self) -> str:
        return self.answer.text


class Asking:
    """A question in flight: iterate `text()` for the answer as it is generated (text pieces), then `result()`."""

    def __init__(self, library: Library, video_id: str, stream, question: str) -> None:
        self._library, self.video_id, self._stream, self.question = library, video_id, stream, question
        self._result: AskResult | None = None

    def text(self) -> Iterator[str]:
        """Answer text in pieces as tokens are chosen; joined (and stripped) they are the answer's text."""
        tok = self._library.engine.tokenizer
        detok = IncrementalDetokenizer(lambda ids: tok.decode(ids, skip_special_tokens=True))
        started = False
        for ev in self._stream:
            piece = detok.push(ev.token_id)
            if not started:
                piece = piece.lstrip()
                started = bool(piece)
            if piece:
                yield piece
        tail = detok.flush()
        if tail and (started or tail.strip()):
            yield tail if started else tail.lstrip()

    def cancel(self) -> None:
        self._stream.cancel()

    def result(self) -> AskResult:
        if self._result is None:
            answer = self._stream.result()
            from vidmini.service.heard import heard_answer

            moments = self._library.when_moments(self.question, self.video_id, answer.range)
            heard = heard_answer(self._library, self.question, self.video_id, answer.range)
            self._result = AskResult(answer, self.video_id, moments, heard)
        return self._result


@dataclass
class SearchResult:
    query: str
    video_id: str | None
    moments: list
    times: np.ndarray | None = None  # per frame of `video_id`: the relevance-over-time curve
    scores: np.ndarray | None = None


# ---- the service ----------------------------------------------------------------------------------------------
class Library:
    """Videos, the model and questions under one data root. Thread-safe; one per process."""

    def __init__(self, root: str | Path | None = None, model: str | None = None, *, engine: Engine | None = None,
                 device: str = "cpu", dtype: str = "fp32", session_budget_bytes: int = DEFAULT_SESSION_BUDGET,
                 prefusion_budget_bytes: int = 1 << 30, prompt_style: str = "reference") -> None:
        from vidmini.common.paths import data_home

        self.root = Path(root) if root is not None else data_home()
        self.root.mkdir(parents=True, exist_ok=True)
        self.stores = StoreCatalog(self.root)
        self.device, self.dtype, self.prompt_style = device, dtype, prompt_style
        self.session_budget_bytes, self.prefusion_budget_bytes = session_budget_bytes, prefusion_budget_bytes
        self.upload_token = secrets.token_urlsafe(24)  # the app's upload/media routes require it
        self._model_arg = model
        self._engine: Engine | None = engine
        self._choice = None
        self._manager = None
        self._search = None
        self._lock = threading.RLock()  # guards the model, the manager and the job table (not the questions)
        self._jobs: dict[str, IngestJob] = {}
        self._queue: list[tuple[IngestJob, IngestOptions]] = []
        self._wake = threading.Condition(self._lock)
        self._worker: threading.Thread | None = None
        self._transcribing: dict[str, _Transcription] = {}  # video fingerprint → its transcription running now
        self._heard = None  # the transcripts' text search
        self._asr_turn = threading.Lock()  # one transcription at a time

    # ---- the model ----------------------------------------------------------------------------------------
    @property
    def engine(self) -> Engine:
        """The loaded model, loading the configured one on first use."""
        with self._lock:
            if self._engine is None:
                self.load_model(self._model_arg)
            return self._engine

    @property
    def model_loaded(self) -> bool:
        return self._engine is not None

    @property
    def model_choice(self):
        """The model this library runs (or will load on first use), without loading it."""
        from vidmini.engine.load import choose_model

        with self._lock:
            return self._choice if self._choice is not None else choose_model(self._model_arg)

    def load_model(self, name_or_path: str | None = None) -> ModelInfo:
        """Load a model (path or Hugging Face id in the local cache; None: the default) and make it the one
        this process uses. On failure the current model stays and ModelLoadError says why."""
        from vidmini.engine.checkpoint import CheckpointError
        from vidmini.engine.load import choose_model
        from vidmini.service.models import open_model

        choice = choose_model(name_or_path.strip() if name_or_path else None)
        if name_or_path and not Path(choice.location).expanduser().exists() and "/" not in choice.location:
            raise ModelLoadError(f"no model at {choice.location!r}: give a checkpoint folder or a Hugging Face id "
                                 "(owner/name) already downloaded with `vidmini download`")
        try:
            engine = open_model(choice, dtype=self.dtype, device=self.device, prompt_style=self.prompt_style)
        except CheckpointError as e:
            raise ModelLoadError(f"could not load model {choice.location!r}: {one_line(e)}") from None
        except Exception as e:  # noqa: BLE001 - hub, file and format errors alike: the app must keep working
            raise ModelLoadError(f"could not load model {choice.location!r}: {type(e).__name__}: {one_line(e)}") \
                from None
        with self._lock:
            if self._manager is not None:
                self._manager.close_all()
            self._engine, self._choice = engine, choice
            self._manager, self._search = None, None
        return self.model_info()

    def model_info(self) -> ModelInfo:
        import torch

        engine = self.engine
        params = list(engine.model.parameters())
        if engine.retrieval is not None:
            params += list(engine.retrieval.text_model.parameters()) + list(engine.retrieval.visual_projection.parameters())
        device = str(engine.model.device)
        dev_mem = torch.cuda.memory_allocated(engine.model.device) if device.startswith("cuda") else None
        extra = getattr(engine.model.config, "extra", {}) or {}
        notice = extra.get("vidmini_notice")
        choice = self._choice
        return ModelInfo(
            name=engine.name, location=choice.location if choice else engine.name,
            is_demo=bool(engine.is_demo or extra.get("vidmini_demo")), is_random=bool(choice and choice.is_random), notice=notice, device=device,
            dtype=str(engine.model.dtype).removeprefix("torch."), parameters=sum(p.numel() for p in params),
            parameter_bytes=sum(p.numel() * p.element_size() for p in params),
            process_rss_bytes=process_rss_bytes(), device_memory_bytes=dev_mem,
            searchable=engine.retrieval is not None)

    @property
    def manager(self):
        from vidmini.engine.manager import SessionManager

        with self._lock:
            if self._manager is None:
                self._manager = SessionManager(self.engine, self.session_budget_bytes,
                                               {"prefusion_budget_bytes": self.prefusion_budget_bytes})
            return self._manager

    @property
    def searcher(self):
        from vidmini.index.search import MomentSearch

        with self._lock:
            if self._search is None:
                self._search = MomentSearch(self.root, self.engine.retrieval)
            return self._search

    # ---- listing ------------------------------------------------------------------------------------------
    def stored(self) -> list[StoreInfo]:
        return self.stores.list()

    def get_store(self, video_id: str):
        try:
            return self.stores.get(video_id)
        except UnknownVideo as e:
            raise LibraryError(str(e)) from None

    def videos(self) -> list[VideoRow]:
        """Stored videos and running/failed ingests, newest job first, then the rest by name."""
        with self._lock:
            jobs = sorted(self._jobs.values(), key=lambda j: -j.created)
        stored = {i.video_id: i for i in self.stored()}  # one listing per call: the page polls this
        rows: list[VideoRow] = []
        heard: dict[str, str] = {}

        def transcript(video_id: str | None) -> str:
            if not video_id:
                return "none"
            fp = video_fp_of(video_id)
            if fp not in heard:
                heard[fp] = self.transcript_state(fp)["state"]
            return heard[fp]

        seen: set[str] = set()
        sources: set[str] = set()
        for j in jobs:  # newest first: the latest attempt at a source speaks for it
            if j.source in sources:
                continue
            sources.add(j.source)
            if j.status == "ready":
                continue  # listed from its store below
            info = stored.get(j.video_id) if j.video_id else None
            rows.append(VideoRow(j.video_id, j.name, j.source, j.status,
                                 frames=info.frames if info else j.frames_done,
                                 duration=info.duration if info else None, fraction=j.fraction, error=j.error,
                                 model_id=info.model_id if info else "", job_id=j.job_id,
                                 bytes_on_disk=info.bytes_on_disk if info else 0, transcript=transcript(j.video_id)))
            if j.video_id:
                seen.add(j.video_id)
        active = {j.source for j in jobs if j.active}
        for info in stored.values():
            if info.video_id in seen or (not info.complete and info.source in active):
                continue  # a running ingest's store is that job's row, not a second "incomplete" one
            status = "ready" if info.complete else ("failed" if info.failed else "incomplete")
            name = Path(info.source).name if info.source else info.video_id
            rows.append(VideoRow(info.video_id, _display_name(name), info.source, status, info.frames,
                                 info.duration, 1.0 if info.complete else None, info.failed, info.model_id,
                                 bytes_on_disk=info.bytes_on_disk, transcript=transcript(info.video_id)))
        return rows

    def video(self, video_id: str) -> VideoRow:
        for row in self.videos():
            if row.video_id == video_id:
                return row
        raise LibraryError(f"no stored video {video_id!r}")

    def jobs(self) -> list[IngestJob]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def job(self, job_id: str) -> IngestJob:
        with self._lock:
            return self._jobs[job_id]

    # ---- adding -------------------------------------------------------------------------------------------
    def ingest(self, source: str, options: IngestOptions | None = None,
               on_progress: Callable[[Progress], None] | None = None, cancel: threading.Event | None = None,
               on_store: Callable[[str], None] | None = None, wait_transcript: bool = False) -> IngestResult:
        """Ingest one file or stream now (the CLI's path, and the background worker's): store, then index.
        When the model is not loaded yet, a local file's decoding starts first, in a child process, so that it
        overlaps the model's loading (`vidmini.ingest.prefetch`). A file's audio track is transcribed beside the
        frames, on its own thread (`options.asr`); the frames never wait for it: this returns when they are
        stored, unless `wait_transcript` (then `result.extra["transcript"]` says how the transcript ended)."""
        options = checked_ingest(options or IngestOptions())
        prefetched = None
        heard = self._start_transcription(source, options, cancel)  # the video's fingerprint, or None
        following: list[str] = []  # a live recording's transcript, once started
        if heard is None and options.live and options.asr != "none" and Path(source).is_file():
            # A recording still being written: its video's fingerprint is known once its first frames are
            # stored; its transcript follows the file from then on, beside the frames.
            then = on_store

            def on_store(video_id: str) -> None:
                if not following:
                    fp = self._start_transcription(source, options, cancel, live_fp=video_fp_of(video_id))
                    following.append(fp or "")
                if then is not None:
                    then(video_id)
        if not self.model_loaded and not options.live and Path(source).is_file():
            from vidmini.engine.load import frame_side_hint
            from vidmini.ingest.prefetch import PrefetchedFrames

            prefetched = PrefetchedFrames(source, options, side=frame_side_hint(self.model_choice))
        try:  # a failed frames' ingest does not stop the transcript: it is the video's, not the model's
            result = self._ingest(source, options, on_progress, cancel, on_store, prefetched)
        finally:
            if prefetched is not None:
                prefetched.close()
        if heard is None and following and following[0]:
            heard = following[0]
        if heard is not None:
            if wait_transcript:
                self.wait_transcript(heard)
            result.extra["transcript"] = self.transcript_state(heard)
        return result

    # ---- the audio's transcript -----------------------------------------------------------------------------
    def _start_transcription(self, source: str, options: IngestOptions, cancel: threading.Event | None,
                             live_fp: str | None = None) -> str | None:
        """Transcribe a local file's audio on a thread of its own, unless it is transcribed already or being
        transcribed now; returns the video's fingerprint (None: no transcript for a stream URL, or `asr` none).
        A growing file (`options.live`) is transcribed only given its live video's fingerprint (`live_fp`): its
        audio is then read as the file grows."""
        from vidmini.common.fingerprint import fingerprint
        from vidmini.ingest.live import is_stream_url

        if options.asr == "none" or is_stream_url(source) or not Path(source).is_file():
            return None
        if options.live and live_fp is None:
            return None
        try:
            fp = live_fp or fingerprint(source)
        except OSError:
            return None  # the frames' ingest reports the unreadable file
        if _transcribed(self.root, fp, options):
            return fp  # nothing to do: no recognizer loaded, no thread
        with self._lock:
            running = self._transcribing.get(fp)
            if running is not None and running.thread.is_alive():
                return fp
            job = _Transcription(fp, str(source), options, cancel or threading.Event(),
                                 follow_idle_s=options.idle_timeout if options.live else None)
            job.thread = threading.Thread(target=self._transcribe, args=(job,), name="vidmini-asr", daemon=True)
            self._transcribing[fp] = job
            job.thread.start()
        return fp

    def _transcribe(self, job: _Transcription) -> None:
        """One video's transcription, watched from its own thread: the recognizer runs in a child process at a
        lower priority (it holds the interpreter lock while it decodes; here it would stall the frames).
        Transcriptions of stored files run one at a time: the cores are the frames' first. A recording still
        being written does not take that turn: it lasts as long as the recording, at the pace of its audio."""
        o = job.options
        try:
            from vidmini.ingest.errors import IngestError
            from vidmini.ingest.options import ASR_WINDOW_S
            from vidmini.speech.audio import probe_audio
            from vidmini.speech.ingest import start_child
            from vidmini.speech.store import NO_AUDIO, TranscriptStore

            turn = self._asr_turn if job.follow_idle_s is None else threading.Lock()
            while not turn.acquire(timeout=0.2):
                if job.cancel.is_set():
                    return
            try:
                try:
                    info = probe_audio(job.source)
                except IngestError:
                    return  # not a readable file: the frames' ingest says so, once
                if info is None:  # recorded without starting a recognizer
                    TranscriptStore.open(self.root, job.video_fp, NO_AUDIO, source=job.source).mark_no_audio()
                    return
                child = start_child(self.root, job.video_fp, job.source, o.asr, o.asr_model, o.language,
                                    self.device if o.asr == "whisper" else "cpu", ASR_WINDOW_S, o.asr_workers,
                                    job.follow_idle_s)
                while child.poll() is None:
                    if job.cancel.wait(0.2):
                        child.terminate()  # its commits are atomic: a later ingest resumes after the last one
                        child.wait()
                        return
                if child.returncode != 0:  # it said why on stderr, and marked the transcript failed
                    job.error = f"the transcription ended with status {child.returncode}"
            finally:
                turn.release()
        except Exception as e:  # noqa: BLE001 - the audio must never cost the frames; one line says why
            job.error = one_line(e)
            print(f"vidmini: warning: {Path(job.source).name}: no transcript ({type(e).__name__}: {job.error}); "
                  "the frames are not affected", file=sys.stderr, flush=True)
        finally:
            with self._lock:  # a failed one stays listed (ended), so that its state says why
                if self._transcribing.get(job.video_fp) is job and job.error is None:
                    del self._transcribing[job.video_fp]

    def transcript_state(self, video_fp: str) -> dict:
        """A video's transcript (by the frames' store's fingerprint): {"state": none | running | incomplete |
        complete | no_audio | failed, "backend", "covered_until", "segments", "gaps", "error"}."""
        from vidmini.speech.store import transcript_state

        with self._lock:
            job = self._transcribing.get(video_fp)
            running = job is not None and job.thread.is_alive()
        state = transcript_state(self.root, video_fp, running=running)
        if job is not None and not running and job.error and state["state"] in ("none", "incomplete"):
            state = {**state, "state": "failed", "error": job.error}
        return state

    def transcript(self, video_id: str, start: float | None = None, end: float | None = None,
                   wait: bool = False) -> list:
        """A stored video's transcript segments (vidmini.speech.types.Segment) overlapping [start, end]; `wait`:
        for a transcription running now to end first."""
        from vidmini.speech.store import TranscriptStore

        fp = video_fp_of(self.get_store(video_id).video_id)
        if wait:
            self.wait_transcript(fp)
        best = TranscriptStore.best(self.root, fp)
        return best.segments(start, end) if best is not None else []

    def wait_transcript(self, video_fp: str | None = None, timeout: float | None = None) -> None:
        """Until the transcription of one video (None: every one running) ends."""
        with self._lock:
            jobs = [j for fp, j in self._transcribing.items() if video_fp is None or fp == video_fp]
        for j in jobs:
            j.thread.join(timeout)

    def _ingest(self, source: str, options: IngestOptions, on_progress, cancel, on_store, prefetched) -> IngestResult:
        from vidmini.index.library import LibraryIndex, NotIndexed
        from vidmini.ingest.job import run_ingest
        from vidmini.ingest.live import is_stream_url

        engine = self.engine
        index = LibraryIndex(self.root)
        live = options.live or is_stream_url(source)
        seen: list[str] = []

        def on_chunk(store, first: int, embeddings) -> None:
            if not seen:
                seen.append(store.video_id)
                if on_store is not None:
                    on_store(store.video_id)
            if live:  # a live source's frames become searchable chunk by chunk; a file's when it is done
                index.add_chunk(store, first, embeddings)

        result = run_ingest(source, engine, self.root, options, on_progress=on_progress, cancel=cancel,
                            on_chunk=on_chunk, prefetched=prefetched)
        if engine.retrieval is not None:
            try:
                index.sync()
            except NotIndexed:
                pass
        return result

    def add(self, source: str, options: IngestOptions | None = None, name: str | None = None) -> IngestJob:
        """Queue a file on this machine or a stream URL for ingest in the background; returns its job."""
        from vidmini.ingest.live import is_stream_url

        source = str(source).strip()
        if not source:
            raise LibraryError("give a file path or a stream URL")
        options = options or IngestOptions()
        try:
            options.check()
        except ValueError as e:
            raise LibraryError(str(e)) from None
        if not is_stream_url(source):
            path = Path(source).expanduser()
            if not path.exists():
                raise LibraryError(f"no such file on the server: {source}")
            if path.is_dir():
                raise LibraryError(f"{source} is a folder, not a video file")
            if not os.access(path, os.R_OK):
                raise LibraryError(f"{source} is not readable by the app")
            source = str(path.resolve())
        job = IngestJob(uuid.uuid4().hex[:12], source, name or _display_name(Path(source).name or source))
        with self._lock:
            self._jobs[job.job_id] = job
            self._queue.append((job, options))
            self._wake.notify_all()
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="vidmini-ingest", daemon=True)
                self._worker.start()
        return job

    def save_upload(self, data: BinaryIO, filename: str) -> Path:
        """Stream a file-like object to `<root>/uploads/<unique>-<sanitized name>` in COPY_CHUNK pieces (never
        the whole file in memory); the name cannot point outside the uploads folder."""
        folder = self.root / UPLOADS
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{uuid.uuid4().hex[:8]}-{sanitize_filename(filename)}"
        if not _inside(dest, folder):  # cannot happen after sanitizing; checked anyway
            raise LibraryError(f"refused upload name {filename!r}")
        tmp = dest.with_name(dest.name + ".part")
        try:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(data, out, COPY_CHUNK)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return dest

    def open_upload(self, filename: str) -> tuple[Path, BinaryIO]:
        """For a server route that receives the bytes in pieces: the final path and an open temp file; call
        `finish_upload` (or `abort_upload`) after writing."""
        folder = self.root / UPLOADS
        folder.mkdir(parents=True, exist_ok=True)
        dest = folder / f"{uuid.uuid4().hex[:8]}-{sanitize_filename(filename)}"
        if not _inside(dest, folder):
            raise LibraryError(f"refused upload name {filename!r}")
        return dest, open(dest.with_name(dest.name + ".part"), "wb")

    @staticmethod
    def finish_upload(dest: Path, handle: BinaryIO) -> Path:
        handle.close()
        os.replace(dest.with_name(dest.name + ".part"), dest)
        return dest

    @staticmethod
    def abort_upload(dest: Path, handle: BinaryIO) -> None:
        handle.close()
        dest.with_name(dest.name + ".part").unlink(missing_ok=True)

    def add_upload(self, data: BinaryIO, filename: str, options: IngestOptions | None = None) -> IngestJob:
        """An uploaded file: streamed to disk under the data root, then queued for ingest."""
        path = self.save_upload(data, filename)
        return self.add(str(path), options, name=_display_name(path.name))

    def _work(self) -> None:
        """The ingest worker: one job at a time (one model, a few cores); errors end up in the job record."""
        from vidmini.ingest.errors import IngestError
        from vidmini.store.video_store import StoreConflict

        while True:
            with self._lock:
                while not self._queue:
                    if not self._wake.wait(timeout=30):
                        self._worker = None
                        return
                job, options = self._queue.pop(0)
                if job.cancel.is_set():
                    job.status, job.finished = "cancelled", time.time()
                    continue
                job.status = "ingesting"

            def progress(p: Progress, job: IngestJob = job) -> None:
                job.frames_done, job.total, job.rate_fps, job.eta_s = p.frames_done, p.total, p.rate_fps, p.eta_s

            def on_store(video_id: str, job: IngestJob = job) -> None:
                job.video_id = video_id

            try:
                result = self.ingest(job.source, options, on_progress=progress, cancel=job.cancel, on_store=on_store)
                job.video_id = result.video_id
                job.frames_done = result.frames
                job.status = "cancelled" if job.cancel.is_set() else "ready"
                self._drop_duplicate_upload(job, result)
            except (IngestError, StoreConflict, OSError, ValueError, RuntimeError) as e:
                job.status, job.error = ("cancelled", None) if job.cancel.is_set() else ("failed", _why(e))
            except Exception as e:  # noqa: BLE001 - a job must never kill the worker; the UI shows the message
                job.status, job.error = "failed", f"ingest failed: {type(e).__name__}: {one_line(e)}"
            job.finished = time.time()

    def _drop_duplicate_upload(self, job: IngestJob, result: IngestResult) -> None:
        """An upload of a video the library already holds reuses that store, whose source is the earlier file:
        the new copy would only take disk space."""
        path = Path(job.source)
        if result.reused and _inside(path, self.root / UPLOADS):
            try:
                source = self.stores.get(result.video_id).manifest["meta"].get("source")
            except UnknownVideo:
                return
            if source and Path(source) != path and Path(source).is_file():
                path.unlink(missing_ok=True)

    def wait(self, job_id: str, timeout: float = 300.0) -> IngestJob:
        """Block until a job ends (tests, scripts)."""
        deadline = time.monotonic() + timeout
        job = self.job(job_id)
        while job.active:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ingest of {job.name} still running after {timeout:.0f}s")
            time.sleep(0.05)
        return job

    # ---- removing -----------------------------------------------------------------------------------------
    def remove(self, video_id: str | None = None, job_id: str | None = None) -> str:
        """Delete a stored video (stopping its ingest first), its index entries, its session and an uploaded
        source file; or forget a failed job. Returns what was removed."""
        from vidmini.index.library import LibraryIndex

        with self._lock:
            jobs = [j for j in self._jobs.values() if (job_id and j.job_id == job_id)
                    or (video_id and j.video_id and j.video_id.startswith(video_id))]
        for j in jobs:
            j.cancel.set()
        for j in jobs:
            if j.status == "ingesting":
                self.wait(j.job_id, timeout=120)
        removed = job_id or video_id or ""
        if video_id is None and jobs and jobs[0].video_id:
            video_id = jobs[0].video_id
        source = None
        if video_id is not None:
            store = self.get_store(video_id)
            video_id = store.video_id
            source = store.manifest["meta"].get("source")
            if self._manager is not None:
                self._manager.close(video_id)
            self.stores.remove(video_id)
            LibraryIndex(self.root).remove_video(video_id)
            self._forget_transcripts(video_fp_of(video_id))
            removed = video_id
        with self._lock:
            for j in jobs:
                self._jobs.pop(j.job_id, None)
                if source is None:
                    source = j.source
        if source and _inside(Path(source), self.root / UPLOADS) and not self._source_in_use(source):
            Path(source).unlink(missing_ok=True)
        return removed

    def _forget_transcripts(self, video_fp: str) -> None:
        """A video's transcripts go with its last store (they are shared by every model's store of it)."""
        from vidmini.speech.store import remove_transcripts

        if any(video_fp_of(i.video_id) == video_fp for i in self.stored()):
            return
        with self._lock:
            job = self._transcribing.get(video_fp)
        if job is not None:
            job.cancel.set()
            job.thread.join(60)
        remove_transcripts(self.root, video_fp)

    def _source_in_use(self, source: str) -> bool:
        return any(i.source == source for i in self.stored())

    # ---- questions ----------------------------------------------------------------------------------------
    def _session_key(self, video_id: str) -> str:
        from vidmini.index.search import frame_picker
        from vidmini.store.session import open_store_session

        store = self.get_store(video_id)
        if not store.complete and not store.committed_frames:
            raise LibraryError(f"video {video_id} has no frames yet")
        key = store.video_id
        manager = self.manager
        try:
            session = manager.session(key)  # open (or reopened after eviction)
            if not store.complete and store.committed_frames > session.num_frames:
                manager.close(key)  # a live video grew since its session opened: reopen over every frame so far
                raise KeyError(key)
        except KeyError:
            engine, searcher = self.engine, self.searcher

            def opener(**options):
                fresh = self.stores.get(key)
                return open_store_session(engine, fresh, picker=frame_picker(searcher, key), **options)

            try:
                manager.open(key, opener)
            except ValueError as e:  # states from another model / prompt
                manager.close(key)
                raise LibraryError(f"video {key[:12]} was ingested with another model ({store.manifest['key']['model_id']}); "
                                   f"ingest it again with this one: {one_line(e)}") from None
        return key

    def ask(self, video_id: str, question: str, options: AskOptions | None = None,
            cancel: threading.Event | None = None) -> Asking:
        """A question about a stored video; iterate `.text()` for streamed pieces, then `.result()`. Of
        `options`, the answer's length, sampling, policy, time range and heard speech apply (the pre-fusion budget
        is the library's, set when it was made)."""
        from vidmini.engine.generate import SamplingConfig
        from vidmini.engine.session import Policy
        from vidmini.service.heard import speech_context

        options = options or AskOptions()
        if not question.strip():
            raise LibraryError("empty question")
        try:
            options.check()
            Policy.parse(options.policy)
        except ValueError as e:
            raise LibraryError(str(e)) from None
        key = self._session_key(video_id)
        grammar = None
        if options.json_schema is not None:
            from vidmini.engine.constrained import JsonConstraint

            try:
                grammar = JsonConstraint(self.engine.tokenizer, options.json_schema, self.engine.eos_ids)
            except ValueError as e:  # a schema llguidance cannot compile
                raise LibraryError(one_line(e)) from None
        sampling = SamplingConfig(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                  top_p=options.top_p, seed=options.seed, logprobs=options.logprobs,
                                  stop_ids=self.engine.eos_ids, grammar=grammar)
        try:
            stream = self.manager.ask(key, question, start=options.start, end=options.end, policy=options.policy,
                                      sampling=sampling, cancel=cancel, speech=speech_context(self, key, options))
        except ValueError as e:  # a bad time range
            raise LibraryError(one_line(e)) from None
        return Asking(self, key, stream, question)

    def answer(self, video_id: str, question: str, options: AskOptions | None = None) -> AskResult:
        return self.ask(video_id, question, options).result()

    def when_moments(self, question: str, video_id: str, time_range, k: int = 5) -> list:
        """For "when does …" questions: the top moments (within the range asked about)."""
        from vidmini.engine.retrieval import SearchUnavailable
        from vidmini.index.library import NotIndexed
        from vidmini.index.search import is_when_question

        if self.engine.retrieval is None or not is_when_question(question):
            return []
        try:
            moments = self.searcher.search(question, video_id, k=4 * k)
        except (NotIndexed, SearchUnavailable, UnknownVideo):
            return []
        if time_range is not None:
            start, end = (time_range["start"], time_range["end"]) if isinstance(time_range, dict) else \
                (time_range.start, time_range.end)
            moments = [m for m in moments if m.end >= start and m.start <= end]
        return moments[:k]

    # ---- search -------------------------------------------------------------------------------------------
    def search(self, query: str, video_id: str | None = None, k: int = 10, curve: bool = True) -> SearchResult:
        """Moments matching a description, best first, in one list: seen (the frames match), heard (the query's
        words were said: the transcripts' text search) or both; for one video also every frame's relevance. Works
        on speech alone when the model cannot embed text (or nothing is indexed) but transcripts match."""
        from vidmini.engine.retrieval import SearchUnavailable
        from vidmini.index.library import NotIndexed
        from vidmini.index.moments import fuse_moments

        if not query.strip():
            raise LibraryError("empty search query")
        if k < 1:
            raise LibraryError("k must be at least 1")
        if video_id is not None:
            video_id = self.get_store(video_id).video_id
        moments, times, scores, unseen = [], None, None, None
        try:
            moments = self.searcher.search(query, video_id, k)
            if curve and video_id is not None:
                vectors = self.searcher.index.frame_vectors(video_id)
                q = self.engine.retrieval.embed_text([query])[0].numpy()
                scores = vectors @ q
                times = self.get_store(video_id).timestamps()
        except (SearchUnavailable, NotIndexed, UnknownVideo) as e:
            unseen = e
        try:
            heard = self.heard_search.search(query, video_id, k * HEARD_PER_RESULT)
        except UnknownVideo as e:
            raise LibraryError(one_line(e)) from None
        if unseen is not None and not heard:
            raise LibraryError(one_line(unseen))
        return SearchResult(query, video_id, fuse_moments(moments, heard, k), times, scores)

    @property
    def heard_search(self):
        """Text search over the transcripts (kept: it rebuilds its corpus only when a transcript changed)."""
        from vidmini.index.transcripts import TranscriptSearch

        with self._lock:
            if self._heard is None:
                self._heard = TranscriptSearch(self.root, self.stores)
            return self._heard

    def scenes(self, video_id: str) -> list[float]:
        from vidmini.index.library import NotIndexed
        from vidmini.index.search import MomentSearch

        search = MomentSearch(self.root, None)  # boundaries need frame embeddings, not the text tower
        try:
            return search.scenes(self.get_store(video_id).video_id)
        except (NotIndexed, UnknownVideo) as e:
            raise LibraryError(one_line(e)) from None

    # ---- media --------------------------------------------------------------------------------------------
    def thumbnails(self, video_id: str, count: int = 16) -> list[tuple[float, bytes]]:
        """Up to `count` (time, JPEG) pairs spread over the video: the thumbnails ingest stored beside the
        states (no decoding)."""
        store = self.get_store(video_id)
        n = store.committed_frames
        if n == 0:
            return []
        times = store.timestamps()
        picks = sorted(set(np.round(np.linspace(0, n - 1, min(count, n))).astype(int).tolist()))
        out = []
        for i in picks:
            try:
                out.append((float(times[i]), store.thumbnail(i)))
            except LookupError:
                return []
        return out

    def thumbnail_at(self, video_id: str, frame: int) -> bytes | None:
        try:
            return self.get_store(video_id).thumbnail(frame)
        except (LookupError, IndexError):
            return None

    def media_path(self, video_id: str) -> Path | None:
        """The source file of a stored video, when it is a file that still exists (not a stream)."""
        source = self.get_store(video_id).manifest["meta"].get("source", "")
        path = Path(source)
        return path if source and path.is_file() else None

    def summarize(self, video_id: str, options: SummarizeOptions, source: str | None = None,
                  on_progress: Callable[[int, int], None] | None = None) -> VideoSummary:
        """A stored video's summary (chapters, events or a timeline, by `options.mode`), asked of this library's
        model over the video's warm states; lecture chapters also cut at scene changes when the model can embed."""
        from vidmini.store.session import open_store_session
        from vidmini.summaries.summarize import summarize_session

        store = self.get_store(video_id)
        transcript = self.transcript(store.video_id, wait=True)  # the subtitles, and the JSON's speech
        cuts = self.scenes(store.video_id) if options.mode == "lecture" and self.engine.retrieval is not None else []
        from vidmini.service.heard import speech_context

        speech = speech_context(self, store.video_id, AskOptions()) if transcript else None
        session = open_store_session(self.engine, store)
        try:
            return summarize_session(session, options, source=source or store.manifest["meta"].get("source", ""),
                                     video_id=store.video_id, duration=store.manifest.get("duration"), cuts=cuts,
                                     thumbnail=store.thumbnail, on_progress=on_progress, transcript=transcript,
                                     speech=speech)
        finally:
            session.close()

    def summary(self, video_id: str) -> str | None:
        """The batch summarizer's output for a video, when there is one: `<root>/summaries/<id>.md|.txt|.json`
        or `summary.md|.json` in the store folder (a JSON file's "summary" field)."""
        store = self.get_store(video_id)
        candidates = [self.root / SUMMARIES / f"{store.video_id}{ext}" for ext in (".md", ".txt", ".json")]
        candidates += [store.path / "summary.md", store.path / "summary.json"]
        for path in candidates:
            if not path.is_file():
                continue
            text = path.read_text(errors="replace")
            if path.suffix == ".json":
                try:
                    data = json.loads(text)
                except ValueError:
                    continue
                text = data.get("summary") if isinstance(data, dict) else None
                if isinstance(text, list):
                    text = "\n".join(f"- {line}" for line in text)
                if not isinstance(text, str):
                    continue
            if text.strip():
                return text.strip()
        return None

    def summary_chapters(self, video_id: str) -> list[dict]:
        """Chapters of `vidmini summarize`'s JSON (`<root>/summaries/<id>.json`): start, end, title, summary."""
        path = self.root / SUMMARIES / f"{self.get_store(video_id).video_id}.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return []
        chapters = data.get("chapters") if isinstance(data, dict) else None
        out = []
        for c in chapters if isinstance(chapters, list) else []:
            if isinstance(c, dict) and isinstance(c.get("start"), int | float):
                lines = c.get("summary")
                out.append({"start": float(c["start"]), "end": float(c.get("end", c["start"])),
                            "title": str(c.get("title", "")),
                            "summary": " ".join(lines) if isinstance(lines, list) else str(lines or "")})
        return out

    # ---- the sample video ---------------------------------------------------------------------------------
    def sample_path(self, seconds: int = SAMPLE_SECONDS, seed: int = SAMPLE_SEED,
                    announce: Callable[[Path], None] | None = None) -> Path:
        """The synthetic-world sample video (written once, with its truth JSON beside it; `announce(path)` is
        called before writing it)."""
        from vidmini.demo.render import write_video
        from vidmini.demo.world import generate_timeline

        path = self.root / "samples" / f"synthetic-world-seed{seed}-{seconds}s.mp4"
        if not path.exists() or not path.with_suffix(".json").exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            if announce is not None:
                announce(path)
            write_video(generate_timeline(seed, seconds), path)
        return path

    def ensure_sample(self, seconds: int = SAMPLE_SECONDS, seed: int = SAMPLE_SEED) -> IngestResult:
        """The sample video in the library (a no-op when it is already stored with this model)."""
        return self.ingest(str(self.sample_path(seconds, seed)))

    def close(self) -> None:
        with self._lock:
            for j in self._jobs.values():
                j.cancel.set()
            for t in self._transcribing.values():
                t.cancel.set()
            if self._manager is not None:
                self._manager.close_all()


@dataclass
class _Transcription:
    """A transcription running on its own thread (the library's record of it)."""

    video_fp: str
    source: str
    options: IngestOptions
    cancel: threading.Event
    thread: threading.Thread | None = None
    error: str | None = None
    follow_idle_s: float | None = None  # a recording still being written, read as it grows


def _transcribed(root: Path, video_fp: str, options: IngestOptions) -> bool:
    """Whether the video already has the transcript these options ask for (or is known to have no audio)."""
    from vidmini.speech.store import TranscriptStore

    for t in TranscriptStore.all_for(root, video_fp):
        if t.no_audio:
            return True
        model = Path(options.asr_model).name if options.asr_model else ""
        if t.complete and t.backend.split("-")[0] == options.asr and model in t.backend \
                and t.language == options.language:
            return True
    return False


def video_fp_of(video_id: str) -> str:
    """The content fingerprint in a stored video's id (`<fingerprint>-<model and sampling hash>`): the key its
    transcripts are stored under."""
    return video_id.rsplit("-", 1)[0]


def _display_name(name: str) -> str:
    """Uploads are stored as `<8 hex>-<name>`: show the name."""
    return re.sub(r"^[0-9a-f]{8}-", "", name)


def _why(e: BaseException) -> str:
    from vidmini.ingest.errors import one_line as ingest_line

    return ingest_line(e)


_shared: dict[str, Library] = {}
_shared_lock = threading.Lock()


def share_library(library: Library) -> Library:
    """Make `library` the process's one Library for its data root (`vidmini serve --app`: the API's Library, with
    the model options it was given, is the one the app's page and routes then use)."""
    with _shared_lock:
        _shared[str(library.root)] = library
    return library


def shared_library(root: str | Path | None = None) -> Library:
    """The process's one Library per data root (the Streamlit script runs and the app's HTTP routes share it)."""
    from vidmini.common.paths import data_home

    key = str(Path(root) if root is not None else data_home())
    with _shared_lock:
        if key not in _shared:
            _shared[key] = Library(key)
        return _shared[key]
