"""The app in a real browser: `streamlit run streamlit_app.py` on a free localhost port, driven by Debian's
headless Chromium through Selenium (/usr/bin/chromedriver; no browser is downloaded).

One flow, as a person would use it: upload a synthetic-world video (made here, with its ground truth), wait for
the ingest, open it, ask a question whose answer is known and check the demo model's answer, click a timestamp
and check the player's currentTime moved there, search and see a moment on the timeline, then upload a corrupt
file and see the error. Screenshots go to $VIDMINI_TEST_ARTIFACTS (default tests/artifacts/, gitignored).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("VIDMINI_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))
SECONDS = 30

pytestmark = pytest.mark.slow

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("Debian's chromium and chromium-driver are not installed (`make sysdeps` installs them)",
                allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("app-home")
    port = free_port()
    env = {**os.environ, "VIDMINI_HOME": str(home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("VIDMINI_MODEL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true"],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the app did not start:\n" + (home / "server.log").read_text())
            time.sleep(0.5)
        yield url, home
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(home / "server.log", ARTIFACTS / "server.log")


@pytest.fixture(scope="module")
def browser():
    profile = tempfile.mkdtemp(prefix="vidmini-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def wait_for(driver, what: str, check, timeout: float = 60.0, step: float = 0.25):
    """Poll `check()` until it returns something truthy; a screenshot and the page text on failure."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except WebDriverException as e:  # an element replaced by a rerun in between
            last = e
        time.sleep(step)
    shot(driver, "failed-" + re.sub(r"\W+", "-", what))
    body = driver.find_element(By.TAG_NAME, "body").text
    raise AssertionError(f"timed out waiting for {what} ({last!r}); page text:\n{body[-3000:]}")


def upload(driver, path: Path) -> None:
    picker = wait_for(driver, "the upload picker", lambda: driver.find_elements(By.CSS_SELECTOR, "#vm-file"))
    picker[0].send_keys(str(path))


SETTLE = """arguments[0].scrollIntoView({block: "nearest"});
const r = arguments[0].getBoundingClientRect(); return [r.x, r.y, r.width, r.height];"""


def click(driver, what: str, find, timeout: float = 30.0) -> None:
    """Click exactly once, as a person does: wait until `find()` gives a displayed, enabled element that is the
    same element at the same place on two looks 0.3 s apart (drawn and laid out, the page done moving), then
    press and release the mouse on it once, with the short hold of a real click. No retry: every caller waits
    for the click's effect, so a click the app loses (redrawn, moved or still disabled under the pointer)
    fails the test."""
    seen = {}

    def settled():
        element = find()
        if not element or not (element.is_displayed() and element.is_enabled()):
            seen.clear()
            return None
        where = (element.id, tuple(round(v) for v in driver.execute_script(SETTLE, element)))
        if seen.get("where") == where:
            return element
        seen["where"] = where
        return None

    element = wait_for(driver, what, settled, timeout=timeout, step=0.3)
    ActionChains(driver).move_to_element(element).click_and_hold().pause(0.1).release().perform()


QUIET = """const row = arguments[0]; window.vmChanges = 0;
new MutationObserver(ms => { window.vmChanges += ms.length; }).observe(row, {subtree: true, childList: true,
                                                                     attributes: true, characterData: true});"""


def still(driver, what: str, element, quiet: float = 2.5, timeout: float = 15.0) -> None:
    """Wait until nothing in `element` changes for `quiet` seconds (a list that redraws itself every second
    never gets there)."""
    driver.execute_script(QUIET, element)
    count = -1

    def quiet_now():
        nonlocal count
        before, count = count, driver.execute_script("return window.vmChanges")
        return count == before

    wait_for(driver, what, quiet_now, timeout=timeout, step=quiet)


def row_for(driver, name: str):
    for row in driver.find_elements(By.CSS_SELECTOR, "[class*='st-key-row-']"):
        if name in row.text:
            return row
    return None


def button(scope, label: str):
    for b in scope.find_elements(By.TAG_NAME, "button"):
        if b.text.strip() == label and b.is_enabled():
            return b
    return None


def tab(driver, label: str):
    return next((t for t in driver.find_elements(By.CSS_SELECTOR, "[role='tab']") if t.text.strip() == label), None)


def form_button(driver, label: str):
    """A form's submit button (not a tab or another button with the same text)."""
    for form in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stForm']"):
        if (b := button(form, label)) is not None:
            return b
    return None


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
