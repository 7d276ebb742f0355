"""PocketSphinx (the wheel's en-us model) through voice activity, on real espeak-ng speech in real files: the
spoken keywords come back at the times they were spoken, on the video's clock, in every container variant."""

from __future__ import annotations

import shutil
import sys

import pytest
from speech_media import (
    KEYWORDS,
    SILENT_FROM,
    VARIANTS,
    have_tools,
    make_corrupt_audio_video,
    make_speech_video,
)

from vidmini.speech.audio import AudioError, audio_windows
from vidmini.speech.backends import make_backend, transcribe_window
from vidmini.speech.pocketsphinx_asr import PocketSphinxBackend, is_filler
from vidmini.speech.types import Segment, Word
from vidmini.speech.words import segments_from_words

if not have_tools():
    pytest.skip("espeak-ng or ffmpeg is not installed (make sysdeps)", allow_module_level=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "speech_media"


@pytest.fixture(scope="module")
def backend():
    return make_backend("pocketsphinx")


def transcribe(path, backend, window_s: float = 30.0, **kw) -> list[Segment]:
    out = []
    for window in audio_windows(path, window_s=window_s, **kw):
        out.extend(transcribe_window(window, backend, "en"))
    return out


_transcripts: dict = {}


def transcript(video, backend) -> list[Segment]:
    """A variant's transcript in 20 s windows (an edge in the silence after the third sentence), made once."""
    key = str(video.path)
    if key not in _transcripts:
        _transcripts[key] = transcribe(video.path, backend, window_s=20.0)
    return _transcripts[key]


def words_of(segments: list[Segment]) -> list[Word]:
    return [w for s in segments for w in s.words]


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_keywords_recognized_at_their_times(media, backend, variant):
    video = make_speech_video(media, variant)
    segments = transcript(video, backend)
    words = words_of(segments)
    for spoken in video.words:
        hits = [w for w in words if w.text == spoken.word]
        assert hits, f"{spoken.word!r} not heard in {[s.text for s in segments]}"
        assert any(abs(w.start - spoken.start) <= 1.0 for w in hits), (spoken, hits)
        best = min(hits, key=lambda w: abs(w.start - spoken.start))
        assert abs(best.end - spoken.end) <= 1.0
    # segments sorted, words inside their segment and in order, texts made of the words
    assert segments == sorted(segments, key=lambda s: (s.start, s.end))
    for s in segments:
        assert s.start <= s.end and s.text == " ".join(w.text for w in s.words)
        assert all(s.start <= w.start <= w.end <= s.end for w in s.words)
        assert 0.0 <= s.confidence <= 1.0
    assert all(not is_filler(w.text) and "(" not in w.text and 0.0 <= w.confidence <= 1.0 for w in words)
    # nothing before the audio starts, and nothing in the silence at the end
    assert all(w.start >= video.audio_start - 1e-6 for w in words)
    assert not [w for w in words if w.start > SILENT_FROM + (video.audio_start or 0.0)]


def test_a_late_track_shifts_every_word(media, backend):
    early = words_of(transcript(make_speech_video(media, "mp4_aac_16k_mono"), backend))
    late = words_of(transcript(make_speech_video(media, "mp4_audio_late_5s"), backend))
    for keyword in KEYWORDS:
        a = next(w for w in early if w.text == keyword)
        b = next(w for w in late if w.text == keyword)
        assert b.start - a.start == pytest.approx(5.0, abs=0.1)


def test_the_same_audio_gives_the_same_words(media, backend):
    (window,) = list(audio_windows(make_speech_video(media, "mkv_opus").path, window_s=60.0))
    assert transcribe_window(window, backend) == transcribe_window(window, backend)


def test_silence_gives_nothing(media, backend):
    video = make_speech_video(media, "ts_mp2")
    assert transcribe(video.path, backend, start=SILENT_FROM) == []


@pytest.mark.slow
def test_a_damaged_track_keeps_the_words_outside_the_damage(media, backend):
    video, (lo, hi) = make_corrupt_audio_video(media)
    segments = []
    with pytest.raises(AudioError):
        for window in audio_windows(video.path, window_s=10.0):
            segments.extend(transcribe_window(window, backend))
    words = words_of(segments)
    assert not [w for w in words if lo + 0.2 < w.start < hi - 0.2]
    for spoken in video.words:
        heard = any(w.text == spoken.word and abs(w.start - spoken.start) <= 1.0 for w in words)
        assert heard == (not lo <= spoken.start <= hi), spoken


def test_only_english_is_shipped(backend, media):
    with pytest.raises(ValueError, match="en-us"):
        make_backend("pocketsphinx", language="fr")
    window = next(audio_windows(make_speech_video(media, "mp4_aac_16k_mono").path, start=9.0, window_s=3.0))
    with pytest.raises(ValueError, match="only an English"):
        backend.transcribe(window, "de")
    for language in (None, "en", "en-US", "English"):
        assert [w.text for w in words_of(backend.transcribe(window, language))].count("hospital") == 1
    assert backend.name == "pocketsphinx-en-us"


def test_another_model_folder(tmp_path):
    import pocketsphinx

    model = tmp_path / "my-model"
    shutil.copytree(pocketsphinx.get_model_path("en-us"), model)
    b = PocketSphinxBackend(model_dir=model, language="xx")
    assert b.name == "pocketsphinx-my-model"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="needs an acoustic model"):
        PocketSphinxBackend(model_dir=tmp_path / "empty")
    with pytest.raises(ValueError, match="not a directory"):
        make_backend("pocketsphinx", model=str(tmp_path / "missing"))


def test_backend_choice_errors():
    with pytest.raises(ValueError, match="unknown ASR backend 'vosk'"):
        make_backend("vosk")
    with pytest.raises(ValueError, match="needs a model"):
        make_backend("whisper")
    with pytest.raises(ValueError, match="CPU only"):
        make_backend("pocketsphinx", device="cuda")


def test_sounddevice_is_never_imported(backend):
    assert "sounddevice" not in sys.modules


def test_segments_split_at_pauses():
    words = [Word(1.0, 1.4, "a", 0.5), Word(1.5, 2.0, "b", 1.0), Word(3.5, 4.0, "c", None)]
    a, b = segments_from_words(words)
    assert (a.start, a.end, a.text, a.confidence) == (1.0, 2.0, "a b", 0.75)
    assert (b.start, b.end, b.text, b.confidence) == (3.5, 4.0, "c", None)
    assert segments_from_words([]) == []
