"""The library over REST on a live `vidmini serve` (real HTTP through urllib, the shipped demo model): add by path,
follow the ingest's events, list, get, search, media ranges, thumbnails, summaries, delete; streamed uploads and
their size limit; keys, media roots, rate limits, CORS; and an OpenAPI document that names every route."""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from fixtures.app_helpers import world_video
from fixtures.serve_helpers import start_server, stop
from test_openai_api import KEY

from vidmini.engine.load import SHIPPED_MODEL_DIR

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "videos"
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")
UPLOAD_LIMIT_MB = 1


class Reply:
    def __init__(self, status: int, headers, body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def call(base: str, method: str, path: str, body=None, key: str | None = KEY, headers: dict | None = None,
         raw: bytes | None = None) -> Reply:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, data=data, method=method, headers=dict(headers or {}))
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return Reply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, e.headers, e.read())


def raw_request(base: str, head: list[str], body: bytes = b"") -> str:
    """One request over a plain socket (the status line and headers given exactly), the response as text."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(base)
    lines = [*head, f"Host: {where.netloc}", f"Authorization: Bearer {KEY}", "Connection: close", "", ""]
    with socket.create_connection((where.hostname, where.port), timeout=60) as conn:
        conn.sendall("\r\n".join(lines).encode() + body)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    return reply.decode(errors="replace")


def events(base: str, path: str) -> list[tuple[str, dict]]:
    """A server-sent event stream, read to its end: (event name, data) pairs."""
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {KEY}"})
    out, name = [], None
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                out.append((name, json.loads(line[6:])))
    return out


def wait_job(base: str, job_id: str, timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = call(base, "GET", f"/v1/jobs/{job_id}").json()
        if job["status"] not in ("queued", "ingesting"):
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} still running after {timeout} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rest")
    home, media = tmp / "home", tmp / "media"
    media.mkdir()
    env = {**os.environ, "VIDMINI_HOME": str(home)}
    env.pop("VIDMINI_MODEL", None)
    inside, _ = world_video(media, seed=21, seconds=12)
    outside, _ = world_video(tmp, seed=22, seconds=6)
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n")
    proc, base = start_server(["--api-key-file", str(keys), "--media-root", str(media),
                               "--max-upload-mb", str(UPLOAD_LIMIT_MB)], env)
    yield {"base": base, "home": home, "inside": inside, "outside": outside}
    stop(proc)


def test_add_by_path_follow_list_search_media_thumbnails_summary_delete(server):
    base = server["base"]
    added = call(base, "POST", "/v1/videos", {"source": str(server["inside"])})
    assert added.status == 202, added.body
    job = added.json()
    assert job["status"] in ("queued", "ingesting") and job["object"] == "ingest_job"
    seen = events(base, f"/v1/jobs/{job['id']}/events")
    assert seen[-1][0] == "end" and seen[-1][1]["status"] == "ready"
    done = [e["frames_done"] for _, e in seen]
    assert done == sorted(done) and done[-1] == 12
    video_id = seen[-1][1]["video_id"]

    listed = call(base, "GET", "/v1/videos").json()["data"]
    assert video_id in [v["id"] for v in listed]
    one = call(base, "GET", f"/v1/videos/{video_id}").json()
    assert one["frames"] == 12

    found = call(base, "GET", f"/v1/search?q=a+red+circle&video_id={video_id}&k=3")
    assert found.status == 200, found.body
    moments = found.json()["data"]
    assert 1 <= len(moments) <= 3
    assert all(m["video_id"] == video_id and 0 <= m["start"] <= m["end"] <= 12 for m in moments)

    whole = Path(server["inside"]).read_bytes()
    part = call(base, "GET", f"/v1/videos/{video_id}/media", headers={"Range": "bytes=100-299"})
    assert part.status == 206 and part.body == whole[100:300]
    assert part.headers["content-range"] == f"bytes 100-299/{len(whole)}"
    full = call(base, "GET", f"/v1/videos/{video_id}/media")
    assert full.status == 200 and full.body == whole

    thumb = call(base, "GET", f"/v1/videos/{video_id}/thumbnails/0")
    assert thumb.status == 200 and thumb.body[:2] == b"\xff\xd8" and thumb.headers["content-type"] == "image/jpeg"
    assert call(base, "GET", f"/v1/videos/{video_id}/thumbnails/12").status == 404

    started = call(base, "POST", f"/v1/videos/{video_id}/summaries", {"mode": "general"})
    assert started.status == 202, started.body
    summary_id = started.json()["id"]
    deadline = time.time() + 180
    while (record := call(base, "GET", f"/v1/summaries/{summary_id}").json())["status"] == "running":
        assert time.time() < deadline, "the summary did not finish"
        time.sleep(0.5)
    assert record["status"] == "ready", record
    assert record["summary"]["video_id"] == video_id and record["summary"]["mode"] == "general"
    assert [s["id"] for s in call(base, "GET", f"/v1/videos/{video_id}/summaries").json()["data"]] == [summary_id]

    deleted = call(base, "DELETE", f"/v1/videos/{video_id}")
    assert deleted.status == 200 and deleted.json()["deleted"] is True
    assert call(base, "GET", f"/v1/videos/{video_id}").status == 404
    assert call(base, "GET", f"/v1/videos/{video_id}/media").status == 404
    assert Path(server["inside"]).exists()  # a media-root file is the user's: deleting the video keeps it


def test_a_streamed_upload_is_ingested_and_the_size_limit_holds(server):
    base = server["base"]
    data = (FIXTURES / "cockatoo.mp4").read_bytes()
    assert len(data) < UPLOAD_LIMIT_MB << 20
    up = call(base, "POST", "/v1/videos/upload?filename=my%20bird.mp4", raw=data,
              headers={"Content-Type": "application/octet-stream"})
    assert up.status == 202, up.body
    job = wait_job(base, up.json()["id"])
    assert job["status"] == "ready" and job["frames_done"] > 0 and job["name"] == "my bird.mp4"

    limit = UPLOAD_LIMIT_MB << 20
    # a declared length over the limit is refused before any of the body is read: the headers alone get the 413
    declared = raw_request(base, ["POST /v1/videos/upload?filename=big.mp4 HTTP/1.1", f"Content-Length: {limit + 1}"])
    assert declared.startswith("HTTP/1.1 413") and '"upload_too_large"' in declared

    # without a length (chunked), the server counts as the bytes arrive: exactly limit + 1 bytes sent, all of which
    # the server reads before it refuses, so the client is never cut off mid-send
    pieces = [b"\0" * (256 << 10)] * (limit // (256 << 10)) + [b"\0"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    chunked = raw_request(base, ["POST /v1/videos/upload?filename=chunked.mp4 HTTP/1.1",
                                 "Transfer-Encoding: chunked"], body)
    assert chunked.startswith("HTTP/1.1 413") and '"upload_too_large"' in chunked
    uploads = server["home"] / "uploads"
    assert not [p.name for p in uploads.iterdir() if p.name.endswith(".part") or "chunked" in p.name or
                "big" in p.name]


def test_refusals_have_the_right_status(server):
    base = server["base"]
    outside = call(base, "POST", "/v1/videos", {"source": str(server["outside"])})
    assert outside.status == 403 and outside.json()["error"]["code"] == "path_not_allowed"
    sneaky = call(base, "POST", "/v1/videos", {"source": str(Path(server["inside"]).parent / ".." /
                                                              Path(server["outside"]).name)})
    assert sneaky.status == 403
    assert call(base, "POST", "/v1/videos", {"nothing": 1}).status == 400
    assert call(base, "POST", "/v1/videos", raw=b"{not json", headers={"Content-Type": "application/json"}
                ).status == 400
    for method, path in [("GET", "/v1/videos"), ("POST", "/v1/videos"), ("GET", "/v1/jobs"),
                         ("GET", "/v1/search?q=x"), ("DELETE", "/v1/videos/abc"), ("GET", "/v1/videos/abc/media")]:
        assert call(base, method, path, {} if method == "POST" else None, key=None).status == 401, path
        assert call(base, method, path, {} if method == "POST" else None, key="sk-wrong").status == 401, path
    assert call(base, "GET", "/v1/jobs/nope").json()["error"]["code"] == "job_not_found"
    assert call(base, "GET", "/v1/videos/nope").status == 404
    assert call(base, "GET", "/v1/summaries/nope").status == 404
    assert call(base, "GET", "/v1/search?q=").status == 400
    assert call(base, "GET", "/v1/search?q=x&k=many").status == 400
    health = call(base, "GET", "/health", key=None)
    assert health.status == 200


def test_openapi_names_every_route_the_server_serves(server, tmp_path):
    from vidmini.api.server import ServeConfig, VidminiApi
    from vidmini.service.library import Library

    doc = call(server["base"], "GET", "/openapi.json", key=None)
    assert doc.status == 200
    spec = doc.json()
    assert spec["openapi"].startswith("3.1")
    described = {(path, method.upper()) for path, ops in spec["paths"].items() for method in ops}
    app = VidminiApi(Library(tmp_path / "lib"), ServeConfig()).app()
    mounted = {r.path + "/" for r in app.routes if not hasattr(r, "methods")}  # MCP's streamable HTTP
    served = {(r.path, m) for r in app.routes if hasattr(r, "methods") for m in r.methods if m != "HEAD"}
    assert served == {(path, method) for path, method in described if path not in mounted}
    assert mounted == {"/mcp/"} and ("/mcp/", "POST") in described
    page = call(server["base"], "GET", "/docs", key=None)
    assert page.status == 200 and b"/v1/chat/completions" in page.body


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limited")
    env = {**os.environ, "VIDMINI_HOME": str(tmp / "home")}
    env.pop("VIDMINI_MODEL", None)
    proc, base = start_server(["--rate-limit", "4", "--cors-origin", "http://allowed.example"], env)
    yield base
    stop(proc)


def test_a_rate_limit_answers_429_with_retry_after(limited):
    statuses = [call(limited, "GET", "/v1/videos", key=None).status for _ in range(6)]
    assert statuses[:4] == [200] * 4 and statuses[4:] == [429, 429]
    refused = call(limited, "GET", "/v1/jobs", key=None)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and int(refused.headers["retry-after"]) >= 1
    assert call(limited, "GET", "/health", key=None).status == 200  # health is never limited


def test_cors_only_for_the_named_origin(limited, server):
    pre = {"Origin": "http://allowed.example", "Access-Control-Request-Method": "GET"}
    ok = call(limited, "OPTIONS", "/health", key=None, headers=pre)
    assert ok.status == 200 and ok.headers["access-control-allow-origin"] == "http://allowed.example"
    other = call(limited, "OPTIONS", "/health", key=None, headers={**pre, "Origin": "http://evil.example"})
    assert other.headers.get("access-control-allow-origin") is None
    plain = call(server["base"], "GET", "/health", key=None, headers={"Origin": "http://allowed.example"})
    assert plain.headers.get("access-control-allow-origin") is None  # off unless configured


def test_the_pending_bound_and_the_limiter_count_exactly():
    from vidmini.api.errors import ApiError
    from vidmini.api.limits import PendingBound, RateLimiter

    bound = PendingBound(2)
    bound.enter()
    release = bound.releaser()
    bound.enter()
    with pytest.raises(ApiError) as err:
        bound.enter()
    assert err.value.status == 429 and err.value.code == "queue_full"
    release()
    release()  # counted once
    bound.enter()
    assert bound.pending == 2
    limiter = RateLimiter(2, window_s=0.5)
    limiter.check("a")
    limiter.check("a")
    limiter.check("b")
    with pytest.raises(ApiError):
        limiter.check("a")
    time.sleep(0.55)
    limiter.check("a")
