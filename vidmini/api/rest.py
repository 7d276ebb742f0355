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
from vidmini.service.options import ASR_BACKENDS, DEFAULT_ASR, LIVE_CHUNK_FRAMES, IngestOptions
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
        """POST /v1/videos {"source", "live"?, "fps"?, "asr"?, "asr_model"?, "language"?, "no_audio"?,
        "asr_workers"?}: queue a
        server file (under a media root) or a stream; a file's audio is transcribed beside its frames."""
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
        speech = self._speech_options(body)
        try:
            source = str(body.get("source", ""))
            options = IngestOptions(fps=float(body.get("fps", IngestOptions.fps)), live=bool(body.get("live", False)),
                                    chunk_frames=LIVE_CHUNK_FRAMES if source.startswith(STREAM_SCHEMES)
                                    else IngestOptions.chunk_frames, **speech)
        except (TypeError, ValueError) as e:
            raise ApiError(400, one_line(e), param="fps") from None
        try:
            return options.check()
        except ValueError as e:
            message = one_line(e)
            param = next((name for word, name in (("language", "language"), ("english", "language"),
                                                  ("asr", "asr"), ("fps", "fps")) if word in message.lower()), None)
            raise ApiError(400, message, param=param) from None

    def _speech_options(self, body: dict) -> dict:
        """`asr`, `asr_model`, `language` and `asr_workers` from a body's "asr", "asr_model", "language",
        "no_audio" and "asr_workers" (at most the server's usable cores: a client does not choose how many
        processes the server starts beyond that)."""
        from vidmini.common.cores import usable_cores

        asr, model, language = body.get("asr"), body.get("asr_model"), body.get("language")
        workers = body.get("asr_workers")
        cores = usable_cores()
        if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                    or not 1 <= workers <= cores):
            raise ApiError(400, f"asr_workers must be an integer from 1 to {cores} (the server's cores)",
                           param="asr_workers")
        no_audio = body.get("no_audio", False)
        if not isinstance(no_audio, bool):
            raise ApiError(400, "no_audio must be true or false", param="no_audio")
        if asr is not None and asr not in ASR_BACKENDS:
            raise ApiError(400, f"asr must be one of {', '.join(ASR_BACKENDS)}", param="asr")
        if no_audio and asr not in (None, "none"):
            raise ApiError(400, f"no_audio and asr {asr} contradict each other", param="no_audio")
        if language is not None and not isinstance(language, str):
            raise ApiError(400, "language must be a language code such as en", param="language")
        if model is not None:
            if not isinstance(model, str) or not model.strip():
                raise ApiError(400, "asr_model must be a model folder on the server or a Hugging Face id",
                               param="asr_model")
            if asr not in (None, "whisper"):
                raise ApiError(400, "asr_model is a Whisper model: use it with asr whisper", param="asr_model")
            asr = "whisper"
            if model.startswith(("/", "~", ".")):  # a server folder: only under a media root, like the videos
                model = str(self.api.allowed_path(model))
        elif asr == "whisper":  # refused now: queued, its frames would be stored without it
            raise ApiError(400, "asr whisper needs asr_model: a model folder under a media root or a Hugging Face "
                           "id already in the server's cache (nothing is downloaded)", param="asr_model")
        return {"asr": "none" if no_audio else (asr or DEFAULT_ASR), "asr_model": model, "language": language,
                "asr_workers": workers}

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


# ---- live watches -----------------------------------------------------------------------------------------------
WATCH_SCHEMES = (*STREAM_SCHEMES, "rtsps://", "rtp://", "tcp://")  # what a watch's recorder connects to
WATCH_FIELDS = ("source", "name", "fps", "retain", "retain_gb", "rules", "webhooks", "mqtt", "segment_s", "paused")
RULE_FIELDS = ("event", "on_frames", "off_frames", "cooldown_s", "threshold", "update_every_s", "name")
RESERVED_WATCH_NAMES = ("events",)  # GET /v1/watches/events is the alerts' stream
FEED_POLL_S = 0.25  # how often an alerts stream looks for new alerts
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet alerts stream


