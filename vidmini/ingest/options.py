"""How to ingest: the sampling rate and decoder a face asks for, with every default and range stated once.
Importable without numpy or torch, so that a parser can show them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MIN_FPS, MAX_FPS = 0.05, 30.0
MODES = ("exact", "fast")  # exact: the frame displayed at each sampling time; fast: within one frame, quicker
BACKENDS = ("pyav", "ffmpeg", "decord")
HWACCELS = ("cuda",)
LIVE_CHUNK_FRAMES = 4  # a stream's frames become askable and searchable this many at a time (a file's: 32)
ASR_BACKENDS = ("pocketsphinx", "whisper", "none")  # none: no transcript (--no-audio)
DEFAULT_ASR = "pocketsphinx"  # its wheel ships an English model: works offline on a fresh CPU machine
ASR_WINDOW_S = 30.0  # seconds of audio transcribed and committed at a time
_LANGUAGE = re.compile(r"[A-Za-z]{2,3}([-_][A-Za-z0-9]{2,8})*")


def check_asr_workers(workers: int | None) -> int | None:
    """`workers` if it is None (the recognizer's default) or an int >= 1; ValueError, one line, otherwise."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"asr-workers must be an integer >= 1, got {workers!r}")
    return workers


@dataclass
class IngestOptions:
    fps: float = 1.0
    every_k: int | None = None
    mode: str = "exact"
    stream: int | None = None
    backend: str = "pyav"
    hwaccel: str | None = None  # "cuda": NVDEC through PyAV when available, else software (same frames)
    chunk_frames: int = 32
    queue_chunks: int = 2
    live: bool = False  # a file still being written: follow it until it stops growing
    idle_timeout: float = 5.0
    asr: str = DEFAULT_ASR  # the audio track's transcript, beside the frames: pocketsphinx | whisper | none
    asr_model: str | None = None  # whisper: a local folder or a Hugging Face id in the local cache
    language: str | None = None  # the spoken language (e.g. "en"); None: the recognizer's default or detection
    asr_workers: int | None = None  # processes recognizing audio windows at once; None: a core each for
    # pocketsphinx, 1 for whisper (`speech.parallel.default_workers`); 1: the transcription's own process only

    def check(self) -> IngestOptions:
        """Raise ValueError (one line, for a person) on options no ingest can run with; return self."""
        if self.every_k is None and not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps)
                                         and MIN_FPS <= self.fps <= MAX_FPS):
            raise ValueError(f"fps must be between {MIN_FPS:g} and {MAX_FPS:g}, got {self.fps!r}")
        if self.every_k is not None and self.every_k < 1:
            raise ValueError(f"every-k must be >= 1, got {self.every_k}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.hwaccel not in (None, *HWACCELS):
            raise ValueError(f"hwaccel must be one of {', '.join(HWACCELS)}, got {self.hwaccel!r}")
        if self.chunk_frames < 1 or self.queue_chunks < 1:
            raise ValueError("chunk_frames and queue_chunks must be >= 1")
        if self.asr not in ASR_BACKENDS:
            raise ValueError(f"asr must be one of {', '.join(ASR_BACKENDS)}, got {self.asr!r}")
        if self.asr_model is not None and self.asr != "whisper":
            raise ValueError(f"an ASR model is for the whisper backend, not {self.asr}")
        if self.asr == "whisper" and not self.asr_model:  # refused now, not after the frames are stored
            raise ValueError("asr whisper needs an ASR model: a local folder or a Hugging Face id already in the "
                             "local cache (nothing is downloaded)")
        check_asr_workers(self.asr_workers)
        if self.language is not None:
            if not isinstance(self.language, str) or not _LANGUAGE.fullmatch(self.language):
                raise ValueError(f"language must be a language code such as en or de, got {self.language!r}")
            if self.asr == "pocketsphinx" and self.language.lower().split("-")[0].split("_")[0] != "en":
                raise ValueError(f"pocketsphinx has an English model only; for {self.language!r} use whisper")
        return self

    def sampling_key(self) -> str:
        rate = f"every{self.every_k}" if self.every_k else f"fps{self.fps:g}"
        return f"{rate}-{self.mode}-s{self.stream if self.stream is not None else 'auto'}"
