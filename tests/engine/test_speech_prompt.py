"""Heard speech in the prompt (issue 28, vidmini/engine/speech_prompt.py) with a tiny random-weight model: the
transcript lines of the range asked about (read from a real transcript store) go into the question's text with
their times, nearest the question's times first within a token budget counted exactly with the model's tokenizer;
with no transcript, nothing said in the range, or speech off, the prompt is the one it was before, id for id."""

from __future__ import annotations

import numpy as np
import pytest

from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.inference import Engine
from vidmini.engine.prompt import build_prompt
from vidmini.engine.session import VideoSession
from vidmini.engine.speech_prompt import HeardLine, SpeechContext, choose_lines
from vidmini.speech.store import TranscriptStore
from vidmini.speech.types import Segment, Word

FP = "5eec4aaa00bb11cc"


def said(start: float, text: str) -> Segment:
    """A segment with one word every 0.5 s (each 0.4 s long), as a recognizer writes them."""
    words = tuple(Word(start + 0.5 * i, start + 0.5 * i + 0.4, w) for i, w in enumerate(text.split()))
    return Segment(start, words[-1].end, text, words)


SPEECH = [said(3, "good morning everyone"), said(12, "the red apple is on the table"),
          said(26, "please open your books"), said(33, "a yellow banana"),
          said(38.5, "now look at the square"),  # 38.5-40.9: 0:40 lies inside it
          said(42, "the circle moves left"), said(48, "thank you all"), said(55, "see you tomorrow")]


def mmss(t: float) -> str:
    return f"{int(t) // 60}:{int(t) % 60:02d}"


def block(lines: list[tuple[float, str]], question: str) -> str:
    """The user's text with heard speech, written out here (not by the code under test)."""
    if not lines:
        return question
    return "Heard speech:\n" + "".join(f"[{mmss(t)}] {text}\n" for t, text in lines) + "\n" + question


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    loaded = load_checkpoint(build_tiny_checkpoint(tmp_path_factory.mktemp("speech_tiny"), seed=5))
    return Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids, encode_batch=60)


@pytest.fixture(scope="module")
def session(engine) -> VideoSession:
    """60 frames at 1 fps (t = 0 … 59)."""
    frames = np.random.default_rng(3).integers(0, 256, (60, 28, 28, 3), dtype=np.uint8)
    return VideoSession.from_states(engine, engine.encode_frames(engine.frame_pixels(frames)),
                                    [float(i) for i in range(60)])


@pytest.fixture(scope="module")
def transcript(tmp_path_factory) -> TranscriptStore:
    """The transcript on disk, in two committed windows, as an ingest writes it."""
    store = TranscriptStore.open(tmp_path_factory.mktemp("transcripts"), FP, "pocketsphinx-en-us")
    store.append_window(0.0, 30.0, [s for s in SPEECH if s.start < 30])
    store.append_window(30.0, 60.0, [s for s in SPEECH if s.start >= 30])
    store.mark_complete(60.0)
    return store


def q_ids(engine: Engine, text: str) -> list[int]:
    return build_prompt(engine.tokenizer, text, engine.prompt_style).question.tolist()


def cost(engine: Engine, lines: list[tuple[float, str]], question: str) -> int:
    """Tokens the heard speech adds to the prompt, counted with the model's own tokenizer."""
    return len(q_ids(engine, block(lines, question))) - len(q_ids(engine, question))


def as_pairs(lines) -> list[tuple[float, str]]:
    return [(line.start, line.text) for line in lines]


def test_the_prompt_carries_the_ranges_lines_with_their_times(engine, session, transcript):
    question = "What is on the table?"
    plan = session.plan(question, start=10, end=35, speech=SpeechContext(transcript.segments, budget=1000))
    expected = [(12, "the red apple is on the table"), (26, "please open your books"), (33, "a yellow banana")]
    assert as_pairs(plan.speech) == expected  # 0:03 and 0:38.5 on are outside [10, 35]
    assert plan.question_ids.tolist() == q_ids(engine, (
        "Heard speech:\n[0:12] the red apple is on the table\n[0:26] please open your books\n"
        "[0:33] a yellow banana\n\nWhat is on the table?"))
    assert plan.speech_tokens == cost(engine, expected, question) > 0
    rendered = engine.tokenizer.decode(plan.question_ids.tolist())
    assert rendered.startswith("\nHeard speech:\n[0:12] the red apple")  # right after the image placeholder
    # the prompt's part before the image (cached with the frames at ingest) is untouched
    assert build_prompt(engine.tokenizer, block(expected, question)).prefix.tolist() == session.engine.prefix_ids.tolist()


