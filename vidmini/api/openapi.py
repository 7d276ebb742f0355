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
           404: "no such video, job or summary", 413: "upload too large", 429: "rate limit or queue full",
           500: "the model failed to load", 503: "the model is loading"}
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
                       "(seconds or HH:MM:SS) and policy (all, uniform:K, retrieved:K, auto) ride in the body; the "
                       "answer's range, frames and timestamps come back in the `vidmini` field.",
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
                     "live": {"type": "boolean", "default": False}, "fps": {"type": "number", "default": 1.0}}}),
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
    "/v1/search": {"get": {
        "summary": "Moments matching a description, best first",
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
            "policy": {"type": "string"}}},
        "Job": {"type": "object", "properties": {
            "id": {"type": "string"}, "status": {"enum": ["queued", "ingesting", "ready", "failed", "cancelled"]},
            "video_id": {"type": ["string", "null"]}, "frames_done": {"type": "integer"},
            "total": {"type": ["integer", "null"]}, "fraction": {"type": ["number", "null"]},
            "error": {"type": ["string", "null"]}}},
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
