"""Spoken words as search moments: BM25 over transcript segments (real stores, real transcripts on disk), the
merge with the seen moments into one ranked list ("seen", "heard", "both"), and, end to end, keywords spoken by
espeak-ng, transcribed by PocketSphinx at ingest, found at the right times through the service, the CLI, REST
and MCP."""

from __future__ import annotations

import json
import os
import time

import pytest
import speech_media as media
import torch

from vidmini.engine.load import SHIPPED_MODEL_DIR
from vidmini.index.moments import Moment, fuse_moments
from vidmini.index.transcripts import TranscriptSearch, query_terms
from vidmini.speech.store import TranscriptStore
from vidmini.speech.types import Segment, Word
from vidmini.store.video_store import StoreKey, VideoStore

FP = "00aa11bb22cc33dd"


def stored_video(root, fp: str = FP, seconds: int = 60, model: str = "tiny") -> VideoStore:
    """A real frames' store of a video sampled at 1 fps (tensors made up: search reads times and thumbnails)."""
    store = VideoStore.open(root, StoreKey(fp, model, "cfg", "fps1"), {"source": f"/videos/{fp}.mp4",
                                                                         "model": {"id": model}})
    for start in range(0, seconds, 20):
        ts = [float(t) for t in range(start, start + 20)]
        store.append_chunk(ts, ts, {"compressed": torch.zeros(20, 4)},
                           thumbnails=[f"jpeg{t}".encode() for t in range(start, start + 20)])
    store.mark_complete([], duration=float(seconds))
    return store


def said(start: float, text: str) -> Segment:
    words = tuple(Word(start + 0.5 * i, start + 0.5 * i + 0.4, w) for i, w in enumerate(text.split()))
    return Segment(start, words[-1].end, text, words)


def transcript(root, fp: str, segments: list[Segment], complete: bool = True) -> TranscriptStore:
    t = TranscriptStore.open(root, fp, "pocketsphinx-en-us")
    t.append_window(0.0, 30.0, [s for s in segments if s.start < 30])
    t.append_window(30.0, 60.0, [s for s in segments if s.start >= 30])
    if complete:
        t.mark_complete(60.0)
    return t


def test_query_terms_drop_the_questions_frame():
    assert query_terms("when does she say banana?") == ["banana"]
    assert query_terms("the red apple") == ["red", "apple"]
    assert query_terms("when is it") == ["when", "is", "it"]  # nothing else left: keep them


def test_spoken_words_are_heard_moments_at_the_words_times(tmp_path):
    video = stored_video(tmp_path)
    transcript(tmp_path, FP, [said(3.0, "good morning everyone"), said(12.0, "the red apple"),
                              said(41.0, "a banana and another red apple"), said(50.0, "thank you")])
    search = TranscriptSearch(tmp_path)
    hits = search.search("red apple", k=5)
    assert [(h.source, h.start, h.text) for h in hits] == [
        ("heard", 12.5, "the red apple"), ("heard", 43.0, "a banana and another red apple")]
    first = hits[0]
    assert (first.video_id, first.end, first.time, first.frame, first.score) == (video.video_id, 13.4, 12.5, 12, 1.0)
    assert first.thumbnail == b"jpeg12"
    assert first.to_json()["source"] == "heard" and first.to_json()["text"] == "the red apple"
    # every word of the query said ranks above a part of it
    partial = search.search("banana split", k=5)
    assert [(h.start, h.score) for h in partial] == [(41.5, 0.5)]
    assert search.search("zebra") == [] and search.search("when is it") == []
    assert [h.start for h in search.search("thank", video=video.video_id[:10])] == [50.0]


def test_a_transcript_serves_every_models_store_of_its_video_and_changes_are_seen(tmp_path):
    a = stored_video(tmp_path, model="tiny")
    b = stored_video(tmp_path, model="other")
    other = stored_video(tmp_path, fp="99ee88ff77aa6655")
    transcript(tmp_path, FP, [said(5.0, "hello world")])
    search = TranscriptSearch(tmp_path)
    assert sorted(h.video_id for h in search.search("hello")) == sorted([a.video_id, b.video_id])
    assert search.search("hello", video=other.video_id) == []
    transcript(tmp_path, "99ee88ff77aa6655", [said(30.5, "hello again")], complete=False)  # a running one
    assert {h.video_id: h.start for h in search.search("hello", video=other.video_id)} == {other.video_id: 30.5}


def moment(start: float, end: float, score: float, video: str = "v") -> Moment:
    return Moment(video, start, end, score, int(start), start, [int(start)])


def test_fusion_merges_overlaps_into_both_and_ranks_one_list():
    seen = [moment(10.0, 12.0, 0.31), moment(40.0, 40.0, 0.29), moment(70.0, 75.0, 0.25)]
    heard = [Moment("v", 41.0, 41.8, 1.0, 41, 41.0, [41], source="heard", text="the red apple"),
             Moment("v", 90.0, 90.5, 1.0, 90, 90.0, [90], source="heard", text="red apple again"),
             Moment("w", 10.5, 11.0, 0.5, 10, 10.5, [10], source="heard", text="apple")]
    out = fuse_moments(seen, heard, k=10)
    assert [(m.video_id, m.source, m.start, m.end) for m in out] == [
        ("v", "both", 40.0, 41.8),  # seen 2nd + heard 1st: first
        ("v", "seen", 10.0, 12.0),
        ("v", "heard", 90.0, 90.5),  # the 2nd heard moment (every word said) before the 3rd seen one
        ("v", "seen", 70.0, 75.0),
        ("w", "heard", 10.5, 11.0)]  # another video's words do not merge with this one's frames
    both = out[0]
    assert (both.text, both.time, both.frame, both.frames, both.score, both.seen_score, both.heard_score) == \
        ("the red apple", 41.0, 41, [40, 41], 0.29, 0.29, 1.0)  # seeks to the words
    assert both.to_json()["source"] == "both" and both.to_json()["text"] == "the red apple"
    assert "text" not in out[1].to_json() and out[1].to_json()["source"] == "seen"
    assert len(fuse_moments(seen, heard, k=2)) == 2
    assert [m.source for m in fuse_moments([], heard[:1], k=3)] == ["heard"]


