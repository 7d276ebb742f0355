"""`vidmini serve --ray-address local --replicas 2`: the HTTP face on Ray Serve, two CPU replicas on one machine.

Against a live server (a local Ray started by the command, the shipped demo model, two stored videos): answers
through the official `openai` client equal `vidmini ask --json`'s; a video's requests always land on one replica;
streaming, keys, ingest jobs (remembered by the ingress) work through the ingress; a replica killed while
questions are in flight costs the clients a retryable 503 at worst (most are answered by the other replica); the
stores still verify and answer afterwards; the command leaves no Ray process behind.
The ingress's routing and failure handling are also checked without Ray, over a scripted replica handle."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
openai = pytest.importorskip("openai")

from fixtures.app_helpers import reliable_questions, world_video  # noqa: E402
from fixtures.serve_helpers import start_server, stop  # noqa: E402
from ray.exceptions import ActorDiedError  # noqa: E402
from test_openai_api import KEY, cli, video_message  # noqa: E402
from test_rest_api import events  # noqa: E402

from vidmini.api.ray_serve import (  # noqa: E402
    PID_HEADER,
    REPLICA_HEADER,
    RETRIED_HEADER,
    VidminiIngress,
    routing_key,
)
from vidmini.api.server import ServeConfig  # noqa: E402
from vidmini.common.keys import ApiKeys, digest  # noqa: E402
from vidmini.engine.load import SHIPPED_MODEL_DIR  # noqa: E402

TIMING = {"ttft_ms", "tokens_per_s", "encode_ms"}


# ---- the ingress without Ray: a scripted replica handle -------------------------------------------------------
class ScriptedStream:
    """What `handle.options(stream=True).remote(...)` gives: the replica's head, body pieces, or an exception."""

    def __init__(self, items: list) -> None:
        self.items, self.cancelled = list(items), False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedReplicas:
    """A deployment handle whose calls answer from `script`, one list of items per call; records each call's
    options (the `session_id` the router would hash)."""

    def __init__(self, script: list[list], options: dict | None = None, calls: list | None = None) -> None:
        self.script, self._options = script, options or {}
        self.calls = calls if calls is not None else []

    def options(self, **kw) -> ScriptedReplicas:
        return ScriptedReplicas(self.script, {**self._options, **kw}, self.calls)

    def remote(self, *args):
        self.calls.append((self._options, args))
        return ScriptedStream(self.script.pop(0))


class LaterReplicas(ScriptedReplicas):
    """A scripted handle whose replicas answer a moment later (as real ones do), noting for each call how many
    earlier calls were still waiting for their head when it was made."""

    def __init__(self, script: list[list], options: dict | None = None, calls: list | None = None,
                 waiting: set | None = None, overlaps: list | None = None) -> None:
        super().__init__(script, options, calls)
        self.waiting = waiting if waiting is not None else set()
        self.overlaps = overlaps if overlaps is not None else []

    def options(self, **kw) -> LaterReplicas:
        return LaterReplicas(self.script, {**self._options, **kw}, self.calls, self.waiting, self.overlaps)

    def remote(self, *args):
        self.overlaps.append(len(self.waiting))
        stream, waiting = super().remote(*args), self.waiting
        waiting.add(stream)
        answer = stream.__anext__

        async def later():
            await asyncio.sleep(0)  # another call could be made meanwhile
            waiting.discard(stream)
            return await answer()

        stream.__anext__ = later
        return stream


def head(kind: bytes = b"application/json", status: int = 200, replica: bytes = b"r1") -> dict:
    return {"status": status, "headers": [(b"content-type", kind), (REPLICA_HEADER.encode(), replica)]}


def call(app, method: str, path: str, body: bytes = b"", key: str | None = None, query: bytes = b""):
    """One request through an ASGI app: (status, headers, body)."""
    headers = [(b"host", b"test")] + ([(b"authorization", f"Bearer {key}".encode())] if key else [])
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    sent, out = [False], []

    async def receive():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)

    async def send(message):
        out.append(message)

    asyncio.run(app(scope, receive, send))
    return out[0]["status"], dict(out[0]["headers"]), b"".join(m.get("body", b"") for m in out[1:])


def ingress(tmp_path, script: list[list], count: int = 2, keys: ApiKeys | None = None):
    replicas = ScriptedReplicas(script)
    ing = VidminiIngress(replicas, str(tmp_path / "home"), ServeConfig(keys=keys), count)
    return ing, ing.__serve_build_asgi_app__(), replicas


