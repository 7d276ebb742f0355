"""The Streamlit page logic through Streamlit's AppTest (no browser): the library list, the model panel, a video
page with its player, chat (streamed answers, time ranges, timestamp links that seek), search (moments on the
timeline, relevance plot), the summary tab, errors shown as messages, and per-tab state."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fixtures.app_helpers import corrupt_file, reliable_questions, world_video
from streamlit.testing.v1 import AppTest

from vidmini.service.library import Library, shared_library

SCRIPT = str(Path(__file__).resolve().parents[2] / "vidmini" / "ui" / "main.py")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ui-home")


@pytest.fixture(scope="module")
def world(home, tmp_path_factory):
    """The app's Library (the one the page gets) with one 30 s video ingested: (library, video_id, timeline)."""
    lib: Library = shared_library(home)
    path, timeline = world_video(tmp_path_factory.mktemp("ui-videos"), seed=3)
    job = lib.wait(lib.add(str(path)).job_id, timeout=300)
    assert job.status == "ready", job.error
    return lib, job.video_id, timeline


@pytest.fixture
def app(home, world, monkeypatch):
    monkeypatch.setenv("VIDMINI_HOME", str(home))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    at = AppTest.from_file(SCRIPT, default_timeout=120).run()
    assert not at.exception
    return at


def texts(elements) -> list[str]:
    """Element values as shown (markdown escapes removed)."""
    return [str(e.value).replace("\\", "") for e in elements]


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert found, f"no button {label!r} in {[b.label for b in at.button]}"
    return found[0]


def open_video(at: AppTest, video_id: str) -> AppTest:
    at.button(key=f"open-{video_id}").click().run()
    assert not at.exception
    assert at.get("video"), "the video page shows a player"
    return at


def html_bodies(at: AppTest) -> str:
    return "\n".join(e.proto.body for e in at.get("html"))


def test_library_page_lists_videos_and_the_model(app, world):
    _, video_id, _ = world
    rows = [m for m in texts(app.markdown) if "world-seed3-30s.mp4" in m]
    assert rows and "ready" in rows[0]
    assert any(f"id {video_id[:12]}" in c and "0:30" in c for c in texts(app.caption))
    assert any("DEMO" in i for i in texts(app.info))  # the default model is labelled as a demo
    assert any("device **cpu**" in c for c in texts(app.caption))
    assert any("process memory" in c for c in texts(app.caption))
    assert "vm-file" in html_bodies(app) and "/vidmini/upload" in html_bodies(app)  # the streaming uploader


def test_ask_in_a_time_range_streams_the_answer_and_timestamps_seek(app, world):
    _, video_id, timeline = world
    q = reliable_questions(timeline)[0]
    at = open_video(app, video_id)
    assert at.get("video")[0].proto.start_time == 0
    at.toggle(key=f"limit-{video_id}").set_value(True).run()
    at.slider(key=f"range-{video_id}").set_value((float(q.start_s), float(q.end_s))).run()
    at.chat_input(key=f"ask-{video_id}").set_value(q.question).run()
    assert not at.exception
    answers = [m for m in texts(at.markdown) if m.lower() == q.answer.lower()]
    assert answers, f"{q.question} ({q.start_s}-{q.end_s}s): expected {q.answer!r} in {texts(at.markdown)}"
    details = [c for c in texts(at.caption) if c.startswith("range ")]
    assert details and f"{q.end_s - q.start_s + 1} frames" in details[0] and "(explicit)" in details[0]
    links = [b for b in at.button if re.fullmatch(r"▶ \d+:\d\d", b.label)]
    assert links, "timestamps under the answer"
    target = links[-1]
    m, s = target.label[2:].split(":")
    target.click().run()
    assert at.get("video")[0].proto.start_time == int(m) * 60 + int(s)
    assert "seek 1" in html_bodies(at)  # the browser-side seek that also works for a repeated click


def test_search_marks_moments_on_the_timeline_and_plots_relevance(app, world):
    _, video_id, _ = world
    at = open_video(app, video_id)
    assert "vm-moment" not in html_bodies(at) and "vm-thumb" in html_bodies(at)
    search_box = [t for t in at.text_input if t.label == "Search this video"][0]
    search_box.set_value("the word shown")
    button(at, "Search").click().run()
    assert not at.exception
    assert "vm-moment" in html_bodies(at)
    moments = [b for b in at.button if "score" in b.label]
    assert moments
    assert [e for e in at if "vega" in e.type.lower()] or at.get("arrow_vega_lite_chart"), "relevance plot"
    start = moments[0].label.split(" ")[1].split("–")[0]
    moments[0].click().run()
    m, s = start.split(":")
    assert at.get("video")[0].proto.start_time == int(m) * 60 + int(s)


