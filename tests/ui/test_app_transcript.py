"""The transcript pane in a real browser: a video with real speech (espeak-ng sentences at known times, muxed by
ffmpeg) ingested by the CLI with PocketSphinx, then the app in headless Chromium. The pane lists what was said
beside the player; clicking a line seeks the player there; while the video plays, the line being said is the
highlighted one; a spoken word searched for is marked on the timeline as heard."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from browser_helpers import (
    REPO,
    By,
    Keys,
    button,
    chromium,
    click,
    form_button,
    need_browser,
    row_for,
    shot,
    streamlit_app,
    tab,
    wait_for,
)

sys.path.insert(0, str(REPO / "tests" / "speech"))
from speech_media import have_tools, make_speech_video  # noqa: E402

pytestmark = pytest.mark.slow
need_browser(module=True)

if not have_tools():
    pytest.skip("espeak-ng or ffmpeg is missing (`make sysdeps` installs them)", allow_module_level=True)

LINES = "return Array.from(document.querySelectorAll('.vm-transcript .vm-line')).map(e => [e.textContent, " \
        "parseFloat(e.dataset.start), parseFloat(e.dataset.end), e.classList.contains('vm-now')])"
POSITION = "return document.querySelector('video').currentTime"


@pytest.fixture(scope="module")
def spoken_video(tmp_path_factory):
    home = tmp_path_factory.mktemp("transcript-home")
    video = make_speech_video(tmp_path_factory.mktemp("speech"), "mp4_aac_16k_mono")
    env = {**os.environ, "VIDMINI_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("VIDMINI_MODEL", None)
    out = subprocess.run([sys.executable, "-m", "vidmini.cli.main", "ingest", str(video.path), "--json"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    record = json.loads(out.stdout.splitlines()[-1])
    assert record["transcript"]["state"] == "complete", record
    return home, video


def line_with(lines: list, word: str) -> list:
    found = [line for line in lines if word in line[0]]
    assert len(found) == 1, f"one line should say {word!r}: {lines}"
    return found[0]


def test_transcript_pane_seeks_follows_playback_and_marks_heard_moments(spoken_video):
    home, video = spoken_video
    truth = {w.word: w for w in video.words}
    with streamlit_app(home) as url, chromium() as d:
        d.get(url)
        click(d, "the Open button", lambda: (r := row_for(d, video.path.name)) is not None and button(r, "Open"))
        wait_for(d, "the player", lambda: d.find_elements(By.CSS_SELECTOR, "video"))
        lines = wait_for(d, "the transcript's lines", lambda: len(got := d.execute_script(LINES)) >= 3 and got)
        for word, spoken in truth.items():  # each keyword on a line whose span holds the time it was said
            text, start, end, _ = line_with(lines, word)
            assert start - 1.0 <= spoken.start and spoken.end <= end + 1.0, (word, start, end, spoken)
        shot(d, "transcript-1-pane")

        # a click on a line seeks the player to the line's start
        hospital = line_with(lines, "hospital")
        element = next(e for e in d.find_elements(By.CSS_SELECTOR, ".vm-transcript .vm-line")
                       if "hospital" in e.text)
        click(d, "the hospital line", lambda: element)
        wait_for(d, "the player at the hospital line", lambda: abs(d.execute_script(POSITION) - hospital[1]) < 0.3,
                 timeout=20)
        wait_for(d, "the hospital line highlighted", lambda: line_with(d.execute_script(LINES), "hospital")[3])

        # playing on from before the third sentence: the highlight moves to it when it is said
        restaurant = line_with(lines, "restaurant")
        d.execute_script("const v = document.querySelector('video'); v.muted = true; "
                         "v.currentTime = arguments[0]; v.play();", restaurant[1] - 1.5)
        wait_for(d, "the playing video to reach the restaurant line",
                 lambda: d.execute_script(POSITION) > restaurant[1] + 0.2, timeout=30)
        now = [line for line in d.execute_script(LINES) if line[3]]
        assert len(now) == 1 and "restaurant" in now[0][0], now
        d.execute_script("document.querySelector('video').pause()")
        shot(d, "transcript-2-following")

        # a spoken word searched for: a heard moment on the timeline, at the time it was said
        click(d, "the Search tab", lambda: tab(d, "Search"))
        field = wait_for(d, "the search box", lambda: [e for e in d.find_elements(By.CSS_SELECTOR, "input[type='text']")
                                                       if "Search" in (e.get_attribute("aria-label") or "")])
        field[0].send_keys("hospital")
        click(d, "the Search button", lambda: form_button(d, "Search"))
        marks = wait_for(d, "a heard moment on the timeline", lambda: [
            m for m in d.find_elements(By.CSS_SELECTOR, ".vm-timeline .vm-moment")
            if m.get_attribute("data-source") in ("heard", "both")])
        start, end = float(marks[0].get_attribute("data-start")), float(marks[0].get_attribute("data-end"))
        said = truth["hospital"]
        assert start - 1.0 <= said.start and said.end <= end + 1.0, (start, end, said)
        assert "heard: “" in d.find_element(By.TAG_NAME, "body").text
        shot(d, "transcript-3-search")

        # a question about the speech: the transcript lines that answer it under the answer, each a seek link
        click(d, "the Chat tab", lambda: tab(d, "Chat"))
        box = wait_for(d, "the chat box", lambda: d.find_elements(By.CSS_SELECTOR,
                                                                  "textarea[data-testid='stChatInputTextArea']"))
        box[0].send_keys("When is restaurant said?")
        box[0].send_keys(Keys.ENTER)
        heard = wait_for(d, "a heard line under the answer", lambda: [
            b for b in d.find_elements(By.TAG_NAME, "button") if "heard:" in b.text and "restaurant" in b.text])
        # from far off (the player still stands where playback stopped, next to the word), to when it was said
        d.execute_script("document.querySelector('video').currentTime = 0")
        wait_for(d, "the player back at the start", lambda: d.execute_script(POSITION) < 0.5)
        click(d, "the heard line's button", lambda: heard[0])
        word = truth["restaurant"]
        wait_for(d, "the player where restaurant is said",
                 lambda: word.start - 0.5 <= d.execute_script(POSITION) <= word.end, timeout=20)
        shot(d, "transcript-4-heard-answer")


def test_a_video_without_audio_says_so_and_has_no_pane(tmp_path):
    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline

    home = tmp_path / "home"
    silent = write_video(generate_timeline(3, 8), tmp_path / "no-audio.mp4")
    env = {**os.environ, "VIDMINI_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("VIDMINI_MODEL", None)
    out = subprocess.run([sys.executable, "-m", "vidmini.cli.main", "ingest", str(silent), "--json"], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["transcript"]["state"] == "no_audio"
    with streamlit_app(home) as url, chromium() as d:
        d.get(url)
        click(d, "the Open button", lambda: (r := row_for(d, silent.name)) is not None and button(r, "Open"))
        wait_for(d, "the no-audio note", lambda: "no audio track" in d.find_element(By.TAG_NAME, "body").text)
        wait_for(d, "the player", lambda: d.find_elements(By.CSS_SELECTOR, "video"))  # mounted after the note
        assert not d.find_elements(By.CSS_SELECTOR, ".vm-transcript")

