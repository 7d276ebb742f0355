"""`vidmini serve --ray-address ADDR --replicas N`: the HTTP face on Ray Serve, N model replicas behind one ingress.

    client ──HTTP──► Serve proxy ──► VidminiIngress (one, no model) ──handle──► VidminiReplica × N
                                      keys, rate limit, CORS,              a Library + VidminiApi each (one
                                      the routing key, retries             model; GPU or CPU), one data root

* **Replicas.** Each runs the same `VidminiApi` as `vidmini serve` over its own `Library`; every replica opens the
  same data root (`$VIDMINI_HOME` of the command; on several machines a shared file system mounted at that path).
  The stores and the search index are made for several processes: readers only read committed chunks and
  atomically replaced manifests and index files; writers take the store folder's flock (the index's `.lock`) for
  each commit and refuse to commit over a manifest that changed under them. A replica starts answering only once
  its model has loaded.
* **Routing by video.** The ingress reads the video a request is about (`/v1/videos/{id}...`, `vidmini://ID` in a
  chat body, `video_id=` in a query; a server path in a chat body or `POST /v1/videos` by that path, so that one
  file is ingested by one replica at a time; `/mcp` as one key, since its sessions live in one replica) and sends
  the request with it as the handle's `session_id`. The
  replicas' deployment routes with Ray Serve's own `ConsistentHashRouter` (a hash ring over the replicas), held
  to the ring owner (`vidmini/api/ray_router.py`), so a video's questions go to the replica that holds its warm
  session, and to the next one on the ring only once that one is dead; requests without a video are spread. Ingest
  jobs and summaries live in the replica that runs them: the ingress remembers which (for `/v1/jobs/{id}`,
  `/v1/summaries/{id}`) and lists jobs from every replica that has some (one replica at a time:
  concurrent handle calls of one request are not routed reliably by Ray Serve, see `_gathered`).
* **Failures.** A replica that dies (`ActorDiedError` and its kin) is dropped from the ring by Ray Serve's router.
  A question, or any GET, that had not been answered yet is sent once more, to the next replica on the ring;
  anything else (an add, a delete, a reply already streaming) gets 503 with `Retry-After` in OpenAI's error shape
  (a stream ends with an OpenAI-shaped error event). Ray Serve starts a new replica in its place. A killed writer
  leaves at most an unlisted chunk or a temp file, removed by the next writer: no store is damaged. (Two writers
  of one store at once, e.g. `vidmini ingest` beside the server: one commits, the other stops with StoreConflict.)
* **`/health`** is the ingress's own: `replicas` {running, target} from Serve's status, `model_loaded` when one
  runs (a replica runs only with its model loaded).
* **Keys** are checked once, at the ingress, with the rate limit (one count per key for all replicas) and CORS;
  the replicas, reachable only through Ray handles, check none (`ServeConfig.behind_ingress`).
* **Uploads** are streamed to the shared uploads folder by the ingress (the same size limit), then handed to a
  replica to ingest.

Responses carry `x-vidmini-replica` (the replica's Ray Serve id) and `x-vidmini-replica-pid`; an answer that came
from a second replica after the first failed also carries `x-vidmini-retried: 1`.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import sys
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from vidmini.api.errors import ApiError
from vidmini.api.limits import RateLimiter
from vidmini.api.rest import receive_upload
from vidmini.api.server import VIDEO_SCHEME, ServeConfig
from vidmini.common.errors import UsageError, one_line
from vidmini.common.keys import digest

APP_NAME = "vidmini"
REPLICA_DEPLOYMENT = "VidminiReplica"
ROUTER = "vidmini.api.ray_router.VideoAffinityRouter"  # Ray Serve's ConsistentHashRouter, held to the ring owner
REPLICA_HEADER = "x-vidmini-replica"
PID_HEADER = "x-vidmini-replica-pid"
RETRIED_HEADER = "x-vidmini-retried"  # on an answer from a second replica, after the first one failed
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs"})  # as in VidminiApi: no key needed
REMEMBERED = 10_000  # job and summary ids whose replica the ingress remembers
SHUTDOWN_S = 10  # the most `vidmini serve` waits for Serve to take its replicas down
INGRESS_MAX_ONGOING = 4096  # streams (chat, job events) stay open in the ingress while they run


@dataclass
class RayOptions:
    """Where and how many: `address` is `local` (start a Ray of this machine's own, stopped on exit), `auto` (the
    running cluster this machine belongs to) or `ray://host:port`."""

    address: str = "local"
    replicas: int = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    def check(self) -> RayOptions:
        if self.replicas < 1:
            raise UsageError("--replicas must be >= 1")
        if self.replica_cpus < 0 or self.replica_gpus < 0:
            raise UsageError("--replica-cpus and --replica-gpus must be >= 0")
        if self.address not in ("local", "auto") and not self.address.startswith("ray://") \
                and ":" not in self.address:
            raise UsageError("--ray-address must be local, auto, ray://host:port or host:port")
        return self


# ---- what a request is about ------------------------------------------------------------------------------------
def _chat_video(body: bytes) -> str | None:
    """The `video_url` of a chat body's last user message (as `parse_chat` reads it), or None."""
    try:
        data = json.loads(body)
        user = next(m for m in reversed(data["messages"]) if isinstance(m, dict) and m.get("role") == "user")
        parts = user.get("content")
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict) and part.get("type") == "video_url" and isinstance(part.get("video_url"), dict):
                url = part["video_url"].get("url")
                return url if isinstance(url, str) and url else None
    except (ValueError, TypeError, KeyError, StopIteration, AttributeError):
        pass
    return None


