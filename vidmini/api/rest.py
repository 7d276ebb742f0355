"""The library over REST: add (a server path under a media root, a stream URL, or an upload streamed in the
request body), list, get, delete, follow an ingest (server-sent events), search moments, summaries, media with
range requests and thumbnails. Every route calls the service's `Library`; `vidmini/api/openapi.py` describes
them all at `/openapi.json`."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

from vidmini.api.errors import ApiError, not_found
from vidmini.common.errors import UsageError, one_line
from vidmini.service.library import LibraryError
from vidmini.service.options import LIVE_CHUNK_FRAMES, IngestOptions
from vidmini.service.summaries import MODES, SummarizeOptions

STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://", "srt://", "udp://")
EVENT_INTERVAL_S = 0.5


@dataclass
class SummaryJob:
    """A summary asked for over REST, run on its own thread (the model's questions are the service's)."""

    summary_id: str
    video_id: str
    mode: str
    status: str = "running"  # running | ready | failed
    result: dict | None = None
    error: str | None = None
    created: float = field(default_factory=time.time)
    options: SummarizeOptions | None = None  # window and events beside the mode (None: the mode's defaults)
    exact: bool = False  # also keep `exact_result`: every number unrounded, and the event thumbnails
    exact_result: dict | None = None

    def to_json(self, exact: bool = False) -> dict:
        out = {"id": self.summary_id, "object": "summary", "video_id": self.video_id, "mode": self.mode,
               "status": self.status, "created": int(self.created), "error": self.error, "summary": self.result}
        if exact and self.exact:
            out["exact"] = self.exact_result
        return out


def job_json(job) -> dict:
    return {"id": job.job_id, "object": "ingest_job", "status": job.status, "name": job.name,
            "source": job.source, "video_id": job.video_id, "frames_done": job.frames_done, "total": job.total,
            "fraction": job.fraction, "rate_fps": round(job.rate_fps, 2), "eta_s": job.eta_s, "error": job.error,
            "created": int(job.created), "finished": None if job.finished is None else int(job.finished)}


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        raise ApiError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


class LibraryRoutes:
    """The REST handlers over one API's library and settings. `api` is the `VidminiApi` they serve in (its
    library, config, `need_model` and `allowed_path`; not imported here: server.py imports this module)."""

    def __init__(self, api) -> None:
        self.api, self.library, self.config = api, api.library, api.config
        self._summaries: dict[str, SummaryJob] = {}
        self._lock = threading.Lock()

    # ---- adding -----------------------------------------------------------------------------------------------
    async def add(self, request: Request) -> Response:
        """POST /v1/videos {"source", "live"?, "fps"?}: queue a server file (under a media root) or a stream."""
        body = await json_body(request)
        source = body.get("source")
        if not isinstance(source, str) or not source.strip():
            raise ApiError(400, "source must be a server path under a media root or a stream URL", param="source")
        options = self._ingest_options(body)
        if not source.startswith(STREAM_SCHEMES):
            source = str(self.api.allowed_path(source))
        self.api.need_model()
        try:
            job = await run_in_threadpool(self.library.add, source, options)
        except (LibraryError, UsageError) as e:
            raise ApiError(400, one_line(e), param="source") from None
        return JSONResponse(job_json(job), status_code=202)

    def _ingest_options(self, body: dict) -> IngestOptions:
        try:
            source = str(body.get("source", ""))
            options = IngestOptions(fps=float(body.get("fps", IngestOptions.fps)), live=bool(body.get("live", False)),
                                    chunk_frames=LIVE_CHUNK_FRAMES if source.startswith(STREAM_SCHEMES)
                                    else IngestOptions.chunk_frames)
            return options.check()
        except (TypeError, ValueError) as e:
            raise ApiError(400, one_line(e), param="fps") from None

    async def upload(self, request: Request) -> Response:
        """POST /v1/videos/upload?filename=NAME, the file as the raw body: streamed to disk, then queued."""
        path, filename = await receive_upload(request, self.library, self.config.max_upload_bytes,
                                              before_body=self.api.need_model)
        try:
            job = self.library.add(str(path), IngestOptions(), name=filename)
        except LibraryError as e:
            raise ApiError(400, one_line(e)) from None
        return JSONResponse(job_json(job), status_code=202)

    # ---- reading ----------------------------------------------------------------------------------------------
    async def remove(self, request: Request) -> Response:
        video_id = self._store_id(request)  # the whole id: a prefix must not reach other videos' jobs
        try:
            await run_in_threadpool(self.library.remove, video_id)
        except LibraryError as e:
            raise not_found(one_line(e)) from None
        return JSONResponse({"id": video_id, "object": "video", "deleted": True})

    async def jobs(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [job_json(j) for j in self.library.jobs()]})

    def _job(self, request: Request):
        try:
            return self.library.job(request.path_params["job_id"])
        except KeyError:
            raise not_found(f"no ingest job {request.path_params['job_id']}", "job_not_found") from None

    async def job(self, request: Request) -> Response:
        return JSONResponse(job_json(self._job(request)))

    async def cancel_job(self, request: Request) -> Response:
        job = self._job(request)
        job.cancel.set()
        return JSONResponse(job_json(job))

    async def job_events(self, request: Request) -> Response:
        """GET /v1/jobs/{id}/events: the job as a server-sent event whenever it changes, until it ends."""
        job = self._job(request)

        async def events():
            last = None
            while True:
                now = job_json(job)
                if now != last:
                    yield f"event: progress\ndata: {json.dumps(now)}\n\n"
                    last = now
                if not job.active:
                    yield f"event: end\ndata: {json.dumps(now)}\n\n"
                    return
                await asyncio.sleep(EVENT_INTERVAL_S)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def search(self, request: Request) -> Response:
        """GET /v1/search?q=TEXT[&video_id=ID][&k=N]: moments matching a description, best first."""
        query = request.query_params.get("q", "")
        video_id = request.query_params.get("video_id") or None
        try:
            k = int(request.query_params.get("k", "10"))
        except ValueError:
            raise ApiError(400, "k must be an integer", param="k") from None
        self.api.need_model()
        try:
            result = await run_in_threadpool(self.library.search, query, video_id, k, False)
        except LibraryError as e:
            message = one_line(e)
            if video_id is not None and "unknown" in message.lower():
                raise not_found(message) from None
            raise ApiError(400, message) from None
        return JSONResponse({"object": "list", "query": query, "video_id": result.video_id,
                             "data": [m.to_json() for m in result.moments]})

    def _store_id(self, request: Request) -> str:
        try:
            return self.library.get_store(request.path_params["video_id"]).video_id
        except LibraryError as e:
            raise not_found(one_line(e)) from None

    async def media(self, request: Request) -> Response:
        """GET /v1/videos/{id}/media: the source file, with HTTP range requests (players seek with them)."""
        path = self.library.media_path(self._store_id(request))
        if path is None:
            raise not_found("this video's source is not a file on the server (a stream, or moved)", "no_media")
        return FileResponse(path, filename=path.name)

    async def thumbnail(self, request: Request) -> Response:
        video_id = self._store_id(request)
        try:
            frame = int(request.path_params["frame"])
        except ValueError:
            raise ApiError(400, "frame must be an integer", param="frame") from None
        data = self.library.thumbnail_at(video_id, frame)
        if data is None:
            raise not_found(f"video {video_id} has no frame {frame}", "frame_not_found")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=86400"})

    # ---- summaries --------------------------------------------------------------------------------------------
    async def start_summary(self, request: Request) -> Response:
        """POST /v1/videos/{id}/summaries {"mode", "window"?, "events"?, "exact"?}: start a summary; read it at
        /v1/summaries/{summary id}. `window`: seconds per window (default: the mode's); `events`: what
        surveillance looks for (needed there, refused elsewhere); `exact`: the record, once ready, also carries
        `exact` = {"summary": every number unrounded, "thumbnails": event thumbnail name → base64 JPEG} (what
        `vidmini summarize --server` renders its files from)."""
        video_id = self._store_id(request)
        body = await json_body(request)
        options, exact = summary_options(body), body.get("exact", False)
        if not isinstance(exact, bool):
            raise ApiError(400, "exact must be true or false", param="exact")
        self.api.need_model()
        job = SummaryJob(f"sum-{uuid.uuid4().hex[:12]}", video_id, options.mode, options=options, exact=exact)
        with self._lock:
            self._summaries[job.summary_id] = job
        threading.Thread(target=self._summarize, args=(job,), name="vidmini-summary", daemon=True).start()
        return JSONResponse(job.to_json(), status_code=202)

    def _summarize(self, job: SummaryJob) -> None:
        try:
            summary = self.library.summarize(job.video_id, job.options or SummarizeOptions(mode=job.mode))
            if job.exact:
                job.exact_result = {
                    "summary": {k: v for k, v in asdict(summary).items() if k != "thumbnails"},
                    "thumbnails": {n: base64.b64encode(data).decode() for n, data in summary.thumbnails.items()}}
            job.result, job.status = summary.to_json(), "ready"
        except Exception as e:  # noqa: BLE001 - reported on the summary's record
            job.error, job.status = one_line(e), "failed"

    async def summary(self, request: Request) -> Response:
        with self._lock:
            job = self._summaries.get(request.path_params["summary_id"])
        if job is None:
            raise not_found(f"no summary {request.path_params['summary_id']}", "summary_not_found")
        return JSONResponse(job.to_json(exact=True))

    async def summaries(self, request: Request) -> Response:
        video_id = self._store_id(request)
        with self._lock:
            jobs = [j.to_json() for j in self._summaries.values() if j.video_id == video_id]
        return JSONResponse({"object": "list", "data": jobs})


def summary_options(body: dict) -> SummarizeOptions:
    """A summary request's mode, window and events, checked (a 400 naming the field otherwise)."""
    mode = body.get("mode", "general")
    if mode not in MODES:
        raise ApiError(400, f"mode must be one of {', '.join(MODES)}", param="mode")
    window = body.get("window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int | float)
                               or not math.isfinite(window) or window <= 0):
        raise ApiError(400, "window must be a number of seconds > 0 (or null: the mode's default)", param="window")
    events = body.get("events", [])
    if not isinstance(events, list) or not all(isinstance(e, str) and e.strip() for e in events):
        raise ApiError(400, "events must be a list of non-empty event descriptions", param="events")
    if mode == "surveillance" and not events:
        raise ApiError(400, 'mode surveillance needs events, e.g. ["a person enters"]', param="events")
    if events and mode != "surveillance":
        raise ApiError(400, "events apply to mode surveillance", param="events")
    return SummarizeOptions(mode, None if window is None else float(window), tuple(events))


def allowed_under(roots: list[Path], path: str) -> Path:
    """`path` resolved, when it lies under one of `roots` (links followed first); else 403."""
    real = Path(path.removeprefix("file://")).expanduser().resolve()
    if not any(real.is_relative_to(root.resolve()) for root in roots):
        raise ApiError(403, f"{path} is not under a media root of this server", "permission_error",
                       code="path_not_allowed")
    if not real.is_file():
        raise not_found(f"no such file on the server: {path}")
    return real


async def receive_upload(request: Request, library, limit: int, before_body=None) -> tuple[Path, str]:
    """`POST …/upload?filename=NAME`'s raw body streamed into the library's uploads folder: 413 from the headers
    alone when the declared length passes `limit`, or as soon as the bytes do; nothing half-written is kept.
    `before_body()` runs once the headers are accepted (the model check). Returns (the file, its given name)."""
    filename = request.query_params.get("filename", "").strip()
    if not filename:
        raise ApiError(400, "give the file's name: /v1/videos/upload?filename=NAME", param="filename")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the upload is {int(declared)} bytes; this server takes at most {limit}",
                       code="upload_too_large")
    if before_body is not None:
        before_body()
    try:
        dest, handle = library.open_upload(filename)
    except LibraryError as e:
        raise ApiError(400, one_line(e), param="filename") from None
    size = 0
    try:
        async for piece in request.stream():
            size += len(piece)
            if size > limit:
                raise ApiError(413, f"the upload passed this server's limit of {limit} bytes",
                               code="upload_too_large")
            await run_in_threadpool(handle.write, piece)
        if size == 0:
            raise ApiError(400, "the upload is empty")
    except (ApiError, ClientDisconnect, OSError):
        library.abort_upload(dest, handle)  # nothing half-written stays behind
        raise
    return library.finish_upload(dest, handle), filename
