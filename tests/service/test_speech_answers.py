"""Speech in answers through the service (issue 28), with a tiny random-weight model over a real stored
synthetic-world video and a transcript written into its real transcript store: the heard speech the prompt
carried comes back with the answer (Library, `vidmini ask --json`, the HTTP chat's `vidmini` field), the budget
and the off switch travel through every face, and a question about the speech itself ("what word is said at
0:12?", "when is banana said?") gets the transcript lines that answer it, by retrieval."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from fixtures.app_helpers import world_video

from vidmini.api.server import ServeConfig, VidminiApi, parse_chat
from vidmini.cli.main import main as cli_main
from vidmini.service.asking import reply_of
from vidmini.service.heard import heard_answer, is_speech_question, speech_context, topic_terms
from vidmini.service.library import Library, LibraryError, video_fp_of
from vidmini.service.options import AskOptions, IngestOptions
from vidmini.speech.store import TranscriptStore
from vidmini.speech.types import Segment, Word

NEW = 4  # answer tokens: enough to compare answers, short enough to run fast


def said(start: float, text: str) -> Segment:
    words = tuple(Word(start + 0.5 * i, start + 0.5 * i + 0.4, w) for i, w in enumerate(text.split()))
    return Segment(start, words[-1].end, text, words)


SPEECH = [said(2, "hello and welcome"), said(12, "the magic word is banana"), said(15, "look at the red square"),
          said(21, "now something else")]


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_ckpt):
    """(library, video id, video path): a 24 s world video stored with the tiny model, and its transcript."""
    root = tmp_path_factory.mktemp("speech-home")
    path, _ = world_video(tmp_path_factory.mktemp("speech-videos"), seed=5, seconds=24)
    lib = Library(root, model=str(tiny_ckpt))
    video_id = lib.ingest(str(path), IngestOptions(asr="none")).video_id
    transcript = TranscriptStore.open(root, video_fp_of(video_id), "pocketsphinx-en-us")
    transcript.append_window(0.0, 24.0, SPEECH)
    transcript.mark_complete(24.0)
    yield lib, video_id, path
    lib.close()


def lines(items) -> list[tuple[float, str]]:
    return [(x["start"], x["text"]) if isinstance(x, dict) else (x.start, x.text) for x in items]


def options(**kw) -> AskOptions:
    return AskOptions(max_new_tokens=NEW, policy="all", **kw)


def test_the_answer_carries_the_ranges_speech(home):
    lib, video_id, _ = home
    got = lib.answer(video_id, "What is on the screen?", options(start=10, end=20))
    assert lines(got.answer.speech) == [(12, "the magic word is banana"), (15, "look at the red square")]
    assert got.answer.speech_tokens > 0 and got.heard == []  # not a question about the speech
    reply = reply_of(lib, got).to_json()
    assert reply["speech"] == [{"start": 12, "end": 14.4, "text": "the magic word is banana"},
                               {"start": 15, "end": 17.4, "text": "look at the red square"}]
    assert reply["speech_tokens"] == got.answer.speech_tokens


def test_speech_off_or_silence_leaves_the_answer_as_without_a_transcript(home):
    lib, video_id, _ = home
    question = "What colour is the square?"
    off = lib.answer(video_id, question, options(start=5, end=10, speech=False))
    silent = lib.answer(video_id, question, options(start=5, end=10))  # nothing said from 0:05 to 0:10
    zero = lib.answer(video_id, question, options(start=5, end=10, speech_tokens=0))
    assert off.answer.speech == silent.answer.speech == zero.answer.speech == []
    assert off.answer.token_ids == silent.answer.token_ids == zero.answer.token_ids
    key = lib.get_store(video_id).video_id
    session = lib.manager.session(key)
    plan = session.plan(question, 5, 10, speech=speech_context(lib, key, options()))
    assert plan.question_ids.tolist() == lib.engine.prompt(question).question.tolist()
    with pytest.raises(LibraryError, match="speech-tokens"):
        lib.answer(video_id, question, options(speech_tokens=-1))


def test_a_demo_model_gets_no_speech_in_its_prompt(home, tiny_ckpt, tmp_path):
    """The shipped demo model marks itself (`vidmini_demo` in its config): trained without speech in its prompts."""
    lib, video_id, _ = home
    assert speech_context(lib, video_id, options()) is not None
    demo = shutil.copytree(tiny_ckpt, tmp_path / "demo-like")
    config = json.loads((demo / "config.json").read_text())
    (demo / "config.json").write_text(json.dumps(config | {"vidmini_demo": True}))
    other = Library(tmp_path / "home", model=str(demo))
    try:
        assert speech_context(other, video_id, options()) is None
    finally:
        other.close()


@pytest.mark.parametrize("question, expected", [
    ("What word is said at 0:12?", [(12, "the magic word is banana"), (15, "look at the red square"),
                                    (2, "hello and welcome"), (21, "now something else")]),
    ("When is banana said?", [(14, "the magic word is banana")]),  # the word's own time
    ("What did they say about the red square?", [(16.5, "look at the red square")]),  # from "red" on
    ("What did the speaker say about pineapples?", []),
    ("What colour is the square?", []),
])
def test_questions_about_the_speech_are_answered_from_the_transcript(home, question, expected):
    lib, video_id, _ = home
    got = lib.answer(video_id, question, options())
    assert lines(got.heard) == expected


def test_speech_questions_and_their_topics():
    assert is_speech_question("what word is said?") and is_speech_question("When does she mention the budget")
    assert is_speech_question("which word do you hear at 1:02:03?")
    assert not is_speech_question("What colour is the square?") and not is_speech_question("When does it turn red?")
    assert topic_terms("What did the lecturer say about the budget at 12:30?") == ["budget"]
    assert topic_terms("what word is said at 0:12?") == []


def test_heard_lines_stay_in_the_range(home):
    lib, video_id, _ = home
    assert lines(heard_answer(lib, "what is said?", video_id, {"start": 14.5, "end": 22})) == [
        (15, "look at the red square"), (21, "now something else")]


def asgi(app, body: dict) -> tuple[int, dict]:
    """One POST /v1/chat/completions through the ASGI app (no network)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 4000), "server": ("127.0.0.1", 8000),
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())]}
    messages, pending = [], [{"type": "http.request", "body": raw, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.sleep(3600)

    async def send(message):
        messages.append(message)

    asyncio.run(app(scope, receive, send))
    return messages[0]["status"], json.loads(b"".join(m.get("body", b"") for m in messages[1:]))


def chat(video_id: str, question: str, **extra) -> dict:
    return {"model": "vidmini", "max_tokens": NEW, "policy": "all", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"vidmini://{video_id}"}}, {"type": "text", "text": question}]}],
        **extra}


