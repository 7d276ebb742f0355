"""PocketSphinx: the offline CPU recognizer, English (en-us) from the model its wheel ships.

Each call decodes one speech span as one utterance, with fresh feature state (cepstral mean and noise estimate
from that span alone), so a span's words never depend on what was decoded before it. Words come with their
frames (10 ms each) and posterior probabilities; times are the span's start plus the frame offsets, so on the
video's clock. Silence, noise and sentence markers (<s>, </s>, <sil>, [NOISE], ++GARBAGE++) are dropped and
alternate-pronunciation marks ("read(2)") removed.

A faint, seeded noise floor (`noise_floor`, about -54 dBFS) is added before decoding: PocketSphinx's noise
estimate and mean normalization break down on exact digital silence, which synthetic and screen-recorded audio
around speech often is (20 single words spoken by espeak-ng between 0.5 s of zeros: 2-4 recognized without
it, 8 with it); on real recordings it lies far below the room noise. Seeded per call, so the same audio gives
the same words.

The `pocketsphinx` package declares a dependency on `sounddevice` (PortAudio) for its live-microphone helpers;
nothing here imports it.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np

from vidmini.speech.types import SAMPLE_RATE, AudioWindow, Segment, Word

FRAME_S = 0.01  # PocketSphinx's default frame rate: 100 frames a second
ENGLISH = {"en", "en-us", "en_us", "english", "eng"}
_ALTERNATE = re.compile(r"\(\d+\)$")


def is_filler(token: str) -> bool:
    return token in ("<s>", "</s>", "<sil>", "<unk>") or token.startswith("[") or token.startswith("++")


def _model_files(model_dir: Path) -> dict[str, str]:
    """The acoustic model folder, language model and dictionary of a PocketSphinx model folder."""
    if not model_dir.is_dir():
        raise ValueError(f"pocketsphinx model {str(model_dir)!r} is not a directory")
    hmm = [p for p in sorted(model_dir.rglob("mdef")) if p.is_file()]
    lms = sorted(model_dir.rglob("*.lm.bin")) or sorted(model_dir.rglob("*.lm")) or sorted(model_dir.rglob("*.arpa"))
    lms = [p for p in lms if "phone" not in p.name]
    dicts = sorted(model_dir.rglob("*.dict")) or sorted(model_dir.rglob("*.dic"))
    if not (hmm and lms and dicts):
        raise ValueError(f"pocketsphinx model {str(model_dir)!r} needs an acoustic model folder (with mdef), a "
                         "language model (.lm.bin, .lm or .arpa) and a dictionary (.dict)")
    return {"hmm": str(hmm[0].parent), "lm": str(lms[0]), "dict": str(dicts[0])}


class PocketSphinxBackend:
    """`AsrBackend` on PocketSphinx. `model_dir`: another PocketSphinx model (any language; named by its folder),
    default the wheel's en-us model. One decoder per backend, used by one call at a time."""

    def __init__(self, model_dir: str | Path | None = None, language: str | None = None,
                 noise_floor: float = 0.002, seed: int = 0, **config):
        from pocketsphinx import Decoder  # the compiled decoder only: never the sounddevice helpers

        self.language = language
        self.noise_floor = float(noise_floor)
        self.seed = seed
        if model_dir is None:
            self.name = "pocketsphinx-en-us"
            self._check_language(language)
            files = {}
        else:
            model_dir = Path(model_dir).expanduser()
            files = _model_files(model_dir)
            self.name = f"pocketsphinx-{model_dir.name}"
        self._decoder = Decoder(loglevel="FATAL", **files, **config)
        self._lock = threading.Lock()

    def _check_language(self, language: str | None) -> None:
        if self.name == "pocketsphinx-en-us" and language is not None and language.lower() not in ENGLISH:
            raise ValueError(f"pocketsphinx ships only an English (en-us) model, not {language!r}: use --asr "
                             "whisper for other languages, or a PocketSphinx model folder for that language")

    def _pcm(self, samples: np.ndarray) -> bytes:
        x = np.asarray(samples, dtype=np.float32)
        if self.noise_floor > 0:
            rng = np.random.default_rng(self.seed)
            x = x + rng.normal(0.0, self.noise_floor, len(x)).astype(np.float32)
        return (np.clip(x, -1.0, 1.0) * 32767).astype("<i2").tobytes()

    def words(self, window: AudioWindow) -> list[Word]:
        """The words recognized in `window`, times on its clock."""
        if len(window.samples) < SAMPLE_RATE // 10:
            return []
        pcm = self._pcm(window.samples)
        with self._lock:
            d = self._decoder
            d.reinit_feat()  # fresh noise and mean estimates: a span's words do not depend on the spans before
            d.start_utt()
            d.process_raw(pcm, no_search=False, full_utt=True)
            d.end_utt()
            found = [(s.word, s.start_frame, s.end_frame, s.prob) for s in d.seg()] if d.hyp() is not None else []
        out = []
        for token, first, last, prob in found:
            if is_filler(token):
                continue
            text = _ALTERNATE.sub("", token)
            start = window.start + first * FRAME_S
            end = min(window.end, window.start + (last + 1) * FRAME_S)
            out.append(Word(round(start, 3), round(end, 3), text, round(min(1.0, max(0.0, float(prob))), 4)))
        return out

    def transcribe(self, window: AudioWindow, language: str | None = None) -> list[Segment]:
        from vidmini.speech.words import segments_from_words

        self._check_language(language if language is not None else self.language)
        return segments_from_words(self.words(window))