def test_summary_tab_before_and_after_the_summarizer(app, world, home):
    lib, video_id, _ = world
    at = open_video(app, video_id)
    assert any("no summary yet; run `vidmini summarize`" in i for i in texts(at.info))
    (home / "summaries").mkdir(exist_ok=True)
    summary = home / "summaries" / f"{video_id}.json"  # where `vidmini summarize` copies its JSON
    summary.write_text(json.dumps({"summary": "Shapes drift over a navy background.", "chapters": [
        {"start": 0, "end": 9, "title": "Opening", "summary": ["Shapes enter.", "A digit shows."]},
        {"start": 10, "end": 29, "title": "The word", "summary": ["TOP is shown.", "Shapes leave."]}]}))
    try:
        at.run()
        assert "Shapes drift over a navy background." in texts(at.markdown)
        assert any("The word" in m and "TOP is shown" in m for m in texts(at.markdown))
        chapter = button(at, "▶ 0:10–0:29")
        chapter.click().run()
        assert at.get("video")[0].proto.start_time == 10
    finally:
        summary.unlink()


def test_errors_are_messages_and_the_app_keeps_working(app, world, tmp_path):
    lib, video_id, _ = world
    at = app
    at.text_input[[t.label for t in at.text_input].index("Add a file on the server, or a stream URL")] \
        .set_value("/no/such/video.mp4")
    button(at, "Add").click().run()
    assert any("no such file on the server: /no/such/video.mp4" in e for e in texts(at.error))
    at.text_input[[t.label for t in at.text_input].index("Load another model")].set_value(str(tmp_path))
    button(at, "Load model").click().run()
    assert any("could not load model" in e for e in texts(at.error)), texts(at.error)
    assert not at.exception
    # a corrupt file added by path: its ingest fails, the row says why, the other videos still open
    bad = corrupt_file(tmp_path / "corrupt-by-path.mp4")
    job = lib.add(str(bad))
    lib.wait(job.job_id)
    at.run()
    errors = [e for e in texts(at.error) if "corrupt-by-path.mp4" in e]
    assert errors and ("CorruptMedia" in errors[0] or "NotAVideo" in errors[0])
    at.button(key=f"del-{job.job_id}").click().run()
    assert not [e for e in texts(at.error) if "corrupt-by-path.mp4" in e]
    assert any("deleted" in s for s in texts(at.success))
    open_video(at, video_id)


def test_each_browser_tab_has_its_own_state(home, world, monkeypatch):
    _, video_id, timeline = world
    monkeypatch.setenv("VIDMINI_HOME", str(home))
    q = reliable_questions(timeline)[-1]
    one = open_video(AppTest.from_file(SCRIPT, default_timeout=120).run(), video_id)
    two = open_video(AppTest.from_file(SCRIPT, default_timeout=120).run(), video_id)
    one.chat_input(key=f"ask-{video_id}").set_value(f"At {q.start_s // 60}:{q.start_s % 60:02d}, {q.question}").run()
    assert [m for m in texts(one.chat_message[0].markdown)] == [f"At {q.start_s // 60}:{q.start_s % 60:02d}, "
                                                                 f"{q.question}"]
    two.run()
    assert len(two.chat_message) == 0  # the other tab's chat is not here
    assert two.get("video")[0].proto.start_time == 0


def test_delete_from_the_list(home, world, monkeypatch, tmp_path):
    lib, _, _ = world
    monkeypatch.setenv("VIDMINI_HOME", str(home))
    path, _ = world_video(tmp_path, seed=9, seconds=8)
    job = lib.wait(lib.add(str(path)).job_id)
    at = AppTest.from_file(SCRIPT, default_timeout=120).run()
    assert any(path.name in m for m in texts(at.markdown))
    at.button(key=f"del-{job.video_id}").click().run()
    assert not any(path.name in m for m in texts(at.markdown))
    assert job.video_id not in [r.video_id for r in lib.videos()]
