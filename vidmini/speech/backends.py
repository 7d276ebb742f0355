"""Choosing a recognizer, and transcribing one audio window with it: voice activity first, then ASR per span.

Kinds: "pocketsphinx" (the offline default on a CPU: its wheel ships an English model) and "whisper"
(transformers, from a local folder or the Hugging Face cache; never downloads). Backends are imported when
chosen, so PocketSphinx users never import transformers' Whisper and the reverse.
"""

from __future__ import annotations

from vidmini.speech.types import AsrBackend, AudioWindow, Segment

KINDS = ("pocketsphinx", "whisper")


def make_backend(kind: str, model: str | None = None, language: str | None = None, device: str = "cpu",
                 **options) -> AsrBackend:
    """The backend of `kind`. `model`: for "whisper" (required) a folder or a Hugging Face id in the local
    cache; for "pocketsphinx" (optional) a PocketSphinx model folder instead of the shipped en-us one.
    `language` is the default for its `transcribe` calls; `options` go to the backend's constructor."""
    kind = (kind or "").strip().lower()
    if kind == "pocketsphinx":
        from vidmini.speech.pocketsphinx_asr import PocketSphinxBackend

        if device not in ("cpu", None) and not str(device).startswith("cpu"):
            raise ValueError(f"pocketsphinx runs on the CPU only, not on {device!r}")
        return PocketSphinxBackend(model_dir=model, language=language, **options)
    if kind == "whisper":
        if not model:
            raise ValueError("--asr whisper needs a model: a local folder or a Hugging Face id already in the "
                             "cache (e.g. openai/whisper-small); nothing is downloaded")
        from vidmini.speech.whisper_asr import WhisperBackend

        return WhisperBackend(model, language=language, device=device, **options)
    raise ValueError(f"unknown ASR backend {kind!r}: choose one of {', '.join(KINDS)}")


def transcribe_window(window: AudioWindow, backend: AsrBackend, language: str | None = None,
                      **vad_options) -> list[Segment]:
    """Voice activity on `window` (`speech.vad.speech_spans`, `vad_options` passed on), then `backend` on each
    speech span: the segments found, sorted by time, on the video's clock."""
    from vidmini.speech.vad import speech_spans

    segments: list[Segment] = []
    for span in speech_spans(window, **vad_options):
        segments.extend(s for s in backend.transcribe(span, language) if s.text.strip())
    return sorted(segments, key=lambda s: (s.start, s.end))
