"""The Watches page in a real browser: `streamlit run streamlit_app.py` on a free localhost port, Debian's headless
Chromium through Selenium (as tests/ui/test_app_browser.py), the browser's time zone set to Asia/Kolkata (UTC+5:30,
so a time shown in UTC or the server's zone would not match).

A live camera: ffmpeg pushes a test pattern as MPEG-TS over UDP to a loopback port, whether anyone listens or not.
One flow: add a watch of it through the form, see it listed and recording, see its latest frames in the live view
(times in the browser's zone); ask about it over the last minute (the answer streamed, its span in the browser's
zone and its frame count; a span that is not a time is one line of error); a bad retention is one line of error
and adds nothing; an alert put in the watch's outbox (as its runner puts one: thumbnail, clip in its clips folder) shows in the feed with its local time, watch,
rule, kind and confidence, its clip playable; pause the watch, see it paused; remove it, see it gone.
Screenshots go to $VIDMINI_TEST_ARTIFACTS (default tests/artifacts/, gitignored).

Below it, what the page asks of the service (vidmini/service/watch_view.py), fast and without a browser: the form's
fields made into a watch or one line of error, pause/resume/remove, the alert feed, clips served by name only.
"""

from __future__ import annotations

import io
import re
import socket
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import browser_helpers
import pytest
from browser_helpers import By, Keys, button, chromium, click, free_port, need_browser, streamlit_app

ZONE = "Asia/Kolkata"


@pytest.fixture(scope="module")
def camera():
    """ffmpeg sending a 320x240 test pattern at 10 fps in real time as H.264 in MPEG-TS over UDP (a keyframe a
    second), for 3 minutes at most: the URL a watch records."""
    need_browser()
    port = free_port(socket.SOCK_DGRAM)
    url = f"udp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i",
         "testsrc2=size=320x240:rate=10", "-t", "180", "-c:v", "libx264", "-preset", "veryfast", "-tune",
         "zerolatency", "-g", "10", "-pix_fmt", "yuv420p", "-f", "mpegts", f"{url}?pkt_size=1316"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield url
    finally:
        proc.kill()
        proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    need_browser()
    home = tmp_path_factory.mktemp("watch-app-home")
    # the watch's ffmpeg dies with the app (the recorder's children follow their parent)
    with streamlit_app(home, log_name="watches-server.log", stop_s=20) as url:
        yield url, home


@pytest.fixture(scope="module")
def browser():
    need_browser()
    with chromium("1500,1400", ("--autoplay-policy=no-user-gesture-required",), timezone=ZONE) as driver:
        yield driver


def shot(driver, name: str) -> Path:
    return browser_helpers.shot(driver, f"watches-{name}")


def wait_for(driver, what: str, check, timeout: float = 30.0, step: float = 0.25):
    return browser_helpers.wait_for(driver, what, check, timeout, step)


NEWEST_FRAME = """const f = Array.from(document.querySelectorAll('.vm-live .vm-live-frame')).pop();
return f ? [f.querySelector('img').naturalWidth, f.dataset.time, f.innerText.trim()] : null;"""


def watch_row(driver, name: str):
    rows = driver.find_elements(By.CSS_SELECTOR, f".st-key-watch-{name}")
    return rows[0] if rows else None


def field(driver, label: str):
    found = driver.find_elements(By.CSS_SELECTOR, f"input[aria-label='{label}'], textarea[aria-label='{label}']")
    return found[0] if found else None


def type_into(driver, label: str, text: str) -> None:
    box = wait_for(driver, f"the {label} field", lambda: field(driver, label))
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    for i, line in enumerate(text.split("\n")):
        if i:
            box.send_keys(Keys.SHIFT, Keys.ENTER)
        box.send_keys(line)


