"""speech.whisper_asr with a tiny random-weight Whisper built and saved here (model, tokenizer, feature extractor,
generation config with alignment heads), loaded back from a folder and from an offline Hugging Face cache.

Random weights say nothing true: these tests check loading, the errors, language handling, and that word times
(from the alignment heads) are moved onto the video's clock and stay inside the span. The audio is real
espeak-ng speech from a real file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from fixtures.hf_cache import fake_hf_cache
from speech_media import have_tools, make_speech_video

from vidmini.speech.audio import audio_windows
from vidmini.speech.backends import make_backend, transcribe_window
from vidmini.speech.types import SAMPLE_RATE, AudioWindow
from vidmini.speech.vad import speech_spans
from vidmini.speech.whisper_asr import WhisperBackend, language_code

if not have_tools():
    pytest.skip("espeak-ng or ffmpeg is not installed (make sysdeps)", allow_module_level=True)

MAX_NEW = 12


def byte_alphabet() -> list[str]:
    """GPT-2's byte-to-character table (what byte-level BPE vocabularies are written in)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def build_tiny_whisper(out, seed: int = 0, alignment_heads: bool = True, multilingual: bool = True):
    """Save a random 2-layer Whisper (d_model 32) with a byte-level tokenizer in Whisper's token layout:
    <|endoftext|>, <|startoftranscript|>, one token per language, task tokens, <|notimestamps|>, then the
    1501 timestamp tokens <|0.00|> .. <|30.00|>. Generation cannot end early or write non-ASCII bytes, so each
    call yields words."""
    from tokenizers import AddedToken
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, WhisperTokenizer

    alphabet = byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    langs = list(LANGUAGES) if multilingual else []
    specials = ["<|endoftext|>", "<|startoftranscript|>", *[f"<|{c}|>" for c in langs], "<|translate|>",
                "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    stamps = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]
    for token in specials + stamps:
        vocab[token] = len(vocab)
    tok = WhisperTokenizer(vocab=vocab, merges=[], extra_special_tokens=specials[1:])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in stamps])
    assert tok.convert_tokens_to_ids("<|0.00|>") == tok.all_special_ids[-1] + 1  # Whisper's timestamp_begin
    eot, sot = vocab["<|endoftext|>"], vocab["<|startoftranscript|>"]
    cfg = WhisperConfig(vocab_size=len(tok), num_mel_bins=80, encoder_layers=1, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, d_model=32, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_source_positions=1500, max_target_positions=64,
                        decoder_start_token_id=sot, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(cfg).eval()
    not_ascii = [vocab[alphabet[b]] for b in range(256) if not 32 < b < 127]
    gen = GenerationConfig(decoder_start_token_id=sot, eos_token_id=eot, pad_token_id=eot, bos_token_id=eot,
                           no_timestamps_token_id=vocab["<|notimestamps|>"], is_multilingual=multilingual,
                           max_initial_timestamp_index=50, prev_sot_token_id=vocab["<|startofprev|>"],
                           suppress_tokens=[eot, *not_ascii], begin_suppress_tokens=[eot])
    if multilingual:
        gen.lang_to_id = {f"<|{c}|>": vocab[f"<|{c}|>"] for c in langs}
        gen.task_to_id = {"transcribe": vocab["<|transcribe|>"], "translate": vocab["<|translate|>"]}
    if alignment_heads:
        gen.alignment_heads = [[1, 0], [1, 1]]
    model.generation_config = gen
    model.save_pretrained(out)
    tok.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


@pytest.fixture(scope="module")
def backend(tiny):
    return make_backend("whisper", model=str(tiny), max_new_tokens=MAX_NEW)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> AudioWindow:
    """The first spoken sentence of a real file, as the VAD cuts it."""
    video = make_speech_video(tmp_path_factory.getbasetemp() / "speech_media", "mkv_opus")
    window = next(audio_windows(video.path, window_s=30.0))
    return speech_spans(window)[0]


def test_loads_from_a_folder(backend, tiny):
    assert isinstance(backend, WhisperBackend)
    assert backend.name == "whisper-tiny-whisper"
    assert backend.word_times and backend.multilingual
    assert backend.device == "cpu"


def test_word_times_land_on_the_video_clock_inside_the_span(backend, speech):
    segments = backend.transcribe(speech, "en")
    assert segments, "the tiny model cannot stop early (seeded: it writes words for this span in English)"
    words = [w for s in segments for w in s.words]
    assert words
    for s in segments:
        assert speech.start <= s.start <= s.end <= speech.end
        assert s.text == " ".join(w.text for w in s.words)
        assert all(s.start <= w.start <= w.end <= s.end for w in s.words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    # the same samples later on the clock: every time moves by exactly the difference
    later = backend.transcribe(AudioWindow(speech.start + 1000.0, speech.samples), "en")
    moved = [w for s in later for w in s.words]
    assert [w.text for w in moved] == [w.text for w in words]
    assert [w.start - 1000.0 for w in moved] == pytest.approx([w.start for w in words], abs=1e-3)
    assert [w.end - 1000.0 for w in moved] == pytest.approx([w.end for w in words], abs=1e-3)


def test_times_relative_to_the_span_come_from_the_pipeline(backend, speech):
    raw = backend.raw(speech, "en")
    chunks = raw["chunks"]
    assert chunks and all(len(c["timestamp"]) == 2 for c in chunks)
    first = next(c for c in chunks if c["text"].strip())
    got = backend.transcribe(speech, "en")[0].words[0]
    expected = min(max(speech.start + first["timestamp"][0], speech.start), speech.end)
    assert got.start == pytest.approx(expected, abs=1e-3)


def test_through_voice_activity(backend, tmp_path_factory):
    video = make_speech_video(tmp_path_factory.getbasetemp() / "speech_media", "mp4_audio_late_5s")
    window = next(audio_windows(video.path, window_s=30.0))
    spans = speech_spans(window)
    segments = transcribe_window(window, backend, "english")
    assert segments == sorted(segments, key=lambda s: (s.start, s.end))
    for s in segments:  # each inside one speech span, so after the track's late start
        assert any(sp.start <= s.start <= s.end <= sp.end for sp in spans)
        assert s.start >= 5.0


def test_languages(backend, speech, tiny):
    assert language_code("English") == "en" and language_code("en-US") == "en" and language_code("de") == "de"
    assert language_code(None) is None
    with pytest.raises(ValueError, match="klingon"):
        language_code("klingon")
    assert backend._generate_kwargs("de") == {"max_new_tokens": MAX_NEW, "task": "transcribe", "language": "de"}
    assert backend._generate_kwargs(None) == {"max_new_tokens": MAX_NEW, "task": "transcribe"}  # detected
    for s in backend.transcribe(speech, "german"):  # a language the model's generation config knows
        assert speech.start <= s.start <= s.end <= speech.end
    with pytest.raises(ValueError, match="klingon"):
        backend.transcribe(speech, "klingon")


def test_an_english_only_model(tmp_path, speech):
    path = build_tiny_whisper(tmp_path / "tiny.en", multilingual=False)
    b = WhisperBackend(path, max_new_tokens=MAX_NEW)
    assert not b.multilingual
    assert b._generate_kwargs("en") == {"max_new_tokens": MAX_NEW}  # no language token to force
    assert b.transcribe(speech, "en")
    with pytest.raises(ValueError, match="English-only"):
        b.transcribe(speech, "fr")
    with pytest.raises(ValueError, match="English-only"):
        WhisperBackend(path, language="fr")


def test_without_alignment_heads_segments_have_times_but_no_words(tmp_path, speech):
    path = build_tiny_whisper(tmp_path / "no-heads", alignment_heads=False)
    b = WhisperBackend(path, max_new_tokens=MAX_NEW)
    assert not b.word_times
    segments = b.transcribe(speech, "en")
    assert segments
    for s in segments:
        assert s.words == () and s.text
        assert speech.start <= s.start <= s.end <= speech.end


def test_missing_or_broken_models(tmp_path, offline_hub, tiny):
    with pytest.raises(ValueError, match="not found"):
        make_backend("whisper", model=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="not found"):
        make_backend("whisper", model="openai/whisper-tiny")  # not in the (empty, offline) cache
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        make_backend("whisper", model=str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="does not load"):
        make_backend("whisper", model=str(broken))
    not_whisper = tmp_path / "not-whisper"
    shutil.copytree(tiny, not_whisper)
    cfg = json.loads((not_whisper / "config.json").read_text())
    (not_whisper / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="is a bert model, not Whisper"):
        make_backend("whisper", model=str(not_whisper))


def test_loads_from_the_offline_cache(tiny, offline_hub, speech):
    fake_hf_cache(offline_hub, "acme/tiny-whisper", tiny)
    b = make_backend("whisper", model="acme/tiny-whisper", max_new_tokens=MAX_NEW)
    assert b.name == "whisper-acme--tiny-whisper"
    assert b.transcribe(speech, "en")


def test_an_empty_window(backend):
    assert backend.transcribe(AudioWindow(3.0, np.zeros(0, np.float32))) == []
    quiet = AudioWindow(3.0, np.zeros(SAMPLE_RATE, np.float32))
    for s in backend.transcribe(quiet, "en"):
        assert 3.0 <= s.start <= s.end <= 4.0