def redact_url(url: str) -> str:
    """A URL without the password of its user part (rtsp://user:***@camera/...): watches are listed to anyone
    with a key, a camera's password is not theirs."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def alert_token(key: str) -> str:
    """An alert's key as one URL path segment (a '/' in a rule's name is written %2F first, so it survives the
    server's decoding of the path); `alert_matches` undoes it."""
    from urllib.parse import quote

    return quote(key.replace("/", "%2F"), safe="")


def alert_matches(alert, token: str) -> bool:
    return alert.key == token or alert.key.replace("/", "%2F") == token


def alert_json(alert) -> dict:
    """An alert as the API shows it: no thumbnail bytes and no server paths, but the routes that serve them."""
    out = {k: v for k, v in alert.to_dict(thumbnail=False).items() if k not in ("thumbnail_path", "clip_path")}
    base = f"/v1/watches/{alert.watch}/alerts/{alert_token(alert.key)}"
    out["thumbnail_url"] = f"{base}/thumbnail" if alert.thumbnail else None
    out["clip_url"] = f"{base}/clip" if alert.clip_path else None
    return {"object": "watch_alert", **out}


def _seconds(value: Any, param: str, zero: bool = False) -> float:
    """A duration field: seconds as a number, or text such as 24h, 90m, 1h30m (0 allowed where `zero`)."""
    from vidmini.service.watches import WatchError, parse_duration

    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ApiError(400, f"{param} must be a number of seconds or a duration such as 24h or 90m", param=param)
    if zero and isinstance(value, (int, float)) and value == 0:
        return 0.0
    try:
        return parse_duration(value)
    except WatchError as e:
        raise ApiError(400, f"{param}: {one_line(e)}", param=param) from None


