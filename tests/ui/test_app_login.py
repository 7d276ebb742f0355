"""`vidmini serve --app --api-key-file`: the app and the API in one process on one port, over one Library (one model
in memory), and the app asking for a key first. Real server, real Chromium (as test_app_browser.py), the official
openai client on the same port."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest
from fixtures.serve_helpers import start_server, stop
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from test_app_browser import browser, click, form_button, shot, wait_for  # noqa: F401 - browser is a fixture

from vidmini.engine.load import SHIPPED_MODEL_DIR

KEY = "sk-app-" + "q" * 20
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")]


def api(base: str, method: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(base + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from fixtures.app_helpers import world_video

    tmp = tmp_path_factory.mktemp("serve-app")
    media = tmp / "media"
    media.mkdir()
    video, _ = world_video(media, seed=31, seconds=10)
    keys = tmp / "keys.txt"
    keys.write_text(KEY + "\n")
    env = {**os.environ, "VIDMINI_HOME": str(tmp / "home")}
    env.pop("VIDMINI_MODEL", None)
    env.pop("VIDMINI_API_KEY_FILE", None)
    proc, base = start_server(["--app", "--api-key-file", str(keys), "--media-root", str(media)], env)
    yield base, video
    stop(proc)


def test_the_app_asks_for_a_key_and_shares_the_apis_library(served, browser):  # noqa: F811
    openai = pytest.importorskip("openai")
    base, video = served
    job = api(base, "POST", "/v1/videos", {"source": str(video)})  # added through the API ...
    deadline = time.monotonic() + 120
    while (job := api(base, "GET", f"/v1/jobs/{job['id']}"))["status"] in ("queued", "ingesting"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert job["status"] == "ready"

    d = browser
    d.get(base + "/")
    body = lambda: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
    wait_for(d, "the login form", lambda: form_button(d, "Log in"))
    assert "Library" not in body() and video.name not in body()  # nothing shown before a key

    field = d.find_element(By.CSS_SELECTOR, "input[type='password']")
    field.send_keys("sk-not-a-key")
    click(d, "Log in", lambda: form_button(d, "Log in"))
    wait_for(d, "the refusal", lambda: "not one of this server's keys" in body())
    assert "Library" not in body()

    # the refusal re-renders the form: its field is there again once the page has settled
    field = wait_for(d, "the key field again",
                     lambda: d.find_elements(By.CSS_SELECTOR, "input[type='password']"))[0]
    field.send_keys(Keys.CONTROL, "a")  # as a person replaces what they typed
    field.send_keys(KEY)
    click(d, "Log in", lambda: form_button(d, "Log in"))
    wait_for(d, "the library page", lambda: "Library" in body())
    wait_for(d, "the API's video in the app's list", lambda: video.name in body())  # ... listed by the app
    shot(d, "serve-app-logged-in")

    # the same port answers the API while the app runs: one process, one Library, one model
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="vidmini", max_tokens=8, messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"vidmini://{job['video_id']}"}},
        {"type": "text", "text": "What colour is the background?"}]}])
    assert reply.choices[0].message.content
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="sk-wrong", max_retries=0).models.list()
