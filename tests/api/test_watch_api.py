"""Live watches over REST on a live `vidmini serve` (real HTTP through urllib, the shipped demo model, an API key):
add, list, get, pause, resume, delete, with one-line 400s, 403 outside the media roots, 409 on a taken name and 401
without the key; and a real live source: ffmpeg pushing a synthetic-world video as MPEG-TS over loopback UDP, a
watch whose rule is a word the video shows, its `new` alert read from the server-sent events of /v1/watches/events
with a real HTTP client, the alert's thumbnail (a JPEG) and its event's clip (with a range request)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote

import pytest
from fixtures.serve_helpers import start_server, stop
from test_openai_api import KEY

from vidmini.engine.load import SHIPPED_MODEL_DIR

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")

SECRET = "hook-secret-for-tests"
SEED, SECONDS = 4184, 20  # the world shows the word TOP from 2.5 s to 9.5 s (and nothing else)
WORD = "TOP"


class Reply:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def error(self) -> dict:
        return self.json()["error"]


def call(base: str, method: str, path: str, body=None, key: str | None = KEY, headers: dict | None = None,
         raw: bytes | None = None) -> Reply:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method, headers=dict(headers or {}))
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())


class Camera:
    """ffmpeg playing `video` in real time as H.264 in MPEG-TS pushed as UDP datagrams to loopback, whether
    anyone listens or not, as many cameras do (as tests/watch/test_watch_live.py's `Camera`)."""

    def __init__(self, video: Path) -> None:
        self.port = free_udp_port()
        self.url = f"udp://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.video = video

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ffmpeg", "-hide_banner", "-nostdin", "-loglevel", "error", "-re", "-i", str(self.video),
             "-c:v", "libx264", "-preset", "veryfast", "-crf", "20", "-tune", "zerolatency", "-g", "4",
             "-muxdelay", "0", "-muxpreload", "0", "-f", "mpegts", f"{self.url}?pkt_size=1316"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("watch-api")
    home, media = tmp / "home", tmp / "media"
    media.mkdir()
    env = {**os.environ, "VIDMINI_HOME": str(home)}
    env.pop("VIDMINI_MODEL", None)
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n")
    proc, base = start_server(["--api-key-file", str(keys), "--media-root", str(media)], env)
    yield {"base": base, "home": home, "media": media, "tmp": tmp}
    stop(proc)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (got := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)
    return got


def running(base: str, name: str, timeout: float = 10) -> dict:
    """The watch, once its recorder runs (it reads `stopped` for the moment its thread takes to start)."""
    def get():
        watch = call(base, "GET", f"/v1/watches/{name}").json()
        return watch if watch["status"]["state"] in ("connecting", "recording", "backoff") else None

    return wait_for(get, timeout, f"watch {name} to run")


def test_add_list_get_pause_resume_delete(server):
    base = server["base"]
    body = {"source": f"udp://127.0.0.1:{free_udp_port()}", "name": "door", "fps": 1, "retain": "2h",
            "rules": ["a person enters", {"event": "a car stops", "on_frames": 1, "off_frames": 2,
                                          "cooldown_s": "30s"}],
            "webhooks": [{"url": "http://127.0.0.1:9/hook", "secret": SECRET}],
            "mqtt": [{"host": "127.0.0.1", "port": 1}], "segment_s": 10}
    added = call(base, "POST", "/v1/watches", body)
    assert added.status == 201, added.body
    watch = added.json()
    assert SECRET.encode() not in added.body  # the webhook's secret never leaves the server
    assert watch["object"] == "watch" and watch["name"] == "door" and watch["source"] == body["source"]
    assert watch["retain_s"] == 7200 and watch["retain_bytes"] is None and watch["segment_s"] == 10
    assert [r["event"] for r in watch["rules"]] == ["a person enters", "a car stops"]
    assert (watch["rules"][1]["on_frames"], watch["rules"][1]["off_frames"], watch["rules"][1]["cooldown_s"]) \
        == (1, 2, 30.0)
    assert watch["rules"][0]["on_frames"] == 2 and watch["rules"][0]["off_frames"] == 3
    assert watch["sinks"] == [{"type": "webhook", "url": "http://127.0.0.1:9/hook"},
                              {"type": "mqtt", "host": "127.0.0.1", "port": 1}]
    assert watch["paused"] is False and watch["status"]["state"] != "paused"
    running(base, "door")  # started at once (the server reconciles on every change)
    on_disk = json.loads((server["home"] / "watches" / "door" / "watch.json").read_text())
    assert on_disk["sinks"][0]["secret"] == SECRET  # kept for signing, only on disk

    again = call(base, "POST", "/v1/watches", {**body, "source": "udp://127.0.0.1:9"})
    assert again.status == 409 and again.error()["code"] == "watch_exists" and "door" in again.error()["message"]

    listed = call(base, "GET", "/v1/watches")
    assert listed.status == 200 and SECRET.encode() not in listed.body
    assert [w["name"] for w in listed.json()["data"]] == ["door"]
    one = call(base, "GET", "/v1/watches/door").json()
    assert one["name"] == "door" and one["rules"] == watch["rules"] and one["sinks"] == watch["sinks"]

    paused = call(base, "POST", "/v1/watches/door/pause")
    assert paused.status == 200 and paused.json()["paused"] is True
    one = call(base, "GET", "/v1/watches/door").json()
    assert one["paused"] is True and one["status"]["state"] == "paused"
    resumed = call(base, "POST", "/v1/watches/door/resume")
    assert resumed.status == 200 and resumed.json()["paused"] is False
    assert running(base, "door")["paused"] is False

    alerts = call(base, "GET", "/v1/watches/door/alerts?since=2026-01-01T00:00:00+00:00")  # '+' unencoded
    assert alerts.status == 200 and alerts.json()["data"] == []
    assert call(base, "GET", "/v1/watches/door/alerts?since=2026-01-01T00:00:00").status == 400  # no zone
    assert call(base, "GET", "/v1/watches/door/alerts/door:x:1:new/thumbnail").status == 404

    # a camera with a password in its URL: listed without it
    cam = call(base, "POST", "/v1/watches", {"source": "rtsp://admin:hunter2@127.0.0.1:1/live", "name": "cam2",
                                             "paused": True, "retain_gb": 0.5})
    assert cam.status == 201, cam.body
    assert cam.json()["source"] == "rtsp://admin:***@127.0.0.1:1/live" and b"hunter2" not in cam.body
    assert cam.json()["retain_s"] is None and cam.json()["retain_bytes"] == 500_000_000
    assert cam.json()["status"]["state"] == "paused"

    for name in ("door", "cam2"):
        gone = call(base, "DELETE", f"/v1/watches/{name}")
        assert gone.status == 200 and gone.json()["deleted"] is True
        assert call(base, "GET", f"/v1/watches/{name}").status == 404
        assert call(base, "DELETE", f"/v1/watches/{name}").status == 404
        assert call(base, "POST", f"/v1/watches/{name}/pause").status == 404
    assert call(base, "GET", "/v1/watches").json()["data"] == []
    assert not (server["home"] / "watches" / "door").exists()


def test_bad_watches_are_refused_with_one_line_messages(server):
    base, media = server["base"], server["media"]
    good = {"source": "udp://127.0.0.1:9", "name": "ok", "paused": True}

    def refused(change: dict, status: int = 400, param: str | None = None) -> str:
        reply = call(base, "POST", "/v1/watches", {**good, **change})
        assert reply.status == status, (change, reply.status, reply.body)
        error = reply.error()
        assert error["message"] and "\n" not in error["message"]
        if param is not None:
            assert error["param"] == param, error
        return error["message"]

    assert "watch name" in refused({"name": "no spaces!"}, param="name")
    assert "name" in refused({"name": "events"}, param="name")  # /v1/watches/events is the stream
    assert "not a duration" in refused({"retain": "forever"}, param="retain")
    assert "more than 0" in refused({"segment_s": 0}, param="segment_s")
    assert "secret" in refused({"webhooks": [{"url": "http://127.0.0.1:9/hook"}]}, param="webhooks")
    assert "http(s)" in refused({"webhooks": [{"url": "ftp://x", "secret": "s"}]}, param="webhooks")
    assert "fps" in refused({"fps": 100}, param="fps")
    assert "on_frames" in refused({"rules": [{"event": "a dog", "on_frames": 0}]}, param="rules")
    assert "same event" in refused({"rules": ["a dog", "a dog"]}, param="rules")
    assert "unknown" in refused({"rule": ["a dog"]})
    assert "stream URL" in refused({"source": "ftp://127.0.0.1/cam"}, param="source")
    assert "port" in refused({"mqtt": [{"host": "127.0.0.1", "port": "x"}]}, param="mqtt")
    outside = server["tmp"] / "outside.ts"
    outside.write_bytes(b"")
    for path in (str(outside), "/etc/passwd", str(media / ".." / "outside.ts")):
        assert "media root" in refused({"source": path}, 403)  # as every server path of the API
    not_json = call(base, "POST", "/v1/watches", raw=b"{not json")
    assert not_json.status == 400 and not_json.error()["message"] == "the body is not JSON"
    assert call(base, "GET", "/v1/watches").json()["data"] == []  # nothing was made

    inside = media / "cam.ts"  # a growing file under a media root is a source too
    inside.write_bytes(b"")
    made = call(base, "POST", "/v1/watches", {**good, "source": str(inside)})
    assert made.status == 201 and made.json()["source"] == str(inside.resolve())
    assert call(base, "DELETE", "/v1/watches/ok").status == 200


def test_watch_routes_need_the_key(server):
    base = server["base"]
    for method, path, body in [("GET", "/v1/watches", None),
                               ("POST", "/v1/watches", {"source": "udp://127.0.0.1:9", "name": "x"}),
                               ("GET", "/v1/watches/x", None), ("DELETE", "/v1/watches/x", None),
                               ("POST", "/v1/watches/x/pause", None), ("POST", "/v1/watches/x/resume", None),
                               ("GET", "/v1/watches/x/alerts", None), ("GET", "/v1/watches/events", None),
                               ("GET", "/v1/watches/x/alerts/k/thumbnail", None),
                               ("GET", "/v1/watches/x/alerts/k/clip", None)]:
        for key in (None, "sk-wrong"):
            reply = call(base, method, path, body, key=key)
            assert reply.status == 401, (method, path, reply.status)
            assert reply.error()["code"] == "invalid_api_key"
    assert call(base, "GET", "/v1/watches/x").status == 404  # with the key: there is no such watch
    assert call(base, "GET", "/v1/watches/events?watch=x").status == 404


def sse(base: str, path: str, timeout: float):
    """A server-sent event stream opened with urllib (connected when this returns): the response, and a generator
    of (id, data) as each event arrives."""
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {KEY}",
                                                       "Accept": "text/event-stream"})
    response = urllib.request.urlopen(req, timeout=timeout)
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")

    def events():
        event_id, data = None, []
        for line in response:
            line = line.decode().rstrip("\r\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data.append(line[6:])
            elif not line and data:
                yield event_id, json.loads("\n".join(data))
                event_id, data = None, []

    return response, events()


def test_a_live_udp_camera_alerts_over_server_sent_events(server):
    """The video shows TOP from 2.5 s to 9.5 s: the watch's `new` alert arrives on the event stream while the
    camera still sends, its thumbnail is a JPEG; the `end` alert follows with a clip served in ranges."""
    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline

    timeline = generate_timeline(SEED, SECONDS)
    assert [(w.text, w.t_in) for w in timeline.words] == [(WORD, 2.5)]
    camera = Camera(write_video(timeline, server["tmp"] / "world.mp4"))
    base, rule = server["base"], f'the word "{WORD}" appears'
    began = time.monotonic()
    added = call(base, "POST", "/v1/watches", {"source": camera.url, "name": "live", "rules": [rule],
                                               "segment_s": 4, "retain": "1h"})
    assert added.status == 201, added.body
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: call(base, "DELETE", "/v1/watches/live"))
        stack.callback(camera.kill)
        # the recorder listens before the camera sends (UDP is not replayed)
        wait_for(lambda: call(base, "GET", "/v1/watches/live").json()["status"]["state"] == "connecting", 10,
                 "the recorder to listen")
        response, events = sse(base, "/v1/watches/events?watch=live", timeout=40)
        stack.callback(response.close)
        camera.start()
        seen: list[tuple[str, dict]] = []
        for event in events:
            seen.append(event)
            if event[1]["kind"] == "new":
                break
        new_at = time.monotonic() - began
        event_id, new = seen[-1]
        assert event_id and event_id.isdigit()
        assert new["watch"] == "live" and new["rule"] == rule and new["kind"] == "new"
        assert "thumbnail_b64" not in new and "clip_path" not in new and new["thumbnail_url"]
        thumb = call(base, "GET", new["thumbnail_url"])
        assert thumb.status == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.body[:3] == b"\xff\xd8\xff" and len(thumb.body) > 500

        end = next(data for _, data in events if data["kind"] == "end")  # the word is gone at 9.5 s
        assert end["start"] == new["start"] and end["end"] > end["start"] and end["thumbnail_url"] is None
        assert end["clip_url"], end
        clip = call(base, "GET", end["clip_url"], headers={"Range": "bytes=0-99"})
        assert clip.status == 206 and len(clip.body) == 100 and clip.headers["content-type"] == "video/mp4"
        whole = call(base, "GET", end["clip_url"])
        assert whole.status == 200 and len(whole.body) > 1000 and whole.body[4:8] == b"ftyp"

        kept = call(base, "GET", "/v1/watches/live/alerts").json()["data"]
        assert [(a["key"], a["kind"]) for a in kept] == [(new["key"], "new"), (end["key"], "end")]
        later = call(base, "GET", "/v1/watches/live/alerts?since=" + quote(end["end"])).json()["data"]
        assert [a["kind"] for a in later] == ["end"]
        status = call(base, "GET", "/v1/watches/live").json()["status"]
        assert status["alerts"] == 2 and status["frames"] >= 8 and status["error"] is None
        # a question over the event's own wall-clock span is answered with its word
        asked = call(base, "POST", "/v1/watches/live/ask",
                     {"question": "What word is shown?", "since": new["start"], "until": end["end"]})
        assert asked.status == 200, asked.body
        answer = asked.json()
        assert answer["object"] == "watch.answer" and answer["text"].upper().startswith(WORD), answer
        assert answer["frames"] >= 3 and all(new["start"] <= t <= end["end"] for t in answer["times"])
        for bad, field in (({"question": ""}, "question"), ({"question": "x", "since": 5}, "since"),
                           ({"question": "x", "until": "whenever"}, None), ({"question": "x", "foo": 1}, "foo")):
            refused = call(base, "POST", "/v1/watches/live/ask", bad)
            assert refused.status == 400 and (field is None or refused.json()["error"]["param"] == field), bad
        end_at = time.monotonic() - began
        camera.kill()
        deleted = call(base, "DELETE", "/v1/watches/live")
        assert deleted.status == 200
        print(f"\nthe new alert after {new_at:.1f} s (the word shows from 2.5 s), the end after {end_at:.1f} s, "
              f"deleted (the runner stopped) after {time.monotonic() - began:.1f} s")
    assert call(base, "GET", "/v1/watches/live").status == 404  # deleted on the way out


