"""The app in a real browser: `streamlit run streamlit_app.py` on a free localhost port, driven by Debian's
headless Chromium through Selenium (/usr/bin/chromedriver; no browser is downloaded).

One flow, as a person would use it: upload a synthetic-world video (made here, with its ground truth), wait for
the ingest, open it, ask a question whose answer is known and check the demo model's answer, click a timestamp
and check the player's currentTime moved there, search and see a moment on the timeline, then upload a corrupt
file and see the error. Screenshots go to $VIDMINI_TEST_ARTIFACTS (default tests/artifacts/, gitignored).
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from browser_helpers import (
    By,
    Keys,
    button,
    chromium,
    click,
    form_button,
    need_browser,
    row_for,
    shot,
    still,
    streamlit_app,
    tab,
    upload,
    wait_for,
)

SECONDS = 30

pytestmark = pytest.mark.slow
need_browser(module=True)


def whole_video_question():
    """A synthetic video and a question over all of it that the demo model answers reliably (the scene
    family: the background colour), with its exact answer."""
    from vidmini.demo.questions import answer_for, make_questions
    from vidmini.demo.world import generate_timeline

    for seed in range(1, 60):
        timeline = generate_timeline(seed, SECONDS)
        for q in make_questions(timeline, np.random.default_rng(seed), per_family=4):
            if q.family == "scene" and q.start_s == 0 and q.end_s == SECONDS - 1:
                assert answer_for(timeline, q.family, q.question, 0, SECONDS - 1) == q.answer
                return seed, timeline, q
    raise AssertionError("no seed gives a one-background video")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("app-home")
    with streamlit_app(home) as url:
        yield url, home


@pytest.fixture(scope="module")
def browser():
    with chromium() as driver:
        yield driver


def test_upload_ask_seek_search_and_a_corrupt_upload(server, browser, tmp_path):
    from vidmini.demo.render import write_video

    url, home = server
    seed, timeline, question = whole_video_question()
    video = write_video(timeline, tmp_path / f"world-seed{seed}.mp4")
    corrupt = tmp_path / "broken-video.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(50_000))
    d = browser
    t0 = time.monotonic()
    d.get(url)
    wait_for(d, "the library page", lambda: "Library" in d.find_element(By.TAG_NAME, "body").text)

    # upload → streamed to disk under the data root → ingested in the background → listed as ready
    upload(d, video)
    wait_for(d, "the upload to finish", lambda: d.find_elements(By.CSS_SELECTOR, ".vm-upload-row[data-state='done']"))
    wait_for(d, "the ingest to finish",
             lambda: (r := row_for(d, video.name)) is not None and "ready" in r.text and r, timeout=120)
    assert list((home / "uploads").glob(f"*-{video.name}")), "the upload is stored under the data root"
    # with no ingest running the list stays still: nothing is redrawn under a pointer about to click (it used to
    # rerun every second, and the first click on Open could be lost)
    still(d, "the library list to stay still", row_for(d, video.name))
    shot(d, "1-library")

    # open it, ask a question with a known answer
    click(d, "the Open button", lambda: (r := row_for(d, video.name)) is not None and button(r, "Open"))
    box = wait_for(d, "the chat box", lambda: d.find_elements(By.CSS_SELECTOR, "textarea[data-testid='stChatInputTextArea']"))
    wait_for(d, "the player", lambda: d.find_elements(By.CSS_SELECTOR, "video"))
    box[0].send_keys(question.question)
    box[0].send_keys(Keys.ENTER)

    def answered():
        msgs = d.find_elements(By.CSS_SELECTOR, "[data-testid='stChatMessage']")
        return len(msgs) >= 2 and button(d, "▶ 0:00") is not None and msgs[-1]

    reply = wait_for(d, "the answer", answered, timeout=90)
    words = re.findall(r"[a-z0-9]+", reply.text.lower())
    assert question.answer.lower() in words, f"asked {question.question!r}, truth {question.answer!r}, got {reply.text!r}"
    assert "range" in reply.text and "frames" in reply.text  # the answer says what it used
    shot(d, "2-answer")

    # a timestamp under the answer seeks the player
    target = next(b for b in d.find_elements(By.TAG_NAME, "button")
                  if (m := re.fullmatch(r"▶ 0:(\d\d)", b.text.strip())) and 5 <= int(m.group(1)) <= SECONDS - 2)
    seconds = int(target.text.strip()[-2:])
    click(d, f"the ▶ 0:{seconds:02d} button", lambda: button(d, f"▶ 0:{seconds:02d}"))
    position = "return document.querySelector('video').currentTime"
    wait_for(d, f"the player at {seconds}s", lambda: abs(d.execute_script(position) - seconds) < 0.5,
             timeout=30)
    shot(d, "3-seek")

    # search: moments on the timeline, and the relevance plot
    click(d, "the Search tab", lambda: tab(d, "Search"))
    field = wait_for(d, "the search box", lambda: [e for e in d.find_elements(By.CSS_SELECTOR, "input[type='text']")
                                                   if "Search" in (e.get_attribute("aria-label") or "")])
    field[0].send_keys(f"a {question.answer} background")
    click(d, "the Search button", lambda: form_button(d, "Search"))
    moments = wait_for(d, "a moment on the timeline", lambda: d.find_elements(By.CSS_SELECTOR, ".vm-timeline .vm-moment"))
    start = float(moments[0].get_attribute("data-start"))
    assert 0 <= start <= SECONDS
    wait_for(d, "the relevance plot", lambda: d.find_elements(By.CSS_SELECTOR, "[data-testid='stVegaLiteChart']"))
    shot(d, "4-search")
    # the whole page, chat tab in front (the README's picture: docs/app.png is one of these)
    click(d, "the Chat tab", lambda: tab(d, "Chat"))
    wait_for(d, "the Chat tab in front", lambda: tab(d, "Chat").get_attribute("aria-selected") == "true")
    d.set_window_size(1400, 1900)
    time.sleep(1.0)
    shot(d, "app")
    d.set_window_size(1400, 1100)

    # back to the library: a corrupt upload ends with a readable error, and the app keeps working
    click(d, "the Library button", lambda: button(d, "← Library"))
    wait_for(d, "the library page", lambda: row_for(d, video.name))
    upload(d, corrupt)
    bad = wait_for(d, "the corrupt upload's error",
                   lambda: (r := row_for(d, corrupt.name)) is not None and "failed" in r.text and r, timeout=60)
    alert = bad.find_element(By.CSS_SELECTOR, "[data-testid='stAlert']").text
    assert corrupt.name in alert and ("Corrupt" in alert or "NotAVideo" in alert or "decod" in alert), alert
    assert "Traceback" not in d.find_element(By.TAG_NAME, "body").text
    # the failed ingest was the last one running: the page is drawn again; read the first row once it is there
    wait_for(d, "the first video still ready",
             lambda: (r := row_for(d, video.name)) is not None and "ready" in r.text and r, timeout=15)
    shot(d, "5-corrupt-upload")
    assert time.monotonic() - t0 < 240