def _number(value: Any, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(400, f"{param} must be a number", param=param)
    return float(value)


def _list_of(body: dict, param: str) -> list:
    value = body.get(param, [])
    if not isinstance(value, list):
        raise ApiError(400, f"{param} must be a list", param=param)
    return value


def _rule(item: Any, i: int) -> dict:
    from vidmini.service.watches import RuleSpec

    param = f"rules[{i}]"
    if isinstance(item, str):
        item = {"event": item}
    if not isinstance(item, dict):
        raise ApiError(400, f'{param} must be an event ("a person enters") or {{event, on_frames, off_frames, '
                       f"cooldown_s}}", param="rules")
    unknown = sorted(set(item) - set(RULE_FIELDS))
    if unknown:
        raise ApiError(400, f"{param}: unknown field(s) {', '.join(unknown)} (known: {', '.join(RULE_FIELDS)})",
                       param="rules")
    fields = dict(item)
    if "cooldown_s" in fields:
        fields["cooldown_s"] = _seconds(fields["cooldown_s"], f"{param}.cooldown_s", zero=True)
    try:
        return RuleSpec(**fields).to_dict()
    except (TypeError, ValueError) as e:
        raise ApiError(400, f"{param}: {one_line(e)}", param="rules") from None


def _sinks(body: dict) -> list[dict]:
    sinks: list[dict] = []
    for i, hook in enumerate(_list_of(body, "webhooks")):
        param = f"webhooks[{i}]"
        if not isinstance(hook, dict) or set(hook) - {"url", "secret"} or not isinstance(hook.get("url"), str):
            raise ApiError(400, f"{param} must be {{url, secret}}", param="webhooks")
        secret = hook.get("secret")
        if not isinstance(secret, str) or not secret:
            raise ApiError(400, f"{param}: a webhook needs a secret to sign its alerts with (the receiver checks "
                           "the X-Vidmini-Signature with it)", param="webhooks")
        sinks.append({"type": "webhook", "url": hook["url"], "secret": secret})
    for i, broker in enumerate(_list_of(body, "mqtt")):
        param = f"mqtt[{i}]"
        if not isinstance(broker, dict) or set(broker) - {"host", "port", "topic_prefix"} \
                or not isinstance(broker.get("host"), str) or not broker["host"]:
            raise ApiError(400, f"{param} must be {{host, port?, topic_prefix?}}", param="mqtt")
        port = broker.get("port", 1883)
        if isinstance(port, bool) or not isinstance(port, int):
            raise ApiError(400, f"{param}: port must be an integer", param="mqtt")
        sinks.append({"type": "mqtt", **broker, "port": port})
    return sinks


def watch_spec(body: dict, allowed_path) -> Any:
    """POST /v1/watches' body → a checked `WatchSpec` (400 naming the field otherwise; 403 for a server path
    outside the media roots). `allowed_path(path)` resolves a server path under a media root."""
    from vidmini.service.watches import DEFAULT_RETAIN_S, WatchError, WatchSpec

    unknown = sorted(set(body) - set(WATCH_FIELDS))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(unknown)} (known: {', '.join(WATCH_FIELDS)})",
                       param=unknown[0])
    name = body.get("name")
    if not isinstance(name, str):
        raise ApiError(400, "name must be a string: 1-64 letters, digits, '-' or '_'", param="name")
    if name in RESERVED_WATCH_NAMES:
        raise ApiError(400, f"the name {name!r} is taken by the API (/v1/watches/{name})", param="name")
    source = body.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ApiError(400, "source must be a stream URL or a server path under a media root", param="source")
    source = source.strip()
    if not source.lower().startswith(WATCH_SCHEMES):
        if "://" in source and not source.startswith("file://"):
            raise ApiError(400, "source must be a stream URL (rtsp, rtmp, http(s), srt, udp, tcp, rtp) or a server "
                           "path under a media root", param="source")
        source = str(allowed_path(source))
    retain_gb = body.get("retain_gb")
    retain_bytes = None
    if retain_gb is not None:
        retain_gb = _number(retain_gb, "retain_gb")
        if not retain_gb > 0:
            raise ApiError(400, "retain_gb must be more than 0", param="retain_gb")
        retain_bytes = int(retain_gb * 1e9)
    retain = body.get("retain")
    retain_s = _seconds(retain, "retain") if retain is not None else (None if retain_bytes else DEFAULT_RETAIN_S)
    paused = body.get("paused", False)
    if not isinstance(paused, bool):
        raise ApiError(400, "paused must be true or false", param="paused")
    rules = tuple(_rule(r, i) for i, r in enumerate(_list_of(body, "rules")))
    sinks = tuple(_sinks(body))
    fps = _number(body.get("fps", 1.0), "fps")
    segment_s = _seconds(body.get("segment_s", 60.0), "segment_s")
    try:
        return WatchSpec(name, source, fps=fps, retain_s=retain_s, retain_bytes=retain_bytes, rules=rules,
                         sinks=sinks, segment_s=segment_s, paused=paused)
    except WatchError as e:
        message = one_line(e)
        words = {"name": "name", "source": "source", "fps": "fps", "retention": "retain", "segment": "segment_s",
                 "rule": "rules", "webhook": "webhooks", "mqtt": "mqtt", "sink": "webhooks"}
        param = next((p for w, p in words.items() if w in message.lower()), None)
        raise ApiError(400, message, param=param) from None


def _since(request: Request):
    """`?since=<ISO 8601 time with a zone>` (a '+' of the zone read as a space from an unencoded URL mended)."""
    from datetime import datetime

    text = request.query_params.get("since")
    if text is None:
        return None
    for candidate in (text, text.replace(" ", "+")):
        try:
            t = datetime.fromisoformat(candidate)
        except ValueError:
            continue
        if t.tzinfo is not None and t.utcoffset() is not None:
            return t
    raise ApiError(400, f"since must be an ISO 8601 time with a time zone, e.g. 2026-01-02T03:04:05Z, not {text!r}",
                   param="since")