def chat_body(video: str, stream: bool = False) -> bytes:
    return json.dumps({"model": "vidmini", "stream": stream, "messages": video_message(video, "What word?")}).encode()


def test_routing_keys_name_the_video_a_request_is_about():
    assert routing_key("POST", "/v1/chat/completions", {}, chat_body("vidmini://abc-1")) == ("video", "abc-1")
    assert routing_key("POST", "/v1/chat/completions", {}, chat_body("/media/a.mp4")) == ("source", "/media/a.mp4")
    assert routing_key("POST", "/v1/chat/completions", {}, b"not json") is None
    assert routing_key("GET", "/v1/videos/abc-1/thumbnails/3", {}) == ("video", "abc-1")
    assert routing_key("DELETE", "/v1/videos/abc-1", {}) == ("video", "abc-1")
    assert routing_key("GET", "/v1/search", {"q": "x", "video_id": "abc"}) == ("video", "abc")
    assert routing_key("GET", "/v1/search", {"q": "x"}) is None
    assert routing_key("POST", "/v1/videos", {}, b'{"source": "/m/a.mp4"}') == ("source", "/m/a.mp4")
    assert routing_key("GET", "/v1/jobs/j1/events", {}) == ("job", "j1")
    assert routing_key("GET", "/v1/summaries/s1", {}) == ("summary", "s1")
    assert routing_key("POST", "/mcp/", {}) == ("mcp", "")
    for path in ("/v1/videos", "/v1/models", "/health", "/v1/jobs"):
        assert routing_key("GET", path, {}) is None


def test_a_question_whose_replica_died_is_asked_again_once_then_503(tmp_path):
    answer = b'{"object": "chat.completion"}'
    ing, app, replicas = ingress(tmp_path, [[ActorDiedError()], [head(), answer]])
    status, headers, body = call(app, "POST", "/v1/chat/completions", chat_body("vidmini://abc-1"))
    assert (status, body, headers[RETRIED_HEADER.encode()]) == (200, answer, b"1")
    assert [c[0]["session_id"] for c in replicas.calls] == ["video:abc-1", "video:abc-1"]

    ing, app, replicas = ingress(tmp_path, [[ActorDiedError()], [ActorDiedError()]])
    status, headers, body = call(app, "POST", "/v1/chat/completions", chat_body("vidmini://abc-1"))
    assert status == 503 and int(headers[b"retry-after"]) >= 1 and len(replicas.calls) == 2
    error = json.loads(body)["error"]
    assert error["type"] == "server_error" and error["code"] == "replica_unavailable" and error["message"]

    ing, app, replicas = ingress(tmp_path, [[ActorDiedError()]], count=1)  # no other replica to ask
    assert call(app, "GET", "/v1/videos/abc-1")[0] == 503 and len(replicas.calls) == 1

    ing, app, replicas = ingress(tmp_path, [[ActorDiedError()]])  # an add is not repeated
    assert call(app, "POST", "/v1/videos", b'{"source": "/m/a.mp4"}')[0] == 503 and len(replicas.calls) == 1


def test_a_stream_cut_by_a_dying_replica_ends_with_an_openai_error_event(tmp_path):
    first = b'data: {"choices": [{"delta": {"content": "S"}}]}\n\n'
    ing, app, replicas = ingress(tmp_path, [[head(b"text/event-stream"), first, ActorDiedError()]])
    status, headers, body = call(app, "POST", "/v1/chat/completions", chat_body("vidmini://abc-1", stream=True))
    assert status == 200 and body.startswith(first)
    last = body[len(first):].decode()
    assert last.startswith("data: ") and json.loads(last[6:])["error"]["code"] == "replica_unavailable"


def test_keys_are_checked_at_the_ingress_and_jobs_go_back_to_their_replica(tmp_path):
    job = json.dumps({"object": "ingest_job", "id": "job-1"}).encode()
    script = [[head(b"application/json", 202, b"r2"), job], [head(), b'{"id": "job-1"}'], [head(), b"{}"]]
    ing, app, replicas = ingress(tmp_path, script, keys=ApiKeys({digest(KEY)}))
    status, _, body = call(app, "GET", "/v1/models")
    assert status == 401 and json.loads(body)["error"]["type"] == "authentication_error" and not replicas.calls
    assert call(app, "POST", "/v1/videos", b'{"source": "/m/a.mp4"}', key=KEY)[0] == 202
    assert call(app, "GET", "/v1/jobs/job-1", key=KEY)[0] == 200
    assert call(app, "GET", "/openapi.json")[0] == 200  # open, as on `vidmini serve`
    keys = [c[0].get("session_id") for c in replicas.calls]
    assert keys == ["source:/m/a.mp4", "source:/m/a.mp4", None]


