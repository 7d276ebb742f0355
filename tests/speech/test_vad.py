"""speech.vad with silero-vad's shipped model on real espeak-ng speech decoded from real files."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from speech_media import SILENT_FROM, have_tools, make_speech_video

from vidmini.speech.audio import audio_windows
from vidmini.speech.types import SAMPLE_RATE, AudioWindow
from vidmini.speech.vad import load_model, merge_spans, speech_spans

if not have_tools():
    pytest.skip("espeak-ng or ffmpeg is not installed (make sysdeps)", allow_module_level=True)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "speech_media"


def whole(path) -> AudioWindow:
    (window,) = list(audio_windows(path, window_s=60.0))
    return window


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


@pytest.mark.parametrize("variant", ["mp4_aac_16k_mono", "mp4_audio_late_5s", "mkv_video_late_2s"])
def test_one_span_around_each_sentence_and_none_in_silence(media, variant):
    video = make_speech_video(media, variant)
    window = whole(video.path)
    spans = speech_spans(window)
    assert len(spans) == len(video.sentences)
    for span, (s, e) in zip(spans, video.sentences, strict=True):
        s = max(s, 0.0)  # the sentence the video cuts into starts at its first frame
        assert span.start <= s + 0.05 and span.end >= e - 0.05  # the whole sentence, onset and tail
        assert span.start >= s - 0.5 and span.end <= e + 0.6  # padded a little, not a lot
        n = round((span.start - window.start) * SAMPLE_RATE)
        assert np.array_equal(span.samples, window.samples[n : n + len(span.samples)])
    for quiet in video.silent_spans():
        assert not any(overlaps((sp.start, sp.end), quiet) for sp in spans), quiet


def test_silence_and_noise_have_no_speech(media):
    video = make_speech_video(media, "mkv_opus")
    (tail,) = list(audio_windows(video.path, start=SILENT_FROM, window_s=60.0))
    assert tail.end - tail.start > 3
    assert speech_spans(tail) == []
    assert speech_spans(AudioWindow(3.0, np.zeros(5 * SAMPLE_RATE, np.float32))) == []
    noise = np.random.default_rng(1).normal(0, 0.01, 5 * SAMPLE_RATE).astype(np.float32)
    assert speech_spans(AudioWindow(3.0, noise)) == []
    assert speech_spans(AudioWindow(3.0, np.zeros(0, np.float32))) == []


def test_spans_are_capped_and_close_ones_merged(media):
    video = make_speech_video(media, "mp4_aac_48k_stereo")
    window = whole(video.path)
    capped = speech_spans(window, max_span_s=1.5)
    assert len(capped) > len(video.sentences)
    assert all(s.end - s.start <= 1.5 + 1e-9 for s in capped)
    for s, e in video.sentences:  # together the pieces still cover every sentence
        inside = sorted((sp.start, sp.end) for sp in capped if overlaps((sp.start, sp.end), (s, e)))
        assert inside[0][0] <= s + 0.05 and inside[-1][1] >= e - 0.05
        assert all(b[0] - a[1] < 0.35 for a, b in zip(inside, inside[1:], strict=False))
    merged = speech_spans(window, merge_gap_s=10.0)  # sentences 7.5 s apart: joined while under 30 s
    assert len(merged) == 1
    (only,) = merged
    assert only.start <= video.sentences[0][0] and only.end >= video.sentences[-1][1]
    assert only.end - only.start <= 30.0
    with pytest.raises(ValueError):
        speech_spans(window, max_span_s=0.3, pad_s=0.2)


def test_merge_spans_rules():
    sr = SAMPLE_RATE
    # padded within bounds; close ones joined; far ones kept apart
    assert merge_spans([(sr, 2 * sr), (2 * sr + 100, 3 * sr)], 10 * sr, 10, 500, 30 * sr) == [(sr - 10, 3 * sr + 10)]
    assert merge_spans([(0, 100), (5000, 6000)], 6010, 10, 500, 30 * sr) == [(0, 110), (4990, 6010)]
    # a span longer than the cap is cut into pieces of at most the cap
    assert merge_spans([(0, 25)], 100, 0, 0, 10) == [(0, 10), (10, 20), (20, 25)]
    # joining would exceed the cap: the second starts where the first ends, no overlap
    assert merge_spans([(0, 8), (9, 15)], 100, 2, 5, 10) == [(0, 10), (10, 17)]


def test_one_model_per_process_and_safe_from_threads(media):
    threads_before = torch.get_num_threads()
    assert load_model() is load_model()
    assert torch.get_num_threads() == threads_before  # silero's import sets one thread: restored
    window = whole(make_speech_video(media, "mp4_aac_16k_mono").path)
    expected = [(s.start, s.end) for s in speech_spans(window)]
    results: list = [None] * 4
    errors: list = []

    def run(i):
        try:
            results[i] = [(s.start, s.end) for s in speech_spans(window)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert not errors
    assert results == [expected] * 4