def submit(driver) -> None:
    """The form's submit button (the sidebar has a form too)."""
    click(driver, "the Add watch button", lambda: next(
        (b for f in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stForm']") if (b := button(f, "Add watch"))),
        None))


def ask(driver) -> None:
    """The Ask about a watch form's Ask button."""
    click(driver, "the Ask button", lambda: next(
        (b for f in driver.find_elements(By.CSS_SELECTOR, "[data-testid='stForm']") if (b := button(f, "Ask"))), None))


def answer_box(driver):
    found = driver.find_elements(By.CSS_SELECTOR, ".st-key-watch-answer")
    return found[0] if found else None


def jpeg(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (160, 120), colour).save(buf, format="JPEG")
    return buf.getvalue()


def make_clip(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "testsrc2=size=320x240:rate=10", "-t", "3", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                    "-movflags", "+faststart", str(path)], check=True, timeout=60)
    return path


def local(iso: str, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromisoformat(iso).astimezone(ZoneInfo(ZONE)).strftime(fmt)


@pytest.mark.slow
def test_add_a_watch_see_it_live_an_alert_in_the_feed_pause_and_remove(server, browser, camera):
    from vidmini.service.watches import Alert, WatchFolders
    from vidmini.watch.outbox import Outbox

    url, home = server
    folders = WatchFolders(home)
    d = browser
    t0 = time.monotonic()
    d.get(url)
    click(d, "the Watches button", lambda: button(d, "Watches"))
    wait_for(d, "the Watches page", lambda: "No watches yet" in d.find_element(By.TAG_NAME, "body").text)

    # add a watch of the camera through the form: listed, recording, its newest frames in the live view
    type_into(d, "Name", "door")
    type_into(d, "Source URL", camera)
    type_into(d, "Rules, one per line", "a person enters\na red car is parked")
    type_into(d, "Keep the recording for", "2h")
    submit(d)
    wait_for(d, "the watch in the list", lambda: (r := watch_row(d, "door")) is not None and r)
    spec = folders.load("door")
    assert spec.source == camera and spec.retain_s == 7200 and not spec.paused
    assert [r["event"] for r in spec.rules] == ["a person enters", "a red car is parked"]
    assert "added" in d.find_element(By.TAG_NAME, "body").text
    assert field(d, "Name").get_attribute("value") == ""  # a fresh form for the next one

    # while the list redraws the starting watch's changing state and numbers, the form below it stays put: a
    # button that moves as it is pressed takes the click somewhere else
    form = next(f for f in d.find_elements(By.CSS_SELECTOR, "[data-testid='stForm']") if button(f, "Add watch"))
    tops, start = set(), time.monotonic()
    while time.monotonic() - start < 20:
        tops.add(round(d.execute_script("return arguments[0].getBoundingClientRect().top", form)))
        row = watch_row(d, "door")
        if time.monotonic() - start > 8 and row is not None and "recording" in row.text and \
                re.search(r"\b([2-9]|\d\d+) frames judged", row.text):
            break
        time.sleep(0.1)
    assert len(tops) == 1, f"the form moved while the list redrew: {sorted(tops)}"

    # a bad retention: one line of error, nothing added (the values stay for the person to fix)
    type_into(d, "Name", "porch")
    type_into(d, "Source URL", "udp://127.0.0.1:9")
    type_into(d, "Keep the recording for", "forever")
    submit(d)
    error = wait_for(d, "the retention error", lambda: [e for e in d.find_elements(
        By.CSS_SELECTOR, "[data-testid='stAlert']") if "forever" in e.text])
    assert "not a duration" in error[0].text and "\n" not in error[0].text.strip(), error[0].text
    assert field(d, "Name").get_attribute("value") == "porch"
    assert watch_row(d, "porch") is None and folders.names() == ["door"]
    assert not (home / "watches" / "porch").exists()

    wait_for(d, "the watch recording and judging frames",
             lambda: (r := watch_row(d, "door")) is not None and "recording" in r.text
             and re.search(r"\b([1-9]\d*) frames judged", r.text) and r, timeout=60)
    # the live view is drawn again every 2 s: the newest frame read in one look, not element by element
    width, taken, caption = wait_for(d, "a live frame drawn", lambda: (got := d.execute_script(NEWEST_FRAME)) and
                                     got[0] > 0 and got)
    assert abs((datetime.now(UTC) - datetime.fromisoformat(taken)).total_seconds()) < 60, taken
    assert caption == local(taken, "%H:%M:%S"), (caption, taken)  # shown in the browser's zone
    shown = wait_for(d, "the row's last frame", lambda: re.search(
        r"last frame (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)", watch_row(d, "door").text)).group(1)
    last = datetime.strptime(shown, "%Y-%m-%d %H:%M:%S").replace(tzinfo=ZoneInfo(ZONE))
    assert abs((datetime.now(UTC) - last).total_seconds()) < 60, shown  # in the browser's zone, not UTC
    shot(d, "1-live")

    # ask about the watch over the last minute: the answer streams in, then its span (browser's zone) and frames
    asked = time.monotonic()
    type_into(d, "Question", "What word is shown?")
    type_into(d, "Since", "1m")
    ask(d)
    span = wait_for(d, "the answer's span and frames", lambda: (a := answer_box(d)) is not None and re.search(
        r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) → (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \(Asia/(?:Kolkata|Calcutta)\) · (\d+) frames",
        a.text), timeout=60)
    text = answer_box(d).text.replace(span.group(0), "").strip()
    assert text, "no answer text"  # the default test model's words are meaningless: that there is one
    since, until = (datetime.strptime(t, "%Y-%m-%d %H:%M:%S").replace(tzinfo=ZoneInfo(ZONE)) for t in span.groups()[:2])
    now = datetime.now(UTC)
    assert int(span.group(3)) > 0 and since <= until, span.group(0)
    assert -5 < (now - until).total_seconds() < 60 and (now - since).total_seconds() < 120, span.group(0)  # IST
    # a span that is not a time: one line of error, and the page keeps working
    type_into(d, "Since", "soon")
    ask(d)
    error = wait_for(d, "the span error", lambda: (a := answer_box(d)) is not None and [
        e for e in a.find_elements(By.CSS_SELECTOR, "[data-testid='stAlert']") if "soon" in e.text])
    assert "not a time" in error[0].text and "\n" not in error[0].text.strip(), error[0].text
    assert time.monotonic() - asked < 30
    shot(d, "1b-asked")

    # an alert as the watch's runner leaves it in its outbox: in the feed, newest first, clip playable
    clip = make_clip(home / "watches" / "door" / "clips" / "1767323045000-a-person-enters.mp4")
    start = "2026-01-02T03:04:05.250+00:00"
    with Outbox(home / "watches" / "door" / "alerts", []) as outbox:
        outbox.put(Alert("door", "a person enters", "new", start, confidence=0.87, thumbnail=jpeg((200, 30, 30))))
        outbox.put(Alert("door", "a person enters", "end", start, end="2026-01-02T03:04:17+00:00",
                         confidence=0.91, clip_path=str(clip)))
    items = wait_for(d, "the alerts in the feed", lambda: len(found := d.find_elements(By.CSS_SELECTOR, ".vm-alert"))
                     == 2 and found)
    end, new = items
    assert end.get_attribute("data-kind") == "end" and new.get_attribute("data-kind") == "new"  # newest first
    assert new.find_element(By.CSS_SELECTOR, ".vm-alert-time").text == "2026-01-02 08:34:05"  # IST: UTC+5:30
    assert end.find_element(By.CSS_SELECTOR, ".vm-alert-time").text == "2026-01-02 08:34:05 → 08:34:17"
    for item in items:
        assert item.find_element(By.CSS_SELECTOR, ".vm-alert-watch").text == "door"
        assert item.find_element(By.CSS_SELECTOR, ".vm-alert-rule").text == "a person enters"
        thumb = item.find_element(By.CSS_SELECTOR, "img.vm-alert-thumb")  # the end shows its event's thumbnail
        assert d.execute_script("return arguments[0].naturalWidth", thumb) == 160  # the JPEG itself
    assert new.find_element(By.CSS_SELECTOR, ".vm-alert-confidence").text == "0.87"
    assert new.find_element(By.CSS_SELECTOR, ".vm-alert-kind").text == "new"
    assert not new.find_elements(By.CSS_SELECTOR, "video")
    player = end.find_element(By.CSS_SELECTOR, "video.vm-alert-clip")
    wait_for(d, "the clip's metadata", lambda: d.execute_script("return arguments[0].readyState", player) >= 1)
    assert abs(d.execute_script("return arguments[0].duration", player) - 3.0) < 0.5
    d.execute_script("arguments[0].muted = true; arguments[0].play();", player)
    wait_for(d, "the clip playing", lambda: d.execute_script("return arguments[0].currentTime", player) > 0.3)
    time.sleep(2.5 * 2.0)  # the feed redraws itself every 2 s: the same player plays on, never reset or replaced
    assert d.execute_script("return arguments[0].isConnected && arguments[0].currentTime", player) > 1.0
    shot(d, "2-alerts")

    # pause: the runner stops, the row says so and offers Resume; then remove it and everything it recorded
    click(d, "the Pause button", lambda: (r := watch_row(d, "door")) is not None and button(r, "Pause"))
    wait_for(d, "the watch paused", lambda: (r := watch_row(d, "door")) is not None and
             re.search(r"\bpaused\b", r.text) and button(r, "Resume"), timeout=40)
    assert folders.load("door").paused
    shot(d, "3-paused")
    click(d, "the Remove button", lambda: (r := watch_row(d, "door")) is not None and button(r, "Remove"))
    click(d, "the Yes, remove button", lambda: (r := watch_row(d, "door")) is not None and button(r, "Yes, remove"))
    wait_for(d, "the watch gone", lambda: watch_row(d, "door") is None and "No watches yet" in
             d.find_element(By.TAG_NAME, "body").text)
    assert folders.names() == [] and not (home / "watches" / "door").exists()
    assert "Traceback" not in d.find_element(By.TAG_NAME, "body").text
    assert time.monotonic() - t0 < 120


# ---- what the page asks of the service (vidmini/service/watch_view.py), without a browser or a model ------------
def test_a_span_end_as_typed_a_date_time_without_a_zone_in_the_browsers():
    from vidmini.ui.watches import span_end

    kolkata = ZoneInfo(ZONE)
    assert span_end("", kolkata) is None and span_end("  ", kolkata) is None
    assert span_end(" 10m ", kolkata) == "10m" and span_end("2h ago", kolkata) == "2h ago"
    assert span_end("soon", kolkata) == "soon"  # the service says what is wrong with it
    got = span_end("2026-12-04 09:30", kolkata)
    assert got == datetime(2026, 12, 4, 4, 0, tzinfo=UTC) and got.utcoffset() is not None
    got = span_end("2026-12-04T09:30:00+01:00", kolkata)  # its own zone kept
    assert got == datetime(2026, 12, 4, 8, 30, tzinfo=UTC)

@pytest.fixture
def lib(tmp_path):
    from vidmini.service.library import Library

    return Library(tmp_path / "home")


def test_the_forms_fields_make_a_watch_or_one_line_of_error_and_nothing_saved(lib):
    from vidmini.service.watch_view import add_watch, new_watch_spec, watch_folders, watch_rows
    from vidmini.service.watches import WatchError

    spec = new_watch_spec(" gate ", "rtsp://admin:hunter2@cam.local/live", "a person enters\n\n  a van stops \n",
                          "36h / 5GB", 2, "https://example.com/hook", "s3cret", "broker.local:1884")
    assert (spec.name, spec.fps, spec.retain_s, spec.retain_bytes) == ("gate", 2.0, 36 * 3600, 5 * 10**9)
    assert [r["event"] for r in spec.rules] == ["a person enters", "a van stops"]
    assert spec.sinks == ({"type": "webhook", "url": "https://example.com/hook", "secret": "s3cret"},
                          {"type": "mqtt", "host": "broker.local", "port": 1884})
    assert new_watch_spec("a", "udp://127.0.0.1:1", "", "").retain_s == 24 * 3600  # empty: the default
    assert new_watch_spec("a", "udp://127.0.0.1:1", "", "500MB").retain_s is None
    bad = [dict(retention="forever"), dict(retention="0h"), dict(name="no spaces"), dict(source=" "),
           dict(fps=0), dict(fps="fast"), dict(webhook_url="https://example.com/hook"),
           dict(webhook_secret="s3cret"), dict(webhook_url="ftp://x", webhook_secret="s"), dict(mqtt="host:port"),
           dict(rules="a cat\na cat")]
    for change in bad:
        fields = {"name": "cam", "source": "udp://127.0.0.1:1", "rules": "", "retention": "1h", **change}
        with pytest.raises(WatchError) as e:
            add_watch(lib, new_watch_spec(**fields))
        assert str(e.value).strip() and "\n" not in str(e.value), (change, str(e.value))
    assert watch_folders(lib).names() == []  # nothing saved on any error
    add_watch(lib, spec)
    with pytest.raises(WatchError, match="exists already"):
        add_watch(lib, spec)
    (row,) = watch_rows(lib)  # no manager in this process: what is on disk
    assert row.source == "rtsp://admin:***@cam.local/live" and "hunter2" not in repr(row)  # no secrets shown
    assert row.sinks == ["webhook https://example.com/hook", "mqtt broker.local:1884"]
    assert (row.state, row.frames, row.rules) == ("stopped", 0, ["a person enters", "a van stops"])


def test_pause_resume_remove_the_alert_feed_and_clips_by_name_only(lib):
    from vidmini.service.watch_view import (
        add_watch,
        alerts_version,
        clip_file,
        clip_name,
        latest_frames,
        new_watch_spec,
        pause_watch,
        recent_alerts,
        remove_watch,
        watch_folders,
        watch_rows,
    )
    from vidmini.service.watches import Alert, WatchError
    from vidmini.watch.outbox import Outbox

    add_watch(lib, new_watch_spec("cam", "udp://127.0.0.1:1", "a cat", "1h"))
    add_watch(lib, new_watch_spec("yard", "udp://127.0.0.1:2", "a dog", "1h"))
    pause_watch(lib, "cam")
    assert [(r.name, r.paused, r.state) for r in watch_rows(lib)] == [("cam", True, "paused"),
                                                                     ("yard", False, "stopped")]
    pause_watch(lib, "cam", False)
    assert not watch_folders(lib).load("cam").paused
    assert latest_frames(lib, "cam") == []  # nothing recorded yet
    with pytest.raises(WatchError):
        latest_frames(lib, "nobody")

    folder = watch_folders(lib).folder("cam")
    clip = folder / "clips" / "100-a-cat.mp4"
    clip.parent.mkdir()
    clip.write_bytes(b"not really a clip")
    with Outbox(folder / "alerts", []) as outbox:
        outbox.put(Alert("cam", "a cat", "new", "2026-01-02T03:04:05+00:00", confidence=0.5, thumbnail=b"jpeg"))
        outbox.put(Alert("cam", "a cat", "end", "2026-01-02T03:04:05+00:00", end="2026-01-02T03:05:00+00:00",
                         clip_path=str(clip)))
    before = alerts_version(lib)
    with Outbox(watch_folders(lib).folder("yard") / "alerts", []) as outbox:
        outbox.put(Alert("yard", "a dog", "new", "2026-01-02T03:04:30+00:00", clip_path="/etc/passwd"))
    assert alerts_version(lib) != before and alerts_version(lib) == alerts_version(lib)  # the feed is drawn again
    feed = recent_alerts(lib)
    assert [(a.watch, a.kind) for a in feed] == [("cam", "end"), ("yard", "new"), ("cam", "new")]  # newest first
    assert feed[0].thumbnail == b"jpeg"  # an end shows its event's thumbnail
    assert [a.watch for a in recent_alerts(lib, watch="yard")] == ["yard"] and len(recent_alerts(lib, 1)) == 1
    assert clip_name(lib, feed[0]) == "100-a-cat.mp4" and clip_file(lib, "cam", "100-a-cat.mp4") == clip
    assert clip_name(lib, feed[1]) is None  # a clip path outside the watch's clips folder is never served
    for name, file in (("cam", "../watch.json"), ("cam", ".."), ("cam", ""), ("yard", "100-a-cat.mp4"),
                       ("../cam", "100-a-cat.mp4"), ("nobody", "x.mp4")):
        assert clip_file(lib, name, file) is None, (name, file)

    remove_watch(lib, "cam")
    assert watch_folders(lib).names() == ["yard"] and not folder.exists()
    assert [a.watch for a in recent_alerts(lib)] == ["yard"]
    with pytest.raises(WatchError):
        remove_watch(lib, "cam")