def test_the_chat_endpoint_takes_the_budget_and_returns_the_speech(home):
    lib, video_id, _ = home
    assert parse_chat(chat(video_id, "q?")).options.speech_tokens == AskOptions.speech_tokens
    parsed = parse_chat(chat(video_id, "q?", speech=False, speech_tokens=40)).options
    assert (parsed.speech, parsed.speech_tokens) == (False, 40)
    app = VidminiApi(lib, ServeConfig()).app()
    status, body = asgi(app, chat(video_id, "What word is said at 0:12?", start=10, end=20))
    assert status == 200, body
    extra = body["vidmini"]
    assert lines(extra["speech"]) == [(12, "the magic word is banana"), (15, "look at the red square")]
    assert lines(extra["heard"])[0] == (12, "the magic word is banana")
    direct = lib.answer(video_id, "What word is said at 0:12?", options(start=10, end=20))
    assert extra["token_ids"] == direct.answer.token_ids
    assert body["usage"]["prompt_tokens"] > len(extra["frame_indices"]) + extra["speech_tokens"]
    status, body = asgi(app, chat(video_id, "What word is said at 0:12?", start=10, end=20, speech=False))
    assert status == 200 and body["vidmini"]["speech"] == [] and body["vidmini"]["speech_tokens"] == 0
    for bad in ({"speech_tokens": -3}, {"speech_tokens": "many"}, {"speech": "yes"}):
        status, body = asgi(app, chat(video_id, "q?", **bad))
        assert status == 400 and "speech" in body["error"]["message"], (bad, body)


def test_cli_ask_json_reports_speech_and_heard(home, tiny_ckpt, monkeypatch, capsys):
    lib, video_id, path = home
    monkeypatch.setenv("VIDMINI_HOME", str(lib.root))
    base = ["ask", video_id, "What word is said at 0:12?", "--model", str(tiny_ckpt), "--max-new-tokens", str(NEW),
            "--policy", "all", "--from", "10", "--to", "20", "--json"]
    assert cli_main(base) == 0
    reply = json.loads(capsys.readouterr().out)
    assert lines(reply["speech"]) == [(12, "the magic word is banana"), (15, "look at the red square")]
    assert lines(reply["heard"])[0] == (12, "the magic word is banana")
    assert reply["token_ids"] == lib.answer(video_id, "What word is said at 0:12?",
                                            options(start=10, end=20)).answer.token_ids
    assert cli_main(base + ["--speech-tokens", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["speech"] == []
    assert cli_main(base + ["--no-speech"]) == 0
    assert json.loads(capsys.readouterr().out)["speech"] == []
    # the reference one-pass path reads the same heard speech into its prompt
    assert cli_main(base + ["--no-cache"]) == 0
    assert json.loads(capsys.readouterr().out)["speech"] == reply["speech"]
    assert cli_main(base[:-1]) == 0  # plain text: the answer, then the heard lines with their times
    assert "heard: [0:12] the magic word is banana" in capsys.readouterr().out.splitlines()
    assert Path(path).exists()
