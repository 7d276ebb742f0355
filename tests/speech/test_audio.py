"""speech.audio on real files: espeak-ng speech muxed by ffmpeg into mp4/aac, mkv/opus, 48 kHz stereo, MPEG-TS,
a track starting 5 s late, a video starting 2 s after its audio, no audio, damaged and undecodable AAC.

Alignment is checked against the track as written: the decoded audio is cross-correlated with it, and the lag
must be where the variant puts the track on the video's clock (the frames' clock, `ingest.probe.first_pts`)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from speech_media import (
    TRACK_RATE,
    TRACK_S,
    VARIANTS,
    have_tools,
    make_corrupt_audio_video,
    make_silent_video,
    make_speech_video,
    make_undecodable_audio_video,
    speech_track,
)

from vidmini.ingest.errors import IngestError, SourceNotFound
from vidmini.ingest.probe import probe
from vidmini.speech.audio import AudioError, AudioInfo, audio_windows, clock_origin, probe_audio
from vidmini.speech.types import SAMPLE_RATE

if not have_tools():
    pytest.skip("espeak-ng or ffmpeg is not installed (make sysdeps)", allow_module_level=True)

# (codec, stream sample rate, channels) as each variant is written
STREAMS = {"mp4_aac_16k_mono": ("aac", 16000, 1), "mkv_opus": ("opus", 48000, 1),
           "mp4_aac_48k_stereo": ("aac", 48000, 2), "mp4_audio_late_5s": ("aac", 16000, 1),
           "mkv_video_late_2s": ("opus", 48000, 1), "ts_mp2": ("mp2", 48000, 2)}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "speech_media"


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """The track as written, at 16 kHz."""
    track, _, _ = speech_track()
    n = int(len(track) * SAMPLE_RATE / TRACK_RATE)
    return np.interp(np.arange(n) * TRACK_RATE / SAMPLE_RATE, np.arange(len(track)), track).astype(np.float32)


def track_lag(samples: np.ndarray, start: float, reference: np.ndarray) -> float:
    """Where (video clock, seconds) the reference track's sample 0 lies in `samples` that begin at `start`."""
    n = 1 << int(np.ceil(np.log2(len(samples) + len(reference))))
    c = np.fft.irfft(np.fft.rfft(samples, n) * np.conj(np.fft.rfft(reference, n)), n)
    k = int(np.argmax(c))
    return start + (k if k < n // 2 else k - n) / SAMPLE_RATE


def decode_all(path, **kw):
    windows = list(audio_windows(path, **kw))
    return windows, np.concatenate([w.samples for w in windows])


def shift_of(variant: str) -> float:
    _, _, audio_shift, video_shift = VARIANTS[variant]
    return audio_shift - video_shift


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_probe_audio_describes_the_stream_on_the_video_clock(media, variant):
    video = make_speech_video(media, variant)
    info = probe_audio(video.path)
    codec, rate, channels = STREAMS[variant]
    assert isinstance(info, AudioInfo)
    assert (info.codec, info.sample_rate, info.channels) == (codec, rate, channels)
    # the clock origin is the frames' time 0: the first video frame's pts as ingest.probe reads it
    p = probe(video.path)
    assert info.clock_origin_s == pytest.approx(float(p.first_pts * Fraction(p.time_base)))
    assert info.start_s == pytest.approx(shift_of(variant), abs=0.08)  # AAC priming: up to 1024 samples early
    assert info.duration_s == pytest.approx(TRACK_S, abs=0.15)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_windows_are_16k_mono_consecutive_and_aligned_with_the_frames(media, variant, reference):
    video = make_speech_video(media, variant)
    windows, samples = decode_all(video.path, window_s=10.0)
    for w in windows:
        assert w.samples.dtype == np.float32 and w.samples.ndim == 1
        assert np.abs(w.samples).max() <= 1.0
    assert all(len(w.samples) == 10 * SAMPLE_RATE for w in windows[:-1])
    assert 0 < len(windows[-1].samples) <= 10 * SAMPLE_RATE
    for a, b in zip(windows, windows[1:], strict=False):
        assert b.start == pytest.approx(a.end, abs=1 / SAMPLE_RATE)
    shift = shift_of(variant)
    # the first sample: at the track's start, or at the first frame when the audio began before it
    assert windows[0].start == pytest.approx(max(0.0, shift), abs=0.08)
    assert windows[-1].end == pytest.approx(shift + TRACK_S, abs=0.1)
    # the spoken content sits where the variant put it on the video's clock, to 15 ms
    assert track_lag(samples, windows[0].start, reference) == pytest.approx(shift, abs=0.015)


def test_a_track_starting_5s_late_has_its_sound_at_5s(media, reference):
    video = make_speech_video(media, "mp4_audio_late_5s")
    windows, samples = decode_all(video.path, window_s=30.0)
    assert len(windows) == 1
    assert 4.9 < windows[0].start <= 5.0  # the encoder's priming samples come just before
    assert track_lag(samples, windows[0].start, reference) == pytest.approx(5.0, abs=0.005)
    first_word = video.words[0]
    assert first_word.start == pytest.approx(make_speech_video(media, "mp4_aac_16k_mono").words[0].start + 5.0)
    # silence until the first sentence, then sound right at it
    at = int((video.sentences[0][0] - windows[0].start) * SAMPLE_RATE)
    assert np.abs(samples[: at - 800]).max() < 0.01
    assert np.abs(samples[at : at + 4000]).max() > 0.1


def test_audio_before_the_first_frame_is_dropped(media, reference):
    video = make_speech_video(media, "mkv_video_late_2s")  # the video starts 2 s into the audio
    windows, samples = decode_all(video.path)
    assert windows[0].start == 0.0
    assert track_lag(samples, 0.0, reference) == pytest.approx(-2.0, abs=0.015)
    assert video.words[0].start == pytest.approx(0.576, abs=0.01)


def test_resume_seeks_and_gives_the_same_samples(media):
    for variant in ("mkv_opus", "mp4_aac_48k_stereo", "ts_mp2"):
        path = make_speech_video(media, variant).path
        full, whole = decode_all(path, window_s=5.0)
        tail, part = decode_all(path, start=12.0, window_s=5.0)
        assert tail[0].start == 12.0
        assert [w.start for w in tail] == pytest.approx([12.0, 17.0, 22.0])
        at = round((12.0 - full[0].start) * SAMPLE_RATE)
        n = min(len(part), len(whole) - at)
        assert n > 13 * SAMPLE_RATE
        # the same audio at the same time: to the timestamps' precision (Matroska's is 1 ms), and the same
        # waveform (a resampler restarted elsewhere may sample 48 kHz at another third of a 16 kHz sample: 0.98)
        ref = whole[at : at + n]
        lag = max(range(-48, 49), key=lambda k: float(np.dot(ref[SAMPLE_RATE:-SAMPLE_RATE],
                                                             part[SAMPLE_RATE + k : n - SAMPLE_RATE + k])))
        assert abs(lag) <= 0.0015 * SAMPLE_RATE, variant
        a, b = ref[SAMPLE_RATE:-SAMPLE_RATE], part[SAMPLE_RATE + lag : n - SAMPLE_RATE + lag]
        assert np.corrcoef(a, b)[0, 1] > 0.97, variant
    assert list(audio_windows(path, start=500.0)) == []


def test_a_video_without_audio(media):
    path = make_silent_video(media)
    assert probe_audio(path) is None
    assert list(audio_windows(path)) == []


def test_damaged_packets_become_a_gap_then_an_error(media, reference):
    video, (lo, hi) = make_corrupt_audio_video(media)
    got = []
    with pytest.raises(AudioError) as info:
        for w in audio_windows(video.path, window_s=30.0):
            got.append(w)
    err = info.value
    assert str(video.path) in str(err) and "did not decode" in str(err)
    assert "\n" not in str(err)
    assert len(err.gaps) == 1
    g0, g1 = err.gaps[0]
    assert g0 == pytest.approx(lo, abs=0.1) and g1 == pytest.approx(hi, abs=0.1)
    assert err.decoded_until == pytest.approx(TRACK_S, abs=0.1)
    # what decoded was yielded, on the clock, the lost span silent and the rest where it belongs
    samples = np.concatenate([w.samples for w in got])
    assert got[0].start == 0.0 and got[-1].end == pytest.approx(TRACK_S, abs=0.1)
    lost = samples[int((lo + 0.1) * SAMPLE_RATE) : int((hi - 0.1) * SAMPLE_RATE)]
    assert np.abs(lost).max() == 0.0
    after = samples[int(hi * SAMPLE_RATE) :]
    assert track_lag(after, hi, reference) == pytest.approx(0.0, abs=0.015)


def test_an_undecodable_stream_raises_with_nothing_yielded(media):
    path = make_undecodable_audio_video(media)
    info = probe_audio(path)
    assert info is not None and info.codec == "aac"  # the header is fine
    got = []
    with pytest.raises(AudioError, match="does not decode") as e:
        for w in audio_windows(path):
            got.append(w)
    assert got == [] and e.value.decoded_until is None and e.value.gaps == [(0.0, None)]


def test_bad_arguments_and_missing_files(media, tmp_path):
    path = make_speech_video(media, "mp4_aac_16k_mono").path
    with pytest.raises(ValueError, match="window_s"):
        list(audio_windows(path, window_s=0))
    with pytest.raises(SourceNotFound):
        list(audio_windows(tmp_path / "nope.mp4"))
    with pytest.raises(IngestError):
        probe_audio(tmp_path / "nope.mp4")
    with pytest.raises(AudioError, match="files only"):
        list(audio_windows("rtsp://127.0.0.1:9/stream"))
    with pytest.raises(AudioError, match="no audio stream with index 0"):
        list(audio_windows(path, stream=0))  # stream 0 is the video


def test_the_caller_may_give_the_clock_origin(media, reference):
    video = make_speech_video(media, "ts_mp2")
    origin = clock_origin(video.path)
    assert origin == pytest.approx(1.41, abs=0.01)  # MPEG-TS starts its clock at 1.4 s
    windows, samples = decode_all(video.path, origin=origin - 1.0)  # a clock one second later
    assert track_lag(samples, windows[0].start, reference) == pytest.approx(1.0, abs=0.015)
