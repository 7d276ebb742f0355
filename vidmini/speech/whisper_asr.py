"""Whisper through transformers: any size the user has, from a local folder or the Hugging Face cache (nothing is
downloaded), on the device asked for (float16 on a GPU, float32 on the CPU).

Each call recognizes one speech span (at most 30 s: Whisper's input) with transformers' speech-recognition
pipeline and `return_timestamps="word"`: word times come from the cross-attention alignment heads of the
model's generation config (dynamic time warping), relative to the span; here they are moved onto the video's
clock (the span's start added) and kept inside the span. A checkpoint without alignment heads gets segment
times only (its segments have no words). `language` ("en", "english", "de" ...) is passed to generation;
None lets a multilingual model detect it; an English-only model (".en") accepts only English.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from vidmini.speech.types import SAMPLE_RATE, AudioWindow, Segment, Word

MAX_SPAN_S = 30.0  # Whisper's input window


def resolve_whisper(model: str | Path) -> Path:
    """A local folder as is, else a Hugging Face id from the local cache; ValueError naming what is missing."""
    from vidmini.engine.checkpoint import CheckpointError, resolve_model_dir

    try:
        path = resolve_model_dir(model)
    except CheckpointError:
        raise ValueError(f"whisper model {str(model)!r} not found: pass a local folder or a Hugging Face id "
                         "already in the cache (nothing is downloaded)") from None
    if not (path / "config.json").is_file():
        raise ValueError(f"whisper model {str(model)!r}: {path} has no config.json")
    try:
        kind = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        raise ValueError(f"whisper model {str(model)!r}: {path / 'config.json'} is not a JSON object") from None
    if kind != "whisper":
        raise ValueError(f"{str(model)!r} is a {kind or 'untyped'} model, not Whisper")
    return path


def language_code(language: str | None) -> str | None:
    """Whisper's code for a language name or code ("English" -> "en"); ValueError for one it does not know."""
    if language is None:
        return None
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    key = language.strip().lower().replace("_", "-")
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    if key.split("-")[0] in LANGUAGES:  # "en-us" -> "en"
        return key.split("-")[0]
    raise ValueError(f"whisper does not know the language {language!r} (give a code such as 'en' or a name such "
                     "as 'english')")


class WhisperBackend:
    """`AsrBackend` on a Whisper checkpoint. `max_new_tokens` bounds each call's generation."""

    def __init__(self, model: str | Path, language: str | None = None, device: str = "cpu",
                 dtype=None, max_new_tokens: int | None = None):
        import torch
        from transformers import (
            AutoFeatureExtractor,
            AutoTokenizer,
            WhisperForConditionalGeneration,
            pipeline,
        )

        path = resolve_whisper(model)
        self.device = str(device or "cpu")
        if dtype is None:
            dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        try:
            net = WhisperForConditionalGeneration.from_pretrained(path, local_files_only=True, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            features = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"whisper model {str(model)!r} does not load from {path}: "
                             f"{' '.join(str(e).split())[:300]}") from None
        if features.sampling_rate != SAMPLE_RATE:
            raise ValueError(f"whisper model {str(model)!r} expects {features.sampling_rate} Hz audio, not "
                             f"{SAMPLE_RATE}")
        net.eval()
        gen = net.generation_config
        self.multilingual = bool(getattr(gen, "is_multilingual", True))
        self.word_times = getattr(gen, "alignment_heads", None) is not None
        self.max_new_tokens = max_new_tokens
        self.language = language_code(language)
        self._check_language(self.language)
        ident = str(model).rstrip("/")
        self.name = f"whisper-{Path(ident).name if Path(ident).is_dir() else ident.replace('/', '--')}"
        self._pipe = pipeline("automatic-speech-recognition", model=net, tokenizer=tokenizer,
                              feature_extractor=features, device=self.device, dtype=dtype)
        self._lock = threading.Lock()

    def _check_language(self, code: str | None) -> None:
        if code is not None and not self.multilingual and code != "en":
            raise ValueError(f"this whisper model is English-only; it cannot transcribe {code!r}")

    def _generate_kwargs(self, code: str | None) -> dict:
        kwargs: dict = {}
        if self.max_new_tokens is not None:
            kwargs["max_new_tokens"] = int(self.max_new_tokens)
        if self.multilingual:
            kwargs["task"] = "transcribe"
            if code is not None:
                kwargs["language"] = code
        return kwargs

    def raw(self, window: AudioWindow, language: str | None = None) -> dict:
        """The pipeline's own output for `window` (times relative to its start)."""
        code = language_code(language) if language is not None else self.language
        self._check_language(code)
        samples = np.ascontiguousarray(window.samples[: int(MAX_SPAN_S * SAMPLE_RATE)], dtype=np.float32)
        with self._lock:
            return self._pipe({"raw": samples, "sampling_rate": SAMPLE_RATE},
                              return_timestamps="word" if self.word_times else True,
                              generate_kwargs=self._generate_kwargs(code))

    def transcribe(self, window: AudioWindow, language: str | None = None) -> list[Segment]:
        from vidmini.speech.words import segments_from_words

        if len(window.samples) == 0:
            return []
        out = self.raw(window, language)
        end = min(window.end, window.start + MAX_SPAN_S)
        chunks = []
        for chunk in out.get("chunks") or []:
            text = str(chunk.get("text", "")).strip()
            if not text:
                continue
            s, e = chunk.get("timestamp") or (None, None)
            start = _clamp(window.start + (s or 0.0), window.start, end)
            stop = _clamp(window.start + e if e is not None else end, start, end)
            chunks.append((round(start, 3), round(stop, 3), text))
        if self.word_times:
            return segments_from_words(Word(s, e, text) for s, e, text in chunks)
        if not chunks and str(out.get("text", "")).strip():
            chunks = [(round(window.start, 3), round(end, 3), str(out["text"]).strip())]
        return [Segment(s, e, text) for s, e, text in chunks]


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(x, lo), hi)
