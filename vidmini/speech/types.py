"""What every part of the speech pipeline hands the next: audio windows on the video's clock, transcript
segments with word times, and the protocol an ASR backend implements.

Times are seconds on the video's clock (the clock the stored frames' `timestamps` use: 0 = the first frame's
time after the container's start offset), so a spoken word and the frame shown while it was said line up."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np

SAMPLE_RATE = 16_000  # every backend and the VAD take 16 kHz mono float32 in [-1, 1]


@dataclass(frozen=True)
class AudioWindow:
    """`samples` (float32, mono, SAMPLE_RATE) starting at `start` seconds on the video's clock."""

    start: float
    samples: np.ndarray

    @property
    def end(self) -> float:
        return self.start + len(self.samples) / SAMPLE_RATE


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    text: str
    confidence: float | None = None


@dataclass(frozen=True)
class Segment:
    """One stretch of speech (a VAD segment, or a part of one the recognizer split): its text and words."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = field(default_factory=tuple)
    confidence: float | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Segment:
        words = tuple(Word(**w) for w in data.get("words", ()))
        return cls(data["start"], data["end"], data["text"], words, data.get("confidence"))


class AsrBackend(Protocol):
    """A speech recognizer. `name` (e.g. "pocketsphinx-en-us", "whisper-<model id>") is part of the transcript
    store's identity: another backend or model means another transcript."""

    name: str

    def transcribe(self, window: AudioWindow, language: str | None = None) -> list[Segment]:
        """The segments spoken in `window` (one VAD speech span), times on the video's clock."""
        ...
