"""How to ingest: the sampling rate and decoder a face asks for, with every default and range stated once.
Importable without numpy or torch, so that a parser can show them."""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_FPS, MAX_FPS = 0.05, 30.0
MODES = ("exact", "fast")  # exact: the frame displayed at each sampling time; fast: within one frame, quicker
BACKENDS = ("pyav", "ffmpeg", "decord")
HWACCELS = ("cuda",)
LIVE_CHUNK_FRAMES = 4  # a stream's frames become askable and searchable this many at a time (a file's: 32)


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
        return self

    def sampling_key(self) -> str:
        rate = f"every{self.every_k}" if self.every_k else f"fps{self.fps:g}"
        return f"{rate}-{self.mode}-s{self.stream if self.stream is not None else 'auto'}"
