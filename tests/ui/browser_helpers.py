"""Driving the app in a real browser, for the tests in tests/ui: `streamlit run streamlit_app.py` on a free
localhost port, Debian's headless Chromium through Selenium (/usr/bin/chromedriver; nothing is downloaded), and
the few ways a person acts on a page (wait for something, click once, wait for a list to stay still).
Screenshots go to $VIDMINI_TEST_ARTIFACTS (default tests/artifacts/, gitignored)."""

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
ARTIFACTS = Path(os.environ.get("VIDMINI_TEST_ARTIFACTS", REPO / "tests" / "artifacts"))

try:  # importable without them: a module whose tests need no browser still runs (`need_browser` skips)
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys  # noqa: F401 - for the tests that type
except ImportError:
    webdriver = None
    WebDriverException = Exception


def need_browser(module: bool = False) -> None:
    """Skip (the whole module with `module`) unless Debian's Chromium, its driver, selenium and ffmpeg are here."""
    reason = None
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = "Debian's chromium and chromium-driver are not installed (`make sysdeps` installs them)"
    elif webdriver is None:
        reason = "selenium is not installed (pip install -e '.[dev]')"
    elif shutil.which("ffmpeg") is None:
        reason = "ffmpeg is not installed (`make sysdeps`)"
    if reason is not None:
        pytest.skip(reason, allow_module_level=module)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shot(driver, name: str) -> Path:
    """A screenshot, `<name>.png` in ARTIFACTS."""
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


@contextmanager
def streamlit_app(home: Path, extra_env: dict | None = None, log_name: str = "server.log",
                  stop_s: float = 15.0) -> Iterator[str]:
    """The app serving `home` (its $VIDMINI_HOME) on a free port: yields its URL; the log is kept as an artifact
    (`log_name`). Stopped with SIGTERM, killed after `stop_s`."""
    port = free_port()
    env = {**os.environ, "VIDMINI_HOME": str(home), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(extra_env or {})}
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
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_s)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(home / "server.log", ARTIFACTS / log_name)


@contextmanager
def chromium(window: str = "1400,1100", extra_args: tuple[str, ...] = (), timezone: str | None = None) -> Iterator:
    """Headless Chromium, as the probe starts it (no background networking), in a fresh profile; `timezone`:
    the zone the page sees."""
    profile = tempfile.mkdtemp(prefix="vidmini-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={window}", *extra_args):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        if timezone is not None:
            driver.execute_cdp_cmd("Emulation.setTimezoneOverride", {"timezoneId": timezone})
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