def routing_key(method: str, path: str, query: Mapping[str, str], body: bytes = b"") -> tuple[str, str] | None:
    """What a request is about, as (kind, value): ("video", id or id prefix), ("source", a server path or stream
    URL to ingest: in a chat body or `POST /v1/videos`, so that one replica ingests it, not two at once), ("job",
    id), ("summary", id), ("mcp", ""); None when it is about no one video (any replica answers)."""
    parts = [p for p in path.split("/") if p]
    if parts[:1] == ["mcp"]:
        return ("mcp", "")
    if parts[:2] == ["v1", "videos"]:
        if len(parts) >= 3 and parts[2] != "upload":
            return ("video", parts[2])
        if len(parts) == 2 and method == "POST":
            try:
                source = json.loads(body or b"{}").get("source")
            except (ValueError, AttributeError):
                return None
            return ("source", source.strip()) if isinstance(source, str) and source.strip() else None
        return None
    if parts[:2] == ["v1", "jobs"] and len(parts) >= 3:
        return ("job", parts[2])
    if parts[:2] == ["v1", "summaries"] and len(parts) >= 3:
        return ("summary", parts[2])
    if parts == ["v1", "search"] and query.get("video_id"):
        return ("video", query["video_id"])
    if parts == ["v1", "chat", "completions"] and method == "POST":
        url = _chat_video(body)
        if url is None:
            return None
        return ("video", url[len(VIDEO_SCHEME):]) if url.startswith(VIDEO_SCHEME) else ("source", url)
    return None


def _retryable(method: str, path: str) -> bool:
    """May a request that a dying replica never answered be sent again? Reads, and questions (a question about a
    server path ingests it first: a second ingest resumes or reuses the store)."""
    return method in ("GET", "HEAD") or (method == "POST" and path.rstrip("/") == "/v1/chat/completions")


def _replica_failures() -> tuple[type[BaseException], ...]:
    from ray.exceptions import RayActorError, WorkerCrashedError
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    return (RayActorError, WorkerCrashedError, ReplicaUnavailableError, DeploymentUnavailableError)


def _unavailable() -> ApiError:
    return ApiError(503, "the replica answering this request stopped before it finished; retry (another replica "
                    "takes its videos)", "server_error", code="replica_unavailable", retry_after=2)