class WatchRoutes:
    """The data home's live watches over REST: add, list, get, pause, resume, delete (each change applied to the
    running watches at once: the manager reconciles), their alerts from the outbox, a server-sent stream of new
    alerts, and an alert's thumbnail and clip. `api.watches` is the running `WatchManager` (None while it starts,
    and on a server that runs no watches: the folders are still read and changed, the change runs elsewhere)."""

    def __init__(self, api) -> None:
        from vidmini.service.watches import WatchFolders

        self.api, self.library = api, api.library
        self.folders = WatchFolders(self.library.root)
        self._lock = threading.Lock()  # a name checked and taken in one step

    # ---- helpers ----------------------------------------------------------------------------------------------
    @property
    def manager(self):
        return self.api.watches

    def _name(self, request: Request) -> str:
        """The path's watch, which must exist (404 otherwise)."""
        name = request.path_params["name"]
        try:
            if name in self.folders.names():
                return name
        except OSError:
            pass
        raise not_found(f"no watch named {name!r}", "watch_not_found")

    def _rows(self, name: str | None = None) -> list[dict]:
        """Every watch (or the one named): its spec without secrets, and its status."""
        from vidmini.service.watches import WatchError

        manager = self.manager
        if manager is not None:
            rows = manager.statuses()
        else:
            rows = []
            for spec in self.folders.all():
                rows.append({**spec.to_json(), "status": {"name": spec.name, "state": "paused" if spec.paused
                                                          else "stopped", "error": None}})
        out = []
        for row in rows:
            if name is not None and row["name"] != name:
                continue
            sinks = [{k: (redact_url(v) if k == "url" else v) for k, v in s.items() if k != "secret"}
                     for s in row.get("sinks", [])]
            status = dict(row.get("status") or {})
            if "frames" not in status:  # not running: where it got to, as its state file says
                try:
                    saved = self.folders.read_state(row["name"])
                except (OSError, ValueError, WatchError):
                    saved = {}
                status.update({k: saved.get(k, d) for k, d in (("frames", 0), ("alerts", 0), ("last_frame", None))})
            out.append({"object": "watch", **row, "source": redact_url(row["source"]), "sinks": sinks,
                        "status": status})
        return out

    def _row(self, name: str) -> dict:
        rows = self._rows(name)
        if not rows:
            raise not_found(f"no watch named {name!r}", "watch_not_found")
        return rows[0]

    def _reconcile(self) -> None:
        manager = self.manager
        if manager is not None:
            manager.reconcile()

    def _alerts(self, name: str) -> list:
        from vidmini.service.watches import WatchError, watch_alerts

        try:
            return watch_alerts(self.folders, name)
        except WatchError as e:
            raise not_found(one_line(e), "watch_not_found") from None

    def _alert(self, request: Request):
        """The path's alert: looked for among the recent ones in memory, then in the watch's outbox."""
        name, token = self._name(request), request.path_params["key"]
        manager = self.manager
        if manager is not None:
            for _, alert in reversed(manager.feed.since(0, name)):
                if alert_matches(alert, token):
                    return alert
        for alert in self._alerts(name):
            if alert_matches(alert, token):
                return alert
        raise not_found(f"watch {name} has no alert {token!r}", "alert_not_found")

    # ---- the watches ------------------------------------------------------------------------------------------
    async def index(self, request: Request) -> Response:
        """GET /v1/watches: every watch, its spec without secrets and its status."""
        return JSONResponse({"object": "list", "data": await run_in_threadpool(self._rows)})

    async def get(self, request: Request) -> Response:
        name = self._name(request)
        return JSONResponse(await run_in_threadpool(self._row, name))

    async def add(self, request: Request) -> Response:
        """POST /v1/watches {source, name, fps?, retain?, retain_gb?, rules?, webhooks?, mqtt?, segment_s?,
        paused?}: 201 with the watch, started at once unless paused; 409 when the name is taken."""
        from vidmini.service.watches import WatchError

        spec = watch_spec(await json_body(request), self.api.allowed_path)

        def add() -> dict:
            with self._lock:
                if spec.name in self.folders.names():
                    raise ApiError(409, f"a watch named {spec.name!r} exists already (remove it first, or pick "
                                   "another name)", param="name", code="watch_exists")
                try:
                    self.folders.add(spec)
                except WatchError as e:  # made by another process (`vidmini watch add`) meanwhile
                    raise ApiError(409, one_line(e), param="name", code="watch_exists") from None
            self._reconcile()
            return self._row(spec.name)

        return JSONResponse(await run_in_threadpool(add), status_code=201)

    async def remove(self, request: Request) -> Response:
        """DELETE /v1/watches/{name}: stopped (its segment finished cleanly), then removed with its recording."""
        from vidmini.service.watches import WatchError

        name = self._name(request)

        def remove() -> None:
            manager = self.manager
            try:
                if manager is not None and manager.runner(name) is not None:
                    self.folders.set_paused(name, True)  # stopped before its folder goes
                    manager.reconcile()
                self.folders.remove(name)
            except WatchError as e:
                raise not_found(one_line(e), "watch_not_found") from None
            if manager is not None:
                manager.errors.pop(name, None)  # a new watch of this name starts afresh
                manager.reconcile()

        await run_in_threadpool(remove)
        return JSONResponse({"id": name, "name": name, "object": "watch", "deleted": True})

    async def pause(self, request: Request) -> Response:
        return await self._set_paused(request, True)

    async def resume(self, request: Request) -> Response:
        return await self._set_paused(request, False)

    async def _set_paused(self, request: Request, paused: bool) -> Response:
        from vidmini.service.watches import WatchError

        name = self._name(request)

        def change() -> dict:
            try:
                self.folders.set_paused(name, paused)
            except WatchError as e:  # removed meanwhile
                raise not_found(one_line(e), "watch_not_found") from None
            manager = self.manager
            if manager is not None and not paused:
                manager.errors.pop(name, None)  # a failed watch resumed: tried again
            self._reconcile()
            return self._row(name)

        return JSONResponse(await run_in_threadpool(change))

    # ---- alerts -----------------------------------------------------------------------------------------------
    async def alerts(self, request: Request) -> Response:
        """GET /v1/watches/{name}/alerts[?since=ISO time]: the watch's alerts, oldest first; with `since`, those
        of events that started or ended at or after it."""
        from datetime import datetime

        name, since = self._name(request), _since(request)
        alerts = await run_in_threadpool(self._alerts, name)
        if since is not None:
            alerts = [a for a in alerts if datetime.fromisoformat(a.start) >= since
                      or (a.end is not None and datetime.fromisoformat(a.end) >= since)]
        return JSONResponse({"object": "list", "watch": name, "data": [alert_json(a) for a in alerts]})

    async def ask(self, request: Request) -> Response:
        """POST /v1/watches/{name}/ask {"question", "since"?, "until"?, "max_tokens"?}: a question over the watch's
        recording between two wall-clock times (ISO 8601 with a zone, or a duration back from now such as "10m";
        either open), answered as one video; the span and the frames' times come back in wall-clock time."""
        from vidmini.service.options import AskOptions
        from vidmini.service.watches import WatchError, ask_watch

        name, body = self._name(request), await json_body(request)
        unknown = set(body) - {"question", "since", "until", "max_tokens"}
        if unknown:
            raise ApiError(400, f"unknown field {sorted(unknown)[0]!r} (question, since, until, max_tokens)",
                           param=sorted(unknown)[0])
        question = body.get("question")
        if not isinstance(question, str) or not question.strip():
            raise ApiError(400, "question must be a non-empty string", param="question")
        max_tokens = body.get("max_tokens", 64)
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= 4096:
            raise ApiError(400, "max_tokens must be an integer from 1 to 4096", param="max_tokens")
        for field_name in ("since", "until"):
            if body.get(field_name) is not None and not isinstance(body[field_name], str):
                raise ApiError(400, f"{field_name} must be a string: an ISO 8601 time or a duration such as 10m",
                               param=field_name)
        self.api.need_model()

        def answer() -> dict:
            asking = ask_watch(self.library, name, question, since=body.get("since"), until=body.get("until"),
                               options=AskOptions(max_new_tokens=max_tokens), folders=self.folders)
            return asking.result().to_json()

        try:
            got = await run_in_threadpool(answer)
        except WatchError as e:
            raise ApiError(400, " ".join(str(e).split())) from None
        return JSONResponse({"object": "watch.answer", **got})

    async def thumbnail(self, request: Request) -> Response:
        """GET /v1/watches/{name}/alerts/{key}/thumbnail: the event's first frame (a `new` alert's)."""
        alert = await run_in_threadpool(self._alert, request)
        if not alert.thumbnail:
            raise not_found(f"alert {alert.key!r} has no thumbnail (a `new` alert has its event's first frame)",
                            "no_thumbnail")
        media = "image/png" if alert.thumbnail.startswith(b"\x89PNG") else "image/jpeg"
        return Response(alert.thumbnail, media_type=media, headers={"Cache-Control": "max-age=86400"})

    async def clip(self, request: Request) -> Response:
        """GET /v1/watches/{name}/alerts/{key}/clip: the event's clip (an `end` alert's), with range requests."""
        alert = await run_in_threadpool(self._alert, request)
        folder = self.folders.folder(alert.watch).resolve()
        path = Path(alert.clip_path).resolve() if alert.clip_path else None
        if path is None or not path.is_relative_to(folder) or not path.is_file():
            raise not_found(f"alert {alert.key!r} has no clip (an `end` alert has its event's clip, while the "
                            "recording it was cut from is kept)", "no_clip")
        return FileResponse(path, media_type="video/mp4", filename=path.name)

    async def events(self, request: Request) -> Response:
        """GET /v1/watches/events[?watch=NAME]: every new alert (of one watch) as a server-sent event: `id` the
        feed's sequence number (a client that reconnects with Last-Event-ID gets what it missed, of the latest
        1000), `data` the alert's JSON. Ends when the server stops."""
        watch = request.query_params.get("watch") or None
        if watch is not None and watch not in await run_in_threadpool(self.folders.names):
            raise not_found(f"no watch named {watch!r}", "watch_not_found")
        if not self.api.config.watches:
            raise ApiError(409, "this server runs no watches (started with --no-watches, or on Ray Serve): "
                           "`vidmini watch run` runs them and prints their alerts", code="watches_not_running")
        manager = self.manager
        if manager is None:
            raise ApiError(503, "the watches are starting; retry shortly", "server_error", code="watches_starting")
        feed, stopping = manager.feed, self.api.stopping
        last = request.headers.get("last-event-id", "")
        seq = feed.wait(0, 0)  # the latest alert's number: from now on
        if last.isdigit():  # where the client left off; a number from before a restart of the server: all kept
            seq = int(last) if int(last) <= seq else 0

        async def stream():
            nonlocal seq
            yield ": vidmini watch alerts\n\n"
            quiet_since = time.monotonic()
            while not stopping.is_set():
                for number, alert in feed.since(seq, watch):
                    seq = number
                    yield f"id: {number}\ndata: {json.dumps(alert_json(alert))}\n\n"
                    quiet_since = time.monotonic()
                if time.monotonic() - quiet_since > KEEPALIVE_S:
                    yield ": keepalive\n\n"
                    quiet_since = time.monotonic()
                await asyncio.sleep(FEED_POLL_S)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
