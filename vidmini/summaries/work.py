"""One file's batch work — ingest (reusing the store), summarize, render — and the options and result that travel
between the driver and its workers (local or Ray actors; all picklable)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vidmini.common.errors import one_line
from vidmini.ingest.options import DEFAULT_ASR, IngestOptions
from vidmini.summaries.formats import render
from vidmini.summaries.summarize import SummarizeOptions

# (options, data home or None for the default, device or None for the options') → the service's Library
LibraryMaker = Callable[["BatchOptions", "str | None", "str | None"], Any]


@dataclass
class BatchOptions:
    summarize: SummarizeOptions = field(default_factory=SummarizeOptions)
    formats: tuple[str, ...] = ("md", "json")
    model: str | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    fps: float = 1.0
    backend: str = "pyav"  # the decoder (same frames either way, so not part of `key`)
    asr: str = DEFAULT_ASR  # the audio's transcript: pocketsphinx | whisper | none
    asr_model: str | None = None
    language: str | None = None
    subtitles: str = "auto"  # srt/vtt: the speech (auto: when there is a transcript) or the summary's cues
    asr_workers: int | None = None  # how fast the transcript is made, not what it says: not part of `key`

    def ingest_options(self) -> IngestOptions:
        return IngestOptions(fps=self.fps, backend=self.backend, asr=self.asr, asr_model=self.asr_model,
                             language=self.language, asr_workers=self.asr_workers)

    def key(self) -> str:
        """What makes two runs' outputs the same: a done input run with another key is done again."""
        s = self.summarize
        key = {"mode": s.mode, "window": s.window_s, "events": list(s.events), "formats": sorted(self.formats),
               "model": self.model or os.environ.get("VIDMINI_MODEL") or "default", "fps": self.fps}
        speech = {"asr": self.asr, "asr_model": self.asr_model, "language": self.language, "subtitles": self.subtitles}
        defaults = {"asr": DEFAULT_ASR, "asr_model": None, "language": None, "subtitles": "auto"}
        key |= {k: v for k, v in speech.items() if v != defaults[k]}  # runs with the defaults keep their old keys
        return json.dumps(key, sort_keys=True)


@dataclass
class FileResult:
    """One input's outcome, as a worker hands it back (picklable; no open files)."""

    source: str
    stem: str
    ok: bool
    error: str | None = None
    video_id: str | None = None
    frames: int = 0
    duration: float | None = None
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)  # format → text
    thumbnails: dict[str, bytes] = field(default_factory=dict)  # path relative to the output folder → JPEG
    reused_store: bool = False



def process_file(library, source: str, stem: str, options: BatchOptions,
                 on_frames: Callable[[str, int, int | None], None] | None = None) -> FileResult:
    """Ingest (reusing the store) and summarize through `library` (the service's Library), then render. Never
    raises for a bad input: the result says why."""
    t0 = time.perf_counter()
    frames = on_frames or (lambda phase, done, total: None)
    try:
        ingested = library.ingest(source, options.ingest_options(),
                                  on_progress=lambda p: frames("ingest", p.frames_done, p.total))
        summary = library.summarize(ingested.video_id, options.summarize, source=source,
                                    on_progress=lambda done, total: frames("summarize", done, total))
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one bad input is reported, the others go on
        return FileResult(source, stem, False, error=one_line(e), seconds=time.perf_counter() - t0)
    thumbs = {}
    for ev in summary.events:
        if ev.thumbnail:
            rel = f"{stem}.thumbs/{ev.thumbnail}"
            thumbs[rel] = summary.thumbnails[ev.thumbnail]
            ev.thumbnail = rel
    outputs = {fmt: render(summary, fmt, options.subtitles) for fmt in options.formats}
    return FileResult(source, stem, True, video_id=ingested.video_id, frames=summary.frames,
                      duration=summary.duration, seconds=time.perf_counter() - t0, outputs=outputs,
                      thumbnails=thumbs, reused_store=ingested.reused)