# ---- a replica: one model, the whole API ------------------------------------------------------------------------
class VidminiReplica:
    """One Ray Serve replica: a `Library` on the shared data root and the `VidminiApi` over it; `forward` runs one
    HTTP request through that app in this process and streams back its head, then its body."""

    async def __init__(self, root: str, config: ServeConfig, model: str | None, dtype: str, device: str,
                       threads: int) -> None:
        os.environ["VIDMINI_HOME"] = root  # everything that reads the data home reads the shared one
        from ray import serve

        from vidmini.api.server import VidminiApi
        from vidmini.service.library import Library

        if threads > 0:
            import torch

            torch.set_num_threads(threads)
        self.library = Library(root, model, device=device, dtype=dtype)
        await asyncio.to_thread(lambda: self.library.engine)  # ready only with its model (a failure fails the replica)
        self.api = VidminiApi(self.library, config)
        self.app = self.api.app()
        self.name, self.pid = serve.get_replica_context().replica_tag, os.getpid()
        self._stop = asyncio.Event()
        started = asyncio.Event()

        async def lifespan() -> None:  # the app's lifespan (the MCP session manager) runs as long as the replica
            async with self.app.router.lifespan_context(self.app):
                started.set()
                await self._stop.wait()

        self._lifespan = asyncio.create_task(lifespan())
        await started.wait()

    def _identity(self) -> list[tuple[bytes, bytes]]:
        return [(REPLICA_HEADER.encode(), self.name.encode()), (PID_HEADER.encode(), str(self.pid).encode())]

    async def forward(self, request: dict):
        """The app's answer to `request` (method, path, query_string, headers, body, client, ...): first
        {"status", "headers"}, then the body in pieces. Closing this generator is the client going away."""
        messages: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        body_given = False

        async def receive() -> dict:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": request["body"], "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            await messages.put(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": request.get("http_version", "1.1"), "method": request["method"],
                 "scheme": request.get("scheme", "http"), "path": request["path"],
                 "raw_path": request.get("raw_path") or request["path"].encode(), "query_string": request["query_string"],
                 "root_path": "",
                 "headers": request["headers"], "client": request.get("client"), "server": request.get("server"),
                 "state": {}}

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as e:  # noqa: BLE001 - answered as a 500 when nothing was sent yet
                await messages.put({"type": "vidmini.error", "error": one_line(e)})
            finally:
                await messages.put(None)

        task = asyncio.create_task(run())
        started = complete = False
        try:
            while (message := await messages.get()) is not None:
                if message["type"] == "http.response.start":
                    started = True
                    yield {"status": message["status"], "headers": list(message.get("headers", [])) + self._identity()}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield bytes(message["body"])
                    if not message.get("more_body", False):
                        complete = True
                        return  # the app may still run its background task (it frees its queue slot)
                elif message["type"] == "vidmini.error" and not started:
                    error = ApiError(500, f"internal error: {message['error']}", "server_error").response()
                    yield {"status": error.status_code, "headers": error.raw_headers + self._identity()}
                    yield bytes(error.body)
                    complete = True
                    return
        finally:
            gone.set()
            if not complete:  # the client went away (or the ingress gave up): stop the answer's generation now
                task.cancel()

    async def add_upload(self, path: str, name: str) -> dict:
        """Queue for ingest a file the ingress has streamed into the shared uploads folder."""
        from vidmini.api.rest import job_json
        from vidmini.service.library import LibraryError
        from vidmini.service.options import IngestOptions

        uploads = (Path(self.library.root) / "uploads").resolve()
        if not Path(path).resolve().is_relative_to(uploads):
            error = ApiError(400, "not an upload")
        else:
            try:
                job = self.library.add(path, IngestOptions(), name=name)
                return {"status": 202, "body": job_json(job), "replica": self.name, "pid": self.pid}
            except LibraryError as e:
                error = ApiError(400, one_line(e))
        return {"status": error.status, "body": json.loads(error.response().body), "replica": self.name,
                "pid": self.pid}

    async def __del__(self) -> None:
        if hasattr(self, "_stop"):
            self._stop.set()
        if hasattr(self, "library"):
            self.library.close()


