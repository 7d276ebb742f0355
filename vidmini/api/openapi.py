"""The HTTP face described for other programs: an OpenAPI 3.1 document at `/openapi.json` and a plain page of it
at `/docs` (no scripts from elsewhere: it works on a machine without internet). A test checks that every route
the app serves is described here and nothing else is."""

from __future__ import annotations

import html
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

ERROR = {"$ref": "#/components/schemas/Error"}


def _ok(description: str, schema: dict | None = None, media: str = "application/json") -> dict:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    return out


def _errors(*statuses: int) -> dict:
    why = {400: "bad input", 401: "missing or wrong API key", 403: "a path outside the media roots",
           404: "no such video, job, summary, watch or alert", 409: "a watch of that name exists, or (the alerts' "
           "stream) this server runs no watches", 413: "upload too large", 429: "rate limit or queue full",
           500: "the model failed to load", 503: "the model (or the watches) still starting"}
    return {str(s): _ok(why[s], ERROR) for s in statuses}


def _path_param(name: str, description: str, kind: str = "string") -> dict:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": kind}}


def _query(name: str, description: str, kind: str = "string", required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": {"type": kind}}


def _json_body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


VIDEO_ID = _path_param("video_id", "a stored video's id (or a unique prefix)")
JOB_ID = _path_param("job_id", "an ingest job's id")
WATCH_NAME = _path_param("name", "a watch's name")
ALERT_KEY = _path_param("key", "an alert's key, URL-encoded (a '/' in it written %2F first); the alert's "
                               "thumbnail_url and clip_url name it so")
WATCH = {"$ref": "#/components/schemas/Watch"}
AUTH = (401, 429)

PATHS: dict[str, dict] = {
    "/health": {"get": {"summary": "Liveness, and whether the model is loaded", "security": [],
                        "responses": {"200": _ok("up"), "500": _ok("the model failed to load", ERROR)}}},
    "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": _ok("OpenAPI")}}},
    "/docs": {"get": {"summary": "This document as a page", "security": [],
                      "responses": {"200": _ok("HTML", media="text/html")}}},
    "/v1/models": {"get": {"summary": "The loaded model (OpenAI's list shape)",
                           "responses": {"200": _ok("models"), **_errors(*AUTH)}}},
    "/v1/chat/completions": {"post": {
        "summary": "Ask about a video (OpenAI chat completions; stream: true gives server-sent events)",
        "description": "The last user message holds the question (text parts) and one video_url part: "
                       "vidmini://<video id> or a server path under a media root. vidmini's own start, end "
                       "(seconds or HH:MM:SS), policy (all, uniform:K, retrieved:K, auto), speech and speech_tokens "
                       "ride in the body; the answer's range, frames, timestamps, the heard speech its prompt "
                       "carried (`speech`) and, for a question about the speech, the transcript lines that "
                       "answer it (`heard`) come back in the `vidmini` field.",
        "requestBody": _json_body({"$ref": "#/components/schemas/ChatRequest"}),
        "responses": {"200": _ok("a chat.completion, or chat.completion.chunk events"),
                      **_errors(400, *AUTH, 403, 404, 500, 503)}}},
    "/v1/videos": {
        "get": {"summary": "The library: stored videos and running ingests",
                "responses": {"200": _ok("list of videos"), **_errors(*AUTH)}},
        "post": {"summary": "Add a server file (under a media root) or a stream URL; ingests in the background",
                 "requestBody": _json_body({"type": "object", "required": ["source"], "properties": {
                     "source": {"type": "string", "description": "server path under a media root, or rtsp/http "
                                                                 "stream URL"},
                     "live": {"type": "boolean", "default": False}, "fps": {"type": "number", "default": 1.0},
                     "asr": {"enum": ["pocketsphinx", "whisper", "none"], "default": "pocketsphinx",
                             "description": "the recognizer that transcribes a file's audio beside its frames"},
                     "asr_model": {"type": "string", "description": "whisper (required with it): a model folder "
                                                                    "under a media root, or a Hugging Face id in the "
                                                                    "server's cache"},
                     "language": {"type": "string", "description": "the spoken language, e.g. en"},
                     "no_audio": {"type": "boolean", "default": False, "description": "no transcript"},
                     "asr_workers": {"type": "integer", "minimum": 1, "description": "worker processes that "
                                     "recognize audio windows at once, at most the server's cores (default: one "
                                     "per core for pocketsphinx, 1 for whisper)"}}}),
                 "responses": {"202": _ok("the ingest job", {"$ref": "#/components/schemas/Job"}),
                               **_errors(400, *AUTH, 403, 404, 503)}}},
    "/v1/videos/upload": {"post": {
        "summary": "Upload a video file as the raw request body (streamed to disk), then ingest it",
        "parameters": [_query("filename", "the file's name", required=True)],
        "requestBody": {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}},
        "responses": {"202": _ok("the ingest job", {"$ref": "#/components/schemas/Job"}),
                      **_errors(400, *AUTH, 413, 503)}}},
    "/v1/videos/{video_id}": {
        "get": {"summary": "One video: status, frames, duration", "parameters": [VIDEO_ID],
                "responses": {"200": _ok("the video"), **_errors(*AUTH, 404)}},
        "delete": {"summary": "Delete a stored video (its states, index entries and an uploaded source)",
                   "parameters": [VIDEO_ID], "responses": {"200": _ok("deleted"), **_errors(*AUTH, 404)}}},
    "/v1/videos/{video_id}/media": {"get": {
        "summary": "The source file; HTTP range requests supported", "parameters": [VIDEO_ID],
        "responses": {"200": _ok("the file", media="video/*"), "206": _ok("a range of it", media="video/*"),
                      **_errors(*AUTH, 404)}}},
    "/v1/videos/{video_id}/thumbnails/{frame}": {"get": {
        "summary": "A stored frame's JPEG thumbnail",
        "parameters": [VIDEO_ID, _path_param("frame", "frame index (0-based)", "integer")],
        "responses": {"200": _ok("JPEG", media="image/jpeg"), **_errors(400, *AUTH, 404)}}},
    "/v1/videos/{video_id}/summaries": {
        "get": {"summary": "Summaries asked for this video", "parameters": [VIDEO_ID],
                "responses": {"200": _ok("list of summaries"), **_errors(*AUTH, 404)}},
        "post": {"summary": "Start a summary (general, lecture, meeting, surveillance …)", "parameters": [VIDEO_ID],
                 "requestBody": _json_body({"type": "object", "properties": {
                     "mode": {"enum": ["general", "lecture", "surveillance"]},
                     "window": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                "description": "seconds per window (default: the mode's)"},
                     "events": {"type": "array", "items": {"type": "string", "minLength": 1},
                                "description": "the events to find (surveillance only, required there)"},
                     "exact": {"type": "boolean",
                               "description": "the record also carries unrounded numbers and event thumbnails"}}}),
                 "responses": {"202": _ok("the summary record", {"$ref": "#/components/schemas/Summary"}),
                               **_errors(400, *AUTH, 404, 503)}}},
    "/v1/summaries/{summary_id}": {"get": {
        "summary": "A summary: running, ready (with chapters/events) or failed",
        "parameters": [_path_param("summary_id", "the id POST …/summaries returned")],
        "responses": {"200": _ok("the summary", {"$ref": "#/components/schemas/Summary"}), **_errors(*AUTH, 404)}}},
    "/v1/jobs": {"get": {"summary": "Ingest jobs", "responses": {"200": _ok("list of jobs"), **_errors(*AUTH)}}},
    "/v1/jobs/{job_id}": {
        "get": {"summary": "One ingest job", "parameters": [JOB_ID],
                "responses": {"200": _ok("the job", {"$ref": "#/components/schemas/Job"}), **_errors(*AUTH, 404)}},
        "delete": {"summary": "Cancel an ingest", "parameters": [JOB_ID],
                   "responses": {"200": _ok("the job"), **_errors(*AUTH, 404)}}},
    "/v1/jobs/{job_id}/events": {"get": {
        "summary": "An ingest's progress as server-sent events (`progress` on each change, `end` once)",
        "parameters": [JOB_ID],
        "responses": {"200": _ok("event stream", media="text/event-stream"), **_errors(*AUTH, 404)}}},
    "/mcp/": {"post": {
        "summary": "MCP over streamable HTTP (tools: list_videos, get_video, add_video, ask, search_moments, "
                   "summarize); use an MCP client, e.g. the `mcp` SDK's streamable_http_client",
        "responses": {"200": _ok("MCP messages"), **_errors(*AUTH)}}},
    "/v1/watches": {
        "get": {"summary": "Live watches: each one's spec (without secrets) and status",
                "responses": {"200": _ok("list of watches"), **_errors(*AUTH)}},
        "post": {"summary": "Watch a stream URL (or a growing server file under a media root) around the clock; "
                            "started at once unless paused",
                 "requestBody": _json_body({"$ref": "#/components/schemas/WatchRequest"}),
                 "responses": {"201": _ok("the watch", WATCH), **_errors(400, *AUTH, 403, 404, 409)}}},
    "/v1/watches/events": {"get": {
        "summary": "New alerts of every watch as server-sent events (id: a sequence number, resumable with "
                   "Last-Event-ID; data: the alert, thumbnail_url in place of its image)",
        "parameters": [_query("watch", "only this watch's alerts")],
        "responses": {"200": _ok("event stream", {"$ref": "#/components/schemas/Alert"}, "text/event-stream"),
                      **_errors(*AUTH, 404, 409, 503)}}},
    "/v1/watches/{name}": {
        "get": {"summary": "One watch: spec (without secrets) and status", "parameters": [WATCH_NAME],
                "responses": {"200": _ok("the watch", WATCH), **_errors(*AUTH, 404)}},
        "delete": {"summary": "Stop a watch and delete it with its recording and alerts", "parameters": [WATCH_NAME],
                   "responses": {"200": _ok("deleted"), **_errors(*AUTH, 404)}}},
    "/v1/watches/{name}/pause": {"post": {
        "summary": "Stop watching for now (the recording and alerts stay)", "parameters": [WATCH_NAME],
        "responses": {"200": _ok("the watch", WATCH), **_errors(*AUTH, 404)}}},
    "/v1/watches/{name}/resume": {"post": {
        "summary": "Watch again (a failed watch is tried again)", "parameters": [WATCH_NAME],
        "responses": {"200": _ok("the watch", WATCH), **_errors(*AUTH, 404)}}},
    "/v1/watches/{name}/ask": {"post": {
        "summary": "A question over the watch's recording between two wall-clock times, answered as one video",
        "parameters": [WATCH_NAME],
        "requestBody": _json_body({"type": "object", "required": ["question"], "properties": {
            "question": {"type": "string"},
            "since": {"type": "string", "description": "ISO 8601 with a zone, or a duration back from now (10m)"},
            "until": {"type": "string", "description": "as since; default now"},
            "max_tokens": {"type": "integer", "minimum": 1, "maximum": 4096}}}),
        "responses": {"200": _ok("the answer: text, since, until, frames, times (wall clock)"),
                      **_errors(400, *AUTH, 404, 503)}}},
    "/v1/watches/{name}/alerts": {"get": {
        "summary": "A watch's alerts (new, update, end), oldest first",
        "parameters": [WATCH_NAME, _query("since", "only events that started or ended at or after this time "
                                                   "(ISO 8601 with a time zone)")],
        "responses": {"200": _ok("list of alerts"), **_errors(400, *AUTH, 404)}}},
    "/v1/watches/{name}/alerts/{key}/thumbnail": {"get": {
        "summary": "An alert's thumbnail: its event's first frame (new alerts)", "parameters": [WATCH_NAME, ALERT_KEY],
        "responses": {"200": _ok("JPEG", media="image/jpeg"), **_errors(*AUTH, 404)}}},
    "/v1/watches/{name}/alerts/{key}/clip": {"get": {
        "summary": "An alert's clip of its event (end alerts); HTTP range requests supported",
        "parameters": [WATCH_NAME, ALERT_KEY],
        "responses": {"200": _ok("MP4", media="video/mp4"), "206": _ok("a range of it", media="video/mp4"),
                      **_errors(*AUTH, 404)}}},
    "/v1/search": {"get": {
        "summary": "Moments matching a description, best first: seen in the frames, heard in the speech, or both "
                   "(each says its `source`; heard ones carry the spoken `text`)",
        "parameters": [_query("q", "what to look for", required=True), _query("video_id", "only this video"),
                       _query("k", "how many moments (default 10)", "integer")],
        "responses": {"200": _ok("moments"), **_errors(400, *AUTH, 404, 503)}}},
}