def test_jobs_are_listed_from_one_replica_at_a_time(tmp_path):
    """Ray Serve's router keys the handle calls waiting for a replica by their request's internal id, which every
    call made while serving one HTTP request shares: two of them waiting at once lose one (it waits forever, and
    `GET /v1/jobs` with jobs on two replicas hung). The ingress asks the replicas that hold jobs one at a time."""
    def listing(**created: int) -> bytes:
        return json.dumps({"object": "list", "data": [{"id": i, "created": t} for i, t in created.items()]}).encode()

    replicas = LaterReplicas([[head(), listing(job_1=20)], [head(replica=b"r2"), listing(job_2=10)]])
    ing = VidminiIngress(replicas, str(tmp_path / "home"), ServeConfig(), 2)
    ing._job_keys = {"r1": "source:/m/a.mp4", "r2": "upload:b.mp4"}
    status, _, body = call(ing.__serve_build_asgi_app__(), "GET", "/v1/jobs")
    assert status == 200 and [j["id"] for j in json.loads(body)["data"]] == ["job_2", "job_1"]  # by time
    assert [c[0]["session_id"] for c in replicas.calls] == ["source:/m/a.mp4", "upload:b.mp4"]
    assert replicas.overlaps == [0, 0], "a replica was asked while another one's answer was awaited"


# ---- a live server on a local Ray -------------------------------------------------------------------------------
def descendants(pid: int) -> dict[int, str]:
    """Every process below `pid` (pid → command line), from ps."""
    rows = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout.splitlines()
    children: dict[int, list[tuple[int, str]]] = {}
    for row in rows:
        p, pp, *args = row.split(None, 2)
        children.setdefault(int(pp), []).append((int(p), args[0] if args else ""))
    out, todo = {}, [pid]
    while todo:
        for child, args in children.get(todo.pop(), []):
            out[child] = args
            todo.append(child)
    return out