# ---- the ingress: keys, routing, retries ------------------------------------------------------------------------
class VidminiIngress:
    """The one HTTP entry (Ray Serve's proxy hands it every request): keys, rate limit, CORS and uploads here;
    everything else forwarded to the replica its video hashes to."""

    def __init__(self, replicas, root: str, config: ServeConfig, count: int) -> None:
        from vidmini.service.library import Library

        self.replicas, self.config, self.count = replicas, config, count
        self.library = Library(root)  # no model: ids, prefixes and uploads on the shared data root
        self.limiter = RateLimiter(config.rate_per_minute) if config.rate_per_minute else None
        self._owners: OrderedDict[str, str] = OrderedDict()  # job or summary id → the routing key it was made with
        self._job_keys: dict[str, str] = {}  # replica → a routing key that reaches it, for each replica with jobs

    def __serve_build_asgi_app__(self):
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.routing import Route

        middleware = []
        if self.config.cors_origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=self.config.cors_origins,
                                         allow_methods=["GET", "POST", "DELETE"],
                                         allow_headers=["Authorization", "Content-Type"]))
        methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        return Starlette(routes=[Route("/{path:path}", self.endpoint, methods=methods)], middleware=middleware)

    # ---- who is asking -----------------------------------------------------------------------------------------
    def _caller(self, request) -> str:
        """As `VidminiApi._caller`: 401 without a right key (where keys are configured), then the rate limit."""
        needs_key = request.url.path not in OPEN_PATHS
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        if self.config.keys is None:
            caller = f"addr:{request.client.host if request.client else '-'}"
        elif needs_key and not self.config.keys.allows(key):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error",
                           code="invalid_api_key")
        else:
            caller = f"key:{digest(key)[:16]}" if key else "anonymous"
        if needs_key and self.limiter is not None:
            self.limiter.check(caller)
        return caller

    async def endpoint(self, request):
        try:
            self._caller(request)
            method, path = request.method, request.url.path
            if method == "POST" and path.rstrip("/") == "/v1/videos/upload":
                return await self._upload(request)
            if method == "GET" and path == "/health":
                return await self._health()
            body = await request.body()
            if method == "GET" and path.rstrip("/") in ("/v1/jobs", "/v1/videos") and self._job_keys:
                return await self._gathered(request, path.rstrip("/"))
            key = await self._key(routing_key(method, path, request.query_params, body))
            return await self._forward(self._message(request, body), key, _retryable(method, path))
        except ApiError as e:
            return e.response()
        except Exception as e:  # noqa: BLE001 - in OpenAI's shape, like every other error
            return ApiError(500, f"internal error: {one_line(e)}", "server_error").response()

    async def _health(self):
        """`/health` of the whole: the model is loaded when a replica runs (a replica runs only with its model
        loaded); `replicas` says how many run of how many wanted (fewer while one is replaced)."""
        from ray import serve
        from starlette.responses import JSONResponse

        try:
            status = await asyncio.to_thread(serve.status)
            states = status.applications[APP_NAME].deployments[REPLICA_DEPLOYMENT].replica_states
            running = int(states.get("RUNNING", 0))
        except Exception as e:  # noqa: BLE001 - Serve's controller unreachable: say so
            return JSONResponse({"status": "error", "model_loaded": False, "error": one_line(e)}, status_code=503)
        return JSONResponse({"status": "ok", "model_loaded": running > 0,
                             "replicas": {"running": running, "target": self.count}})

    async def _key(self, about: tuple[str, str] | None) -> str | None:
        """The session id the replicas' router hashes: a video by its full id (a prefix resolves to it), a job or
        summary by the key it was made with."""
        if about is None:
            return None
        kind, value = about
        if kind == "video":
            try:
                value = (await asyncio.to_thread(self.library.get_store, value)).video_id
            except Exception:  # noqa: BLE001 - unknown or ambiguous: the replica answers 404 in its own words
                pass
            return f"video:{value}"
        if kind in ("job", "summary"):
            return self._owners.get(value, f"{kind}:{value}")
        return f"{kind}:{value}"

    def _remember(self, request_key: str | None, head: dict, body: bytes) -> None:
        """A new job or summary: which key reaches the replica that holds it."""
        try:
            record = json.loads(body)
            made, object_id = record.get("object"), record.get("id")
        except (ValueError, AttributeError):
            return
        if not isinstance(object_id, str) or made not in ("ingest_job", "summary"):
            return
        key = request_key or f"job:{object_id}"
        self._owners[object_id] = key
        while len(self._owners) > REMEMBERED:
            self._owners.popitem(last=False)
        if made == "ingest_job":
            replica = dict(head["headers"]).get(REPLICA_HEADER.encode(), b"").decode()
            self._job_keys[replica] = key

    @staticmethod
    def _message(request, body: bytes) -> dict:
        scope = request.scope
        return {"method": request.method, "path": scope["path"], "raw_path": scope.get("raw_path"),
                "query_string": scope.get("query_string", b""),
                "headers": [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])], "body": body,
                "client": tuple(scope["client"]) if scope.get("client") else None,
                "server": tuple(scope["server"]) if scope.get("server") else None,
                "scheme": scope.get("scheme", "http"), "http_version": scope.get("http_version", "1.1")}

    def _call(self, message: dict, key: str | None):
        handle = self.replicas.options(method_name="forward", stream=True)
        if key is not None:
            handle = handle.options(session_id=key)
        return handle.remote(message)

    async def _exchange(self, message: dict, key: str | None, retryable: bool, whole: bool | None = None):
        """(head, body, rest): the head, and either the whole body (JSON answers, or `whole`) with `rest` None, or
        b"" and the stream of the rest. A replica that fails before this point is retried once when allowed."""
        failures = _replica_failures()
        for attempt in range(2):
            stream = self._call(message, key)
            try:
                head = await stream.__anext__()
                if attempt:
                    head = {**head, "headers": list(head["headers"]) + [(RETRIED_HEADER.encode(), b"1")]}
                kind = dict(head["headers"]).get(b"content-type", b"").decode()
                if not (whole if whole is not None else kind.startswith("application/json")):
                    return head, b"", stream
                body = b"".join([piece async for piece in stream])
                return head, body, None
            except failures:
                stream.cancel()
                if attempt == 0 and retryable and self.count > 1:
                    continue  # the router has dropped the dead replica: its ring successor answers
                raise _unavailable() from None
            except StopAsyncIteration:
                raise _unavailable() from None
            except BaseException:
                stream.cancel()
                raise
        raise _unavailable()

    async def _forward(self, message: dict, key: str | None, retryable: bool):
        from starlette.responses import Response, StreamingResponse

        head, body, rest = await self._exchange(message, key, retryable)
        if rest is None:
            if message["method"] == "POST" and head["status"] == 202:
                self._remember(key, head, body)
            response = Response(body, status_code=head["status"])
            response.raw_headers = list(head["headers"])
            return response
        is_events = dict(head["headers"]).get(b"content-type", b"").startswith(b"text/event-stream")
        failures = _replica_failures()

        async def pieces():
            try:
                async for piece in rest:
                    yield piece
            except failures:  # the replica died mid-answer: an OpenAI-shaped error event ends an event stream;
                if not is_events:  # any other body is cut off (the client sees it short), not ended as if whole
                    raise
                error = _unavailable()
                yield ("data: " + json.dumps({"error": {"message": str(error), "type": error.kind,
                                                        "param": None, "code": error.code}}) + "\n\n").encode()
            finally:
                rest.cancel()

        response = StreamingResponse(pieces(), status_code=head["status"])
        response.raw_headers = list(head["headers"])
        return response

    async def _gathered(self, request, path: str):
        """`GET /v1/jobs` and `GET /v1/videos` from every replica that holds jobs (jobs live in replica memory),
        merged; stored videos are the same from every replica (one data root).

        The replicas are asked one after another, never at once: a handle call made while serving a request
        carries that request's `internal_request_id`, and Ray Serve's router keys the calls waiting for a replica
        by it. A second call of one request waiting beside the first is not recorded (taken for a retry of it):
        the replica chosen for either is handed to the first, and the second waits for a replica forever."""
        from starlette.responses import JSONResponse

        message = self._message(request, b"")
        answers: list = []
        for key in dict.fromkeys(self._job_keys.values()):
            try:
                answers.append(await self._exchange(message, key, True, whole=True))
            except Exception as e:  # noqa: BLE001 - that replica is left out; all failing is a 503 below
                answers.append(e)
        if all(isinstance(a, BaseException) for a in answers):
            raise _unavailable()
        rows: dict[str, dict] = {}
        first = None
        for answer in answers:
            if isinstance(answer, BaseException):
                continue
            head, body, _ = answer
            if head["status"] != 200:
                first = first or answer
                continue
            for row in json.loads(body).get("data", []):
                name = row.get("id") or row.get("job_id") or json.dumps(row, sort_keys=True)
                if name not in rows or (row.get("job_id") and not rows[name].get("job_id")):
                    rows[name] = row
        if not rows and first is not None:  # an error (or nothing): say what one replica said
            return JSONResponse(json.loads(first[1]), status_code=first[0]["status"])
        data = list(rows.values())
        if path == "/v1/jobs":
            data.sort(key=lambda j: j.get("created") or 0)
        return JSONResponse({"object": "list", "data": data})

    async def _upload(self, request):
        """`POST /v1/videos/upload?filename=NAME`: the body streamed into the shared uploads folder
        (`rest.receive_upload`: the size limit, nothing half-written kept), then queued on a replica."""
        from starlette.responses import JSONResponse

        path, filename = await receive_upload(request, self.library, self.config.max_upload_bytes)
        key = f"upload:{path.name}"
        try:
            answer = await self.replicas.options(method_name="add_upload", session_id=key).remote(str(path),
                                                                                                   filename)
        except _replica_failures():
            path.unlink(missing_ok=True)
            raise _unavailable() from None
        headers = {REPLICA_HEADER: answer["replica"], PID_HEADER: str(answer["pid"])}
        if answer["status"] == 202:
            self._owners[answer["body"]["id"]] = key
            self._job_keys[answer["replica"]] = key
        else:
            path.unlink(missing_ok=True)
        return JSONResponse(answer["body"], status_code=answer["status"], headers=headers)