COMPONENTS = {
    "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                   "description": "a key from the server's --api-key-file"}},
    "schemas": {
        "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
            "code": {"type": ["string", "null"]}}}}},
        "ChatRequest": {"type": "object", "required": ["messages"], "properties": {
            "model": {"type": "string"}, "messages": {"type": "array", "items": {"type": "object"}},
            "stream": {"type": "boolean"}, "max_tokens": {"type": "integer"},
            "max_completion_tokens": {"type": "integer"}, "temperature": {"type": "number"},
            "top_p": {"type": "number"}, "seed": {"type": "integer"},
            "stop": {"type": ["string", "array"]}, "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer"}, "response_format": {"type": "object"},
            "start": {"type": ["number", "string"]}, "end": {"type": ["number", "string"]},
            "policy": {"type": "string"},
            "speech": {"type": "boolean", "description": "false: no heard speech (transcript lines) in the prompt"},
            "speech_tokens": {"type": "integer", "minimum": 0,
                              "description": "at most this many prompt tokens of heard speech"}}},
        "Job": {"type": "object", "properties": {
            "id": {"type": "string"}, "status": {"enum": ["queued", "ingesting", "ready", "failed", "cancelled"]},
            "video_id": {"type": ["string", "null"]}, "frames_done": {"type": "integer"},
            "total": {"type": ["integer", "null"]}, "fraction": {"type": ["number", "null"]},
            "error": {"type": ["string", "null"]}}},
        "WatchRequest": {"type": "object", "required": ["source", "name"], "properties": {
            "source": {"type": "string", "description": "a stream URL (rtsp, rtmp, http(s)/HLS, srt, udp, tcp, rtp) "
                                                        "or a growing server file under a media root"},
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"},
            "fps": {"type": "number", "default": 1.0, "minimum": 0.05, "maximum": 30},
            "retain": {"type": ["string", "number"], "description": "recording kept: 24h, 90m, 2d or seconds "
                                                                    "(default 24h unless retain_gb)"},
            "retain_gb": {"type": "number", "exclusiveMinimum": 0},
            "rules": {"type": "array", "items": {"oneOf": [
                {"type": "string", "description": "an event, e.g. a person enters"},
                {"type": "object", "required": ["event"], "properties": {
                    "event": {"type": "string"}, "on_frames": {"type": "integer", "minimum": 1, "default": 2},
                    "off_frames": {"type": "integer", "minimum": 1, "default": 3},
                    "cooldown_s": {"type": ["number", "string"], "default": 0},
                    "threshold": {"type": ["number", "null"]}, "update_every_s": {"type": ["number", "null"]},
                    "name": {"type": ["string", "null"]}}}]}},
            "webhooks": {"type": "array", "items": {"type": "object", "required": ["url", "secret"], "properties": {
                "url": {"type": "string"}, "secret": {"type": "string", "description": "HMAC key of the "
                                                                                         "X-Vidmini-Signature"}}}},
            "mqtt": {"type": "array", "items": {"type": "object", "required": ["host"], "properties": {
                "host": {"type": "string"}, "port": {"type": "integer", "default": 1883},
                "topic_prefix": {"type": "string", "default": "vidmini"}}}},
            "segment_s": {"type": ["number", "string"], "default": 60},
            "paused": {"type": "boolean", "default": False}}},
        "Watch": {"type": "object", "properties": {
            "name": {"type": "string"}, "source": {"type": "string", "description": "a URL's password shown as ***"},
            "fps": {"type": "number"}, "retain_s": {"type": ["number", "null"]},
            "retain_bytes": {"type": ["integer", "null"]}, "rules": {"type": "array", "items": {"type": "object"}},
            "sinks": {"type": "array", "items": {"type": "object"}, "description": "without their secrets"},
            "segment_s": {"type": "number"}, "paused": {"type": "boolean"}, "created": {"type": "string"},
            "status": {"type": "object", "properties": {
                "state": {"enum": ["connecting", "recording", "backoff", "paused", "stopped", "failed"]},
                "frames": {"type": "integer"}, "alerts": {"type": "integer"},
                "last_frame": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]}}}}},
        "Alert": {"type": "object", "properties": {
            "watch": {"type": "string"}, "rule": {"type": "string"}, "kind": {"enum": ["new", "update", "end"]},
            "start": {"type": "string"}, "end": {"type": ["string", "null"]}, "confidence": {"type": "number"},
            "key": {"type": "string", "description": "the idempotency key, the same at every sink"},
            "thumbnail_url": {"type": ["string", "null"]}, "clip_url": {"type": ["string", "null"]}}},
        "Summary": {"type": "object", "properties": {
            "id": {"type": "string"}, "video_id": {"type": "string"}, "mode": {"type": "string"},
            "status": {"enum": ["running", "ready", "failed"]}, "summary": {"type": ["object", "null"]},
            "error": {"type": ["string", "null"]},
            "exact": {"type": ["object", "null"], "description": "GET /v1/summaries/{id} of an exact summary: "
                      "{summary: unrounded fields, thumbnails: {name: base64 JPEG}}"}}},
    },
}


def document() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("vidmini")
    except PackageNotFoundError:
        release = "0"
    return {"openapi": "3.1.0",
            "info": {"title": "vidmini", "version": release,
                     "description": "Questions, search and summaries over long videos (LLaVA-Mini)."},
            "security": [{"bearer": []}], "paths": PATHS, "components": COMPONENTS}


async def openapi_document(request: Request) -> Response:
    return JSONResponse(document())


async def docs_page(request: Request) -> Response:
    rows = []
    for path, methods in PATHS.items():
        for method, op in methods.items():
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(op['summary'])}</td></tr>")
    page = ("<!doctype html><meta charset=utf-8><title>vidmini API</title>"
            "<style>body{font:15px system-ui;margin:2em}td{padding:.3em .8em;border-bottom:1px solid #ddd}</style>"
            "<h1>vidmini API</h1><p>Machine-readable: <a href=/openapi.json>/openapi.json</a>. Send "
            "<code>Authorization: Bearer &lt;key&gt;</code> when the server has keys.</p>"
            f"<table>{''.join(rows)}</table>")
    return HTMLResponse(page)