def test_serve_runs_the_homes_watches_and_stops_with_an_alert_stream_open(tmp_path):
    """A watch made before the server starts runs from start-up; SIGTERM ends an open alert stream (uvicorn
    would otherwise wait for it forever) and the watches stop with the server. `--no-watches` runs none."""
    from vidmini.service.watches import WatchFolders, WatchSpec

    home = tmp_path / "home"
    WatchFolders(home).add(WatchSpec("porch", f"udp://127.0.0.1:{free_udp_port()}", segment_s=5))
    env = {**os.environ, "VIDMINI_HOME": str(home)}
    env.pop("VIDMINI_MODEL", None)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY}\n")
    proc, base = start_server(["--api-key-file", str(keys)], env)
    try:
        running(base, "porch", 20)
        response, events = sse(base, "/v1/watches/events", timeout=30)
    finally:
        began = time.monotonic()
        stop(proc)  # fails the test when the server takes more than 30 s
    took = time.monotonic() - began
    assert list(events) == [] and took < 20, took  # the stream ended (nothing was seen), the server stopped
    response.close()

    proc, base = start_server(["--api-key-file", str(keys), "--no-watches"], env)
    try:
        porch = call(base, "GET", "/v1/watches/porch").json()
        assert porch["paused"] is False and porch["status"]["state"] == "stopped"
        refused = call(base, "GET", "/v1/watches/events")
        assert refused.status == 409 and refused.error()["code"] == "watches_not_running"
    finally:
        stop(proc)
