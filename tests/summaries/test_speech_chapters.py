"""Lecture chapters made from the speech as well as the frames (issue 28).

With a tiny random-weight model (a general model's prompts): each chapter's title and lines are asked with the
transcript lines of the chapter's own span in the prompt, and no others. With the shipped demo model (trained
without speech, so its prompts carry none) over a video with real speech (espeak-ng sentences at known times,
transcribed by PocketSphinx at ingest): each chapter quotes what was said in it and its title names a spoken
keyword; the summary's JSON carries the transcript."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fixtures.app_helpers import world_video

from vidmini.service.library import Library, video_fp_of
from vidmini.service.options import IngestOptions
from vidmini.speech.store import TranscriptStore
from vidmini.speech.types import Segment
from vidmini.summaries.describe import Asker, ModelDescriber
from vidmini.summaries.summarize import SummarizeOptions

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "speech"))
from speech_media import have_tools, make_speech_video  # noqa: E402

SPEECH = [Segment(3.0, 5.0, "welcome to the lecture"), Segment(9.5, 11.0, "first the theory of waves"),
          Segment(17.0, 19.5, "then an experiment with light")]


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("chapters-home")
    path, _ = world_video(tmp_path_factory.mktemp("chapters-videos"), seed=4, seconds=24)
    lib = Library(root, model=str(tiny_ckpt))
    video_id = lib.ingest(str(path), IngestOptions(asr="none")).video_id
    transcript = TranscriptStore.open(root, video_fp_of(video_id), "pocketsphinx-en-us")
    transcript.append_window(0.0, 24.0, SPEECH)
    transcript.mark_complete(24.0)
    yield lib, video_id
    lib.close()


def test_a_general_models_chapter_prompts_carry_the_chapters_own_speech(tiny_home):
    from vidmini.service.heard import speech_context
    from vidmini.service.options import AskOptions
    from vidmini.store.session import open_store_session

    lib, video_id = tiny_home
    store = lib.get_store(video_id)
    session = open_store_session(lib.engine, store)
    try:
        speech = speech_context(lib, video_id, AskOptions())
        asker = Asker(session, speech=speech)
        describer = ModelDescriber()
        timestamps = session.timestamps
        for frames in (range(0, 8), range(8, 16), range(16, 24)):
            start, end = float(timestamps[frames.start]), float(timestamps[frames.stop - 1])
            asker.speech_used.clear()
            describer.chapter(asker, frames, [], start, end)
            assert len(asker.speech_used) == 2  # the title and the two lines
            for span_start, span_end, lines in asker.speech_used:
                assert (span_start, span_end) == (start, end)
                expected = [(s.start, s.text) for s in SPEECH if s.end > start and s.start < end]
                assert [(x.start, x.text) for x in lines] == expected
    finally:
        session.close()
    # the same asker without a transcript asks with no speech at all
    session = open_store_session(lib.engine, store)
    try:
        plain = Asker(session)
        ModelDescriber().chapter(plain, range(0, 8), [], 0.0, 7.0)
        assert plain.speech_used == []
    finally:
        session.close()


def test_the_library_summary_carries_the_transcript(tiny_home):
    lib, video_id = tiny_home
    summary = lib.summarize(video_id, SummarizeOptions("lecture", window=8.0))
    assert [(s.start, s.text) for s in summary.transcript] == [(s.start, s.text) for s in SPEECH]
    data = json.loads(json.dumps(summary.to_json()))
    assert [seg["text"] for seg in data["transcript"]] == [s.text for s in SPEECH]


@pytest.mark.skipif(not have_tools(), reason="espeak-ng or ffmpeg is missing (`make sysdeps` installs them)")
def test_demo_model_chapters_quote_what_was_said_in_them(tmp_path):
    video = make_speech_video(tmp_path / "media", "mp4_aac_16k_mono")
    lib = Library(tmp_path / "home")
    try:
        video_id = lib.ingest(str(video.path), IngestOptions(), wait_transcript=True).video_id
        assert lib.transcript_state(video_fp_of(video_id))["state"] == "complete"
        summary = lib.summarize(video_id, SummarizeOptions("lecture", window=8.0))
    finally:
        lib.close()
    assert summary.chapters
    for word in video.words:  # each keyword is quoted by the chapter it was said in
        chapter = next(c for c in summary.chapters if c.start <= word.start < c.end)
        said = [line for line in chapter.summary if line.startswith("Said:")]
        assert len(said) == 1 and word.word in said[0], (word, chapter)
    for chapter in summary.chapters:
        quoted = next((line for line in chapter.summary if line.startswith("Said:")), None)
        if quoted is not None:  # its title names a word it quotes
            named = chapter.title.split(": ", 1)[1].split(", ")
            assert named and all(w in quoted.lower() for w in named), chapter