def alive(pid: int) -> bool:
    """Running (a killed process its parent has not reaped yet, a zombie, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def get(base: str, path: str, key: str | None = KEY):
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not (SHIPPED_MODEL_DIR / "config.json").exists():
        pytest.skip("no shipped demo model")
    tmp = tmp_path_factory.mktemp("ray-serve")
    home, media = tmp / "home", tmp / "media"
    media.mkdir()
    env = {**os.environ, "VIDMINI_HOME": str(home)}
    env.pop("VIDMINI_MODEL", None)
    videos = [world_video(tmp, seed=seed, seconds=24) for seed in (12, 21)]
    res = cli(["ingest", *(str(path) for path, _ in videos), "--json"], env)
    assert res.returncode == 0, res.stderr
    ids = [json.loads(line)["id"] for line in res.stdout.splitlines() if line.strip()]
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n")
    world_video(media, seed=13, seconds=12)
    began = time.monotonic()
    proc, base = start_cluster(["--ray-address", "local", "--replicas", "2", "--api-key-file", str(keys),
                                "--media-root", str(media)], env)
    print(f"two replicas up in {time.monotonic() - began:.1f}s", file=sys.stderr)
    ray_processes = descendants(proc.pid)
    try:
        yield {"base": base, "ids": ids, "timelines": [t for _, t in videos], "env": env, "home": home,
               "media": media}
    finally:
        ray_processes.update(descendants(proc.pid))  # with the replica started in place of a killed one
        stop(proc)
        deadline = time.time() + 30
        while time.time() < deadline and any(alive(p) for p in ray_processes):
            time.sleep(0.5)
        left = {p: a for p, a in ray_processes.items() if alive(p)}
        for p in left:  # the test fails below; do not leave them running either
            os.kill(p, signal.SIGKILL)
        assert not left, f"processes left behind by `vidmini serve --ray-address local`: {left}"


def start_cluster(args: list[str], env: dict, replicas: int = 2):
    """`vidmini serve` on Ray, once every replica runs (the ingress's `/health` counts them: a video's replica is
    decided over the replicas the router knows, so the questions wait for all of them)."""
    proc, base = start_server(args, env)
    deadline = time.time() + 180
    while True:
        status, _, body = get(base, "/health", None)
        if status == 200 and json.loads(body)["replicas"]["running"] == replicas:
            break
        if time.time() > deadline:
            stop(proc)
            raise AssertionError(f"{replicas} replicas did not come up within 180 s: {body!r}")
        time.sleep(0.3)
    time.sleep(1.0)  # the routers hear of the last replica a moment after the controller
    return proc, base


def client(cluster, key: str = KEY):
    return openai.OpenAI(base_url=cluster["base"] + "/v1", api_key=key, max_retries=0, timeout=120)


def question(cluster, i: int):
    q = reliable_questions(cluster["timelines"][i], seed=3, per_family=1)[0]
    return q, {"start": q.start_s, "end": q.end_s}


def test_answers_equal_the_cli_and_each_video_stays_on_one_replica(cluster):
    c = client(cluster)
    for i, video_id in enumerate(cluster["ids"]):
        q, extra = question(cluster, i)
        replicas, answers = set(), []
        for _ in range(6):
            raw = c.chat.completions.with_raw_response.create(
                model="vidmini", messages=video_message(f"vidmini://{video_id}", q.question), max_tokens=16,
                extra_body=extra)
            replicas.add(raw.headers[REPLICA_HEADER])
            answers.append(raw.parse())
        assert len(replicas) == 1, f"video {video_id} answered by {replicas}"
        res = cli(["ask", video_id, q.question, "--from", str(q.start_s), "--to", str(q.end_s),
                   "--max-new-tokens", "16", "--json"], cluster["env"])
        assert res.returncode == 0, res.stderr
        expected = json.loads(res.stdout)
        for got in answers:
            assert got.choices[0].message.content == expected["answer"]
            assert got.usage.completion_tokens == len(expected["token_ids"])
            details = got.model_extra["vidmini"]
            assert {k: v for k, v in details.items() if k not in TIMING} == \
                {k: v for k, v in expected.items() if k not in TIMING}
        cluster.setdefault("answers", {})[video_id] = (q, extra, expected["answer"])


def test_streaming_keys_and_listing_through_the_ingress(cluster):
    video_id = cluster["ids"][0]
    q, extra = question(cluster, 0)
    c = client(cluster)
    plain = c.chat.completions.create(model="vidmini", messages=video_message(f"vidmini://{video_id}", q.question),
                                      max_tokens=16, extra_body=extra)
    chunks = list(c.chat.completions.create(
        model="vidmini", messages=video_message(f"vidmini://{video_id}", q.question), max_tokens=16,
        extra_body=extra, stream=True, stream_options={"include_usage": True}))
    assert len(chunks) >= 3 and chunks[-1].usage is not None
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == plain.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-2].model_extra["vidmini"]["frames"]

    with pytest.raises(openai.AuthenticationError) as bad:
        client(cluster, "sk-wrong").models.list()
    assert bad.value.status_code == 401 and bad.value.body["type"] == "authentication_error"
    status, _, body = get(cluster["base"], "/v1/videos")
    assert status == 200 and {v["id"] for v in json.loads(body)["data"]} >= set(cluster["ids"])


def test_mcp_sessions_through_the_ingress(cluster):
    """An MCP session lives in one replica: every request of it must reach that one."""
    anyio = pytest.importorskip("anyio")
    httpx2 = pytest.importorskip("httpx2")
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async def run() -> list:
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, timeout=httpx2.Timeout(30.0, read=120.0))
        with anyio.fail_after(120):
            async with http, streamable_http_client(f"{cluster['base']}/mcp/", http_client=http) as (read, write), \
                    ClientSession(read, write) as session:
                await session.initialize()
                found = []
                for _ in range(3):
                    result = await session.call_tool("list_videos", {})
                    assert not result.is_error, result
                    found.append(json.loads(result.content[0].text)["videos"])
                return found

    for listing in anyio.run(run):
        assert set(cluster["ids"]) <= {v["id"] for v in listing}


def test_an_ingest_job_is_followed_on_its_replica(cluster):
    (source,) = cluster["media"].glob("*.mp4")
    req = urllib.request.Request(cluster["base"] + "/v1/videos", data=json.dumps({"source": str(source)}).encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 202
        job, replica = json.load(r), r.headers[REPLICA_HEADER]
    # the job's events stream through the ingress from the replica that runs it (the others do not know it)
    seen = events(cluster["base"], f"/v1/jobs/{job['id']}/events")
    assert seen[-1][0] == "end" and seen[-1][1]["status"] == "ready", seen
    for _ in range(3):
        status, headers, body = get(cluster["base"], f"/v1/jobs/{job['id']}")
        assert status == 200 and headers[REPLICA_HEADER] == replica and json.loads(body)["status"] == "ready"
    job = json.loads(body)
    # an upload is streamed to the shared uploads folder by the ingress, then ingested by a replica (here: the
    # same video again, so its store is reused and the uploaded copy dropped); uploaded again (each under a new
    # name, so hashed anew) until jobs sit on both replicas, so that the listing below asks both
    ids, holders = [job["id"]], {replica}
    for n in range(10):
        req = urllib.request.Request(f"{cluster['base']}/v1/videos/upload?filename=again{n}.mp4",
                                     data=source.read_bytes(), headers={"Authorization": f"Bearer {KEY}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 202
            upload = json.load(r)
            holders.add(r.headers[REPLICA_HEADER])
        ids.append(upload["id"])
        seen = events(cluster["base"], f"/v1/jobs/{upload['id']}/events")
        assert seen[-1][1]["status"] == "ready" and seen[-1][1]["video_id"] == job["video_id"], seen
        if len(holders) == 2:
            break
    print(f"{len(ids)} jobs on {len(holders)} replicas", file=sys.stderr)
    for _ in range(3):  # from every replica that holds jobs
        status, _, body = get(cluster["base"], "/v1/jobs")
        assert status == 200 and set(ids) <= {j["id"] for j in json.loads(body)["data"]}
    answer = client(cluster).chat.completions.create(
        model="vidmini", messages=video_message(f"vidmini://{job['video_id']}", "What word is shown?"), max_tokens=8)
    assert answer.choices[0].message.content


def test_a_replica_killed_mid_request_costs_a_retry_at_most_and_damages_no_store(cluster):
    from vidmini.store.video_store import StoreCatalog

    assert "answers" in cluster, "run with test_answers_equal_the_cli_and_each_video_stays_on_one_replica"
    video_id = cluster["ids"][0]
    q, extra, expected = cluster["answers"][video_id]
    c = client(cluster)

    def ask():
        try:
            raw = c.chat.completions.with_raw_response.create(
                model="vidmini", messages=video_message(f"vidmini://{video_id}", q.question), max_tokens=16,
                extra_body=extra)
            return "answer", raw.headers, raw.parse().choices[0].message.content, time.time()
        except openai.APIStatusError as e:
            return "error", e.response.headers, e, time.time()

    first = c.chat.completions.with_raw_response.create(
        model="vidmini", messages=video_message(f"vidmini://{video_id}", q.question), max_tokens=16,
        extra_body=extra)
    victim, pid = first.headers[REPLICA_HEADER], int(first.headers[PID_HEADER])
    with ThreadPoolExecutor(16) as pool:  # 24 questions on one video: some still queued or running at the kill
        futures = [pool.submit(ask) for _ in range(24)]
        time.sleep(0.2)
        killed_at = time.time()
        os.kill(pid, signal.SIGKILL)
        results = [f.result() for f in futures]
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:  # the kernel takes a moment to tear a big process down
        time.sleep(0.1)
    assert not alive(pid)
    in_flight = [r for r in results if r[3] > killed_at]
    assert in_flight, "every question was answered before the kill: nothing was tested"
    for kind, headers, value, _ in results:
        if kind == "answer":
            assert value == expected
        else:  # retryable, in OpenAI's shape
            assert value.status_code == 503 and int(headers["retry-after"]) >= 1
            assert value.body["type"] == "server_error" and value.body["code"] == "replica_unavailable"
    others = [h for kind, h, _, t in in_flight if kind == "answer" and h[REPLICA_HEADER] != victim]
    print(f"in flight at the kill: {len(in_flight)}; answered by the other replica: {len(others)} "
          f"({sum(h.get(RETRIED_HEADER) == '1' for h in others)} retried); 503: "
          f"{sum(r[0] == 'error' for r in results)}", file=sys.stderr)
    assert others, f"no question was answered by the other replica: {[(r[0], r[2]) for r in results]}"
    assert any(h.get(RETRIED_HEADER) == "1" for h in others)

    for video_id in cluster["ids"]:  # the stores are whole, and answer as before, through the server and alone
        assert StoreCatalog(cluster["home"]).get(video_id).verify() == []
        q, extra, expected = cluster["answers"][video_id]
        again = c.chat.completions.create(model="vidmini", max_tokens=16, extra_body=extra,
                                          messages=video_message(f"vidmini://{video_id}", q.question))
        assert again.choices[0].message.content == expected
    res = cli(["ask", cluster["ids"][0], "What word is shown?", "--max-new-tokens", "8"], cluster["env"])
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