# ---- end to end: espeak-ng speech, PocketSphinx at ingest, search through every face ----------------------------
needs_media = pytest.mark.skipif(not media.have_tools(), reason="needs espeak-ng and ffmpeg")
needs_model = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """A library (the shipped demo model) holding a video whose keywords are spoken at known times."""
    from vidmini.service.library import Library

    folder = tmp_path_factory.mktemp("spoken-media")
    video = media.make_speech_video(folder, "mp4_aac_16k_mono")
    library = Library(tmp_path_factory.mktemp("spoken-home"))
    result = library.ingest(str(video.path), wait_transcript=True)
    assert result.extra["transcript"]["state"] == "complete"
    yield {"lib": library, "video": video, "id": result.video_id, "folder": folder}
    library.close()


def assert_heard_at(moments: list[dict], word: str, at: float) -> None:
    heard = [m for m in moments if m["source"] in ("heard", "both") and word in m.get("text", "").split()]
    assert heard, f"{word!r} not among {moments}"
    assert abs(heard[0]["time"] - at) <= 1.0 and heard[0]["start"] - 1.0 <= at <= heard[0]["end"] + 1.0, heard[0]


@needs_media
@needs_model
def test_the_service_finds_each_spoken_keyword_at_its_time(spoken):
    lib, video = spoken["lib"], spoken["video"]
    for truth in video.words:
        found = lib.search(truth.word, spoken["id"], k=5)
        moments = [m.to_json() for m in found.moments]
        assert moments[0]["source"] in ("heard", "both"), moments  # every word of the query said: ranked first
        assert_heard_at(moments, truth.word, truth.start)
        assert found.times is not None and len(found.times) == 26  # the visual relevance curve is still there
        anywhere = [m.to_json() for m in lib.search(f"when does she say {truth.word}", k=5).moments]
        assert_heard_at(anywhere, truth.word, truth.start)
    seen_only = [m.to_json()["source"] for m in lib.search("a colour test pattern", spoken["id"], k=3).moments]
    assert seen_only and set(seen_only) <= {"seen", "both"}


@needs_media
@needs_model
def test_cli_search_shows_heard_moments(spoken, monkeypatch, capsys):
    from vidmini.cli.main import main as cli

    monkeypatch.setenv("VIDMINI_HOME", str(spoken["lib"].root))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    monkeypatch.delenv("VIDMINI_SERVER", raising=False)
    truth = spoken["video"].words[2]
    assert cli(["search", truth.word, "--json", "-k", "3"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert_heard_at(found["moments"], truth.word, truth.start)
    assert cli(["search", truth.word, "--video", spoken["id"][:12], "-k", "1"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert ("heard" in line or "both" in line) and truth.word in line and f"0:{int(truth.start):02d}" in line


@needs_media
@needs_model
def test_mcp_search_moments_says_heard(spoken):
    import anyio
    from mcp import Client

    from vidmini.api.mcp_server import build_mcp

    truth = spoken["video"].words[1]

    async def search() -> dict:
        async with Client(build_mcp(spoken["lib"])) as client:
            result = await client.call_tool("search_moments", {"query": truth.word, "video_id": spoken["id"]})
            assert not result.is_error
            listed = await client.call_tool("list_videos", {})
            return result.structured_content | {"videos": listed.structured_content["videos"]}

    found = anyio.run(search)
    assert_heard_at(found["moments"], truth.word, truth.start)
    assert [v["transcript"] for v in found["videos"]] == ["complete"]


@needs_media
@needs_model
def test_rest_adds_with_audio_options_and_searches_speech(spoken, tmp_path):
    from fixtures.serve_helpers import call_json, start_server, stop

    home = tmp_path / "home"
    env = {**os.environ, "VIDMINI_HOME": str(home)}
    env.pop("VIDMINI_MODEL", None)
    proc, base = start_server(["--media-root", str(spoken["folder"])], env)
    try:
        source = str(spoken["video"].path)
        for body, param in [({"asr": "vosk"}, "asr"), ({"asr": "pocketsphinx", "language": "de"}, "language"),
                            ({"no_audio": True, "asr": "whisper"}, "no_audio"), ({"no_audio": "yes"}, "no_audio")]:
            refused = call_json(base, "POST", "/v1/videos", {"source": source, **body})
            assert refused[0] == 400 and refused[1]["error"]["param"] == param, refused
        status, job = call_json(base, "POST", "/v1/videos", {"source": source, "asr": "pocketsphinx", "language": "en",
                                                         "asr_workers": 1})
        assert status == 202, job
        deadline = time.time() + 240
        while True:
            _, job = call_json(base, "GET", f"/v1/jobs/{job['id']}")
            video = call_json(base, "GET", f"/v1/videos/{job['video_id']}")[1] if job["video_id"] else {}
            if job["status"] not in ("queued", "ingesting") and video.get("transcript") not in ("running", "none"):
                break
            assert time.time() < deadline, (job, video)
            time.sleep(0.3)
        assert job["status"] == "ready" and video["transcript"] == "complete", (job, video)
        truth = spoken["video"].words[0]
        status, found = call_json(base, "GET", f"/v1/search?q={truth.word}&video_id={job['video_id']}&k=3")
        assert status == 200, found
        assert_heard_at(found["data"], truth.word, truth.start)
    finally:
        stop(proc)