def test_nearest_the_questions_time_first_under_a_small_budget(engine, session, transcript):
    question = "What happens at 0:40?"  # the range from the question: 0:25 to 0:55
    nearest_two = [(38.5, "now look at the square"), (42, "the circle moves left")]
    budget = cost(engine, nearest_two, question)
    plan = session.plan(question, speech=SpeechContext(transcript.segments, budget=budget))
    assert (plan.time_range.start, plan.time_range.end) == (25, 55)
    assert as_pairs(plan.speech) == nearest_two and plan.speech_tokens == budget
    # one token less: the nearest line stays, the second is left out whole (never cut)
    plan = session.plan(question, speech=SpeechContext(transcript.segments, budget=budget - 1))
    got = as_pairs(plan.speech)
    assert (38.5, "now look at the square") in got and (42, "the circle moves left") not in got
    assert all(text in {s.text for s in SPEECH} for _, text in got)
    assert plan.speech_tokens == cost(engine, got, question) <= budget - 1


def test_the_budget_is_respected_exactly_and_filled(engine, session, transcript):
    question = "What did the teacher ask for?"
    in_range = [(s.start, s.text) for s in SPEECH if s.end >= 20 and s.start <= 59]
    whole = cost(engine, in_range, question)
    for budget in range(0, whole + 2):
        plan = session.plan(question, start=20, speech=SpeechContext(transcript.segments, budget=budget))
        got = as_pairs(plan.speech)
        assert got == sorted(got)  # shown in time order
        assert plan.speech_tokens == cost(engine, got, question) <= budget, budget
        for line in in_range:  # nothing left out would still have fitted
            if line not in got:
                assert cost(engine, sorted(got + [line]), question) > budget, (budget, line)
    assert as_pairs(plan.speech) == in_range  # the last budget holds every line


def test_no_transcript_nothing_said_or_speech_off_leaves_the_prompt_unchanged(engine, session, tmp_path):
    question = "What colour is the square?"
    bare = session.plan(question, start=5, end=20)
    assert bare.question_ids.tolist() == q_ids(engine, question) and bare.speech == [] and bare.speech_tokens == 0
    empty = TranscriptStore.open(tmp_path, FP, "pocketsphinx-en-us")  # a transcript with nothing in it yet
    silent = TranscriptStore.open(tmp_path, FP, "whisper-tiny")
    silent.append_window(0.0, 60.0, [said(30, "far from the range")])
    for ctx in (SpeechContext(empty.segments), SpeechContext(silent.segments),
                SpeechContext(TranscriptStore.open(tmp_path, FP, "other").segments, budget=0)):
        plan = session.plan(question, start=5, end=20, speech=ctx)
        assert plan.question_ids.tolist() == bare.question_ids.tolist() and plan.speech == []
    off = SpeechContext(silent.segments, budget=0)  # a zero budget: speech off
    plan = session.plan(question, speech=off)
    assert plan.question_ids.tolist() == q_ids(engine, question)
    sampling = SamplingConfig(max_new_tokens=6, stop_ids=())
    with_empty = session.ask(question, 5, 20, "all", sampling, speech=SpeechContext(empty.segments)).result()
    without = session.ask(question, 5, 20, "all", SamplingConfig(max_new_tokens=6, stop_ids=())).result()
    assert with_empty.token_ids == without.token_ids and with_empty.speech == []


def test_the_answer_records_the_lines_it_heard(engine, session, transcript):
    sampling = SamplingConfig(max_new_tokens=4, stop_ids=())
    answer = session.ask("What is on the table?", 10, 14, "all", sampling,
                         speech=SpeechContext(transcript.segments)).result()
    assert answer.speech == [HeardLine(12, 15.4, "the red apple is on the table")]
    out = answer.to_json()
    assert out["speech"] == [{"start": 12, "end": 15.4, "text": "the red apple is on the table"}]
    assert out["speech_tokens"] == cost(engine, [(12, "the red apple is on the table")], "What is on the table?")


def test_line_formatting(engine):
    assert HeardLine(3723.5, 3725.0, "an hour in").render() == "[1:02:03] an hour in\n"
    assert HeardLine(65.9, 66.5, "x").render() == "[1:05] x\n"
    segments = [Segment(1.0, 2.0, "  spread\n over   lines "), Segment(3.0, 4.0, "   "), Segment(3723.5, 3725.0, "late")]
    lines = choose_lines(engine.tokenizer, "q?", segments, 1000)
    assert as_pairs(lines) == [(1.0, "spread over lines"), (3723.5, "late")]  # whitespace folded, empty lines dropped
    assert choose_lines(engine.tokenizer, "q?", segments, 3) == []  # the header alone does not fit
