"""The transcript as subtitles (SRT and WebVTT, read back by real parsers) and as the summary JSON's `transcript`
(validated against the published schema)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import jsonschema
import pytest
import speech_media as media
import srt
import webvtt

from vidmini.engine.load import SHIPPED_MODEL_DIR
from vidmini.speech.types import Segment, Word
from vidmini.summaries.formats import (
    CUE_LINES,
    CUE_MAX_S,
    JSON_SCHEMA,
    LINE_CHARS,
    render,
    speech_cues,
    subtitle_cues,
)
from vidmini.summaries.summarize import Span, VideoSummary


def words_at(start: float, text: str, step: float = 0.4) -> tuple[Word, ...]:
    return tuple(Word(round(start + step * i, 3), round(start + step * i + step * 0.8, 3), w, 0.9)
                 for i, w in enumerate(text.split()))


LONG = ("today we talk about the quarterly numbers and why the red apple campaign did better than anyone "
        "expected in the northern region while the banana promotion stalled")
TRANSCRIPT = [
    Segment(1.5, 3.1, "hello and welcome", words_at(1.5, "hello and welcome")),
    Segment(3665.25, 3665.25 + 0.4 * len(LONG.split()), LONG, words_at(3665.25, LONG)),
    Segment(3700.0, 3709.0, "a segment without word times that goes on for quite a while and needs more than "
                            "one cue to fit on the screen at all"),
]


def summary(transcript=TRANSCRIPT) -> VideoSummary:
    return VideoSummary("/videos/talk.mp4", "talk.mp4", "abc-123", "tiny", "general", 60.0, 3720.0, 3720,
                        "a talk", [Span(0.0, 60.0, "a person talks")], timeline=[Span(0.0, 60.0, "a person talks")],
                        transcript=list(transcript))


def stamp(td) -> str:
    s = td.total_seconds()
    return f"{int(s) // 3600:02d}:{int(s) // 60 % 60:02d}:{int(s) % 60:02d}.{td.microseconds // 1000:03d}"


def test_srt_and_vtt_hold_the_speech_as_numbered_wrapped_cues(tmp_path):
    s = summary()
    text = render(s, "srt")
    subs = list(srt.parse(text, ignore_errors=False))
    assert [c.index for c in subs] == list(range(1, len(subs) + 1))
    assert subs[0].content == "hello and welcome"
    assert (subs[0].start.total_seconds(), subs[0].end.total_seconds()) == (1.5, 2.62)
    assert text.startswith("1\n00:00:01,500 --> 00:00:02,620\nhello and welcome\n\n2\n01:01:05,250 --> ")
    # the long segment is cut between words, at their times, into cues of at most two 42-character lines
    long_cues = [c for c in subs if 3665 <= c.start.total_seconds() < 3700]
    assert len(long_cues) > 1
    assert " ".join(c.content.replace("\n", " ") for c in long_cues) == LONG
    assert long_cues[0].start.total_seconds() == 3665.25
    for c in subs:
        lines = c.content.split("\n")
        assert 1 <= len(lines) <= CUE_LINES and all(len(line) <= LINE_CHARS for line in lines)
        assert (c.end - c.start).total_seconds() <= CUE_MAX_S + 1e-6
    for a, b in zip(subs, subs[1:], strict=False):
        assert a.end <= b.start and a.start < a.end  # in order, none overlapping the next
    # the segment without word times: its text in line-sized parts over its time
    tail = [c for c in subs if c.start.total_seconds() >= 3700]
    assert len(tail) == 2 and tail[0].start.total_seconds() == 3700.0 and tail[-1].end.total_seconds() == 3709.0
    assert " ".join(c.content.replace("\n", " ") for c in tail) == TRANSCRIPT[2].text

    (tmp_path / "talk.vtt").write_text(render(s, "vtt"))
    vtt = webvtt.read(str(tmp_path / "talk.vtt"))
    assert [(c.start, c.end, c.text) for c in vtt.captions] == [(stamp(c.start), stamp(c.end), c.content)
                                                                 for c in subs]


def test_subtitles_choose_speech_or_summary():
    spoken = summary()
    silent = summary(transcript=[])
    assert subtitle_cues(silent) == subtitle_cues(silent, "summary") == [Span(0.0, 60.0, "a person talks")]
    assert subtitle_cues(spoken) == speech_cues(spoken)
    assert subtitle_cues(spoken, "summary") == [Span(0.0, 60.0, "a person talks")]
    assert list(srt.parse(render(silent, "srt", "speech"))) == []  # asked for speech: there is none
    assert render(silent, "vtt", "speech").startswith("WEBVTT")
    with pytest.raises(ValueError, match="subtitles must be"):
        subtitle_cues(spoken, "lyrics")


def test_a_short_word_gets_a_readable_cue_that_stops_at_the_next():
    s = summary([Segment(10.0, 10.1, "yes", (Word(10.0, 10.1, "yes"),)),
                 Segment(10.3, 11.0, "no", (Word(10.3, 11.0, "no"),)),
                 Segment(20.0, 20.1, "maybe", ())])
    cues = speech_cues(s)
    assert [(c.start, c.end, c.text) for c in cues] == [(10.0, 10.3, "yes"), (10.3, 11.0, "no"),
                                                         (20.0, 20.5, "maybe")]


def test_the_json_carries_the_transcript_under_the_schema():
    doc = json.loads(render(summary(), "json"))
    jsonschema.validate(doc, JSON_SCHEMA)
    assert [t["text"] for t in doc["transcript"]] == [s.text for s in TRANSCRIPT]
    assert doc["transcript"][0]["words"][0] == {"start": 1.5, "end": 1.82, "text": "hello", "confidence": 0.9}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc | {"transcript": [{"start": 1.0, "end": 2.0}]}, JSON_SCHEMA)


def test_a_remote_summarys_transcript_renders_the_same():
    """`vidmini summarize --server` renders the server's JSON (attribute objects, not Segments)."""
    local = summary()
    as_json = json.loads(render(local, "json"))

    def ns(x):
        if isinstance(x, dict):
            return SimpleNamespace(**{k: ns(v) for k, v in x.items()})
        return [ns(v) for v in x] if isinstance(x, list) else x

    remote = ns(as_json)
    remote.name = local.name
    assert render(remote, "srt") == render(local, "srt")