# ---- starting it ------------------------------------------------------------------------------------------------
def build_app(root: str | Path, config: ServeConfig, options: RayOptions, model: str | None = None,
              dtype: str = "fp32", device: str = "cpu"):
    """The Ray Serve application: the ingress bound to N replicas (deployments made here, so that importing this
    module needs no Ray)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    if options.replica_gpus > 0 and device == "cpu":
        device = "cuda"  # a GPU replica runs on its GPU
    threads = max(1, math.floor(options.replica_cpus)) if options.replica_cpus >= 1 else 1
    replica_config = replace(config, keys=None, rate_per_minute=None, cors_origins=[], behind_ingress=True)
    replica = serve.deployment(
        VidminiReplica, name=REPLICA_DEPLOYMENT, num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
        max_ongoing_requests=config.max_pending + 64,  # the app answers 429 beyond max_pending questions itself
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER,
            # the ring successors: where a video goes when its replica is gone
            request_router_kwargs={"num_virtual_nodes": 100, "num_fallback_replicas": min(2, options.replicas - 1)}),
        graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5,
    ).bind(str(root), replica_config, model, dtype, device, threads)
    ingress = serve.deployment(
        serve.ingress()(VidminiIngress), name="VidminiIngress", num_replicas=1,
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=INGRESS_MAX_ONGOING,
        graceful_shutdown_timeout_s=5, graceful_shutdown_wait_loop_s=0.5,
    ).bind(replica, str(root), config, options.replicas)
    return ingress


def _connect(options: RayOptions) -> bool:
    """Connect to (or start) Ray; True when this call started a Ray of its own (stopped on exit)."""
    import ray

    if options.address == "local":
        cpus = max(os.cpu_count() or 1, math.ceil(options.replicas * options.replica_cpus))
        gpus = math.ceil(options.replicas * options.replica_gpus) if options.replica_gpus else None
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        return True
    try:
        ray.init(address=options.address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UsageError(f"cannot reach Ray at {options.address}: {one_line(e)}") from None
    return False


def serve_on_ray(root: str | Path, config: ServeConfig, options: RayOptions, model: str | None = None,
                 dtype: str = "fp32", device: str = "cpu", ready=None) -> None:
    """Run the application until SIGINT or SIGTERM, then take it down (and the Ray this started)."""
    try:
        from ray import serve
    except ImportError:
        raise UsageError("Ray Serve is not installed: pip install 'vidmini[ray]'") from None
    options.check()
    config.check()
    started = _connect(options)
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port})
        try:
            serve.run(build_app(root, config, options, model, dtype, device), name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # a replica that cannot start (its model does not load): say why, once
            raise UsageError(f"the Ray Serve application did not start: {_why_not(e)}") from None
        if ready is not None:
            ready()
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        _take_down(started)


def _why_not(error: BaseException) -> str:
    """Why the replicas did not start: the last line of the failure Serve recorded for them (their own error, e.g.
    the model's), else Serve's message."""
    from ray import serve

    try:
        message = serve.status().applications[APP_NAME].deployments[REPLICA_DEPLOYMENT].message
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        return lines[-1] if lines else one_line(error)
    except Exception:  # noqa: BLE001 - Serve's own message then
        return one_line(error)


def _take_down(started: bool) -> None:
    """Delete the application (all of Serve, on a Ray this command started), then stop that Ray. A signal sent to
    the whole process group (Ctrl-C in a terminal, `timeout`, a service manager) may have stopped Ray's own processes
    already: Serve's shutdown is then given a bounded time, and Ray is stopped anyway."""
    import ray
    from ray import serve

    def delete() -> None:
        try:
            if started:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        except Exception as e:  # noqa: BLE001 - going down anyway
            print(f"vidmini: warning: stopping the Ray Serve application: {one_line(e)}", file=sys.stderr)

    worker = threading.Thread(target=delete, name="vidmini-serve-down", daemon=True)
    worker.start()
    worker.join(timeout=SHUTDOWN_S)
    if worker.is_alive():
        print(f"vidmini: warning: Ray Serve did not stop within {SHUTDOWN_S}s", file=sys.stderr)
    if started:
        ray.shutdown()


__all__ = ["APP_NAME", "PID_HEADER", "REPLICA_HEADER", "RayOptions", "VidminiIngress", "VidminiReplica",
           "build_app", "routing_key", "serve_on_ray"]