# ---- end to end: `vidmini summarize` on a video with speech ----------------------------------------------------
@pytest.mark.skipif(not media.have_tools(), reason="needs espeak-ng and ffmpeg")
@pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")
def test_summarize_writes_the_transcript_as_subtitles(tmp_path, monkeypatch):
    from vidmini.cli.main import main as cli

    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    monkeypatch.delenv("VIDMINI_SERVER", raising=False)
    video = media.make_speech_video(tmp_path / "media", "mkv_video_late_2s")  # the clock starts 2 s into the audio
    out = tmp_path / "out"
    args = ["summarize", str(video.path), "--mode", "general", "--window", "30", "--out", str(out), "--quiet",
            *[x for f in ("json", "srt", "vtt") for x in ("--format", f)]]
    assert cli(args) == 0
    stem = video.path.stem
    subs = list(srt.parse((out / f"{stem}.srt").read_text(), ignore_errors=False))
    vtt = webvtt.read(str(out / f"{stem}.vtt"))
    assert [c.text for c in vtt.captions] == [s.content for s in subs] and subs
    for truth in video.words:
        cue = next(s for s in subs if truth.word in s.content.split())
        assert cue.start.total_seconds() - 1.0 <= truth.start <= cue.end.total_seconds() + 1.0, (truth, cue)
    doc = json.loads((out / f"{stem}.json").read_text())
    jsonschema.validate(doc, JSON_SCHEMA)
    spoken = {w["text"]: w["start"] for s in doc["transcript"] for w in s["words"]}
    for truth in video.words:
        assert abs(spoken[truth.word] - truth.start) <= 1.0
    # the summary's own cues, when asked for
    assert cli([*args, "--subtitles", "summary", "--out", str(tmp_path / "out2")]) == 0
    cues = list(srt.parse((tmp_path / "out2" / f"{stem}.srt").read_text()))
    assert [(c.start.total_seconds(), c.end.total_seconds()) for c in cues] == \
        [(t["start"], t["end"]) for t in doc["timeline"]]
