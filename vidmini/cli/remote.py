"""`vidmini ask|search|summarize --server URL` (or `$VIDMINI_SERVER`): the same verbs against a running `vidmini
serve`, so no model loads in the command and the video's session is already warm. Plain HTTP with the standard
library; the server's answers come back in the same JSON shapes the local commands print, and `summarize` writes
the same files (the batch runs here, with this stand-in for the service's Library doing each input's ingest and
summary on the server)."""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vidmini.common.errors import UsageError, one_line
from vidmini.service.options import AskOptions, IngestOptions

SERVER_ENV = "VIDMINI_SERVER"
KEY_ENV = "VIDMINI_API_KEY"
POLL_S = 0.25  # between looks at a running ingest or summary


class ServerError(UsageError):
    """The server answered with an error status (`status`; `code`: its error's code, e.g. path_not_allowed)."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def server_url(arg: str | None) -> str | None:
    """`--server`, else `$VIDMINI_SERVER`; None to run locally."""
    url = arg or os.environ.get(SERVER_ENV) or None
    return url.rstrip("/") if url else None


class RemoteService:
    """A running `vidmini serve` at `url`; the key comes from `$VIDMINI_API_KEY` when the server needs one."""

    def __init__(self, url: str, key: str | None = None, timeout_s: float = 600.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise UsageError(f"--server must be an http(s) URL, got {url!r}")
        self.url, self.key, self.timeout_s = url, key or os.environ.get(KEY_ENV), timeout_s

    def _call(self, method: str, path: str, body: dict | None = None, *, data=None,
              headers: dict[str, str] | None = None) -> Any:
        """One request; its JSON answer. `body`: a JSON body; else `data` (bytes or an open file, streamed) with
        its `headers`. An error status is a one-line `ServerError` with the server's message."""
        if body is not None:
            data, headers = json.dumps(body).encode(), {"Content-Type": "application/json"}
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers or {})
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            try:
                error = json.load(e)["error"]
                message, code = error["message"], error.get("code")
            except (ValueError, KeyError, TypeError):
                message, code = e.reason, None
            raise ServerError(f"the server at {self.url} answered {e.code}: {message}", e.code, code) from None
        except urllib.error.URLError as e:
            raise UsageError(f"cannot reach the server at {self.url}: {e.reason}") from None
        except (ConnectionError, TimeoutError) as e:  # dropped mid-request (e.g. an upload refused part-way)
            raise UsageError(f"the server at {self.url} dropped the connection: {one_line(e)}") from None

    def check(self) -> str:
        """The server's model name: one call that fails (one line) when the server is down or the key wrong."""
        return self._call("GET", "/v1/models")["data"][0]["id"]

    def ask(self, media: str, question: str, body: dict[str, Any]) -> dict[str, Any]:
        """The answer in `vidmini ask --json`'s shape. `media`: a stored video's id, or a path the server can read
        under one of its media roots."""
        video = str(Path(media).resolve()) if Path(media).exists() else f"vidmini://{media}"
        reply = self._call("POST", "/v1/chat/completions", {
            "model": "vidmini", **body,
            "messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}},
                                                      {"type": "text", "text": question}]}]})
        return reply["vidmini"] | {"answer": reply["choices"][0]["message"]["content"]}

    def search(self, query: str, video: str | None, k: int) -> dict[str, Any]:
        params = {"q": query, "k": str(k)} | ({"video_id": video} if video else {})
        reply = self._call("GET", "/v1/search?" + urllib.parse.urlencode(params))
        model = self._call("GET", "/v1/models")["data"][0]["id"]
        return {"query": query, "video": video, "model": model, "moments": reply["data"]}


def chat_body(options) -> dict[str, Any]:
    """`AskOptions` as the chat request's fields (vidmini's own ride beside OpenAI's, as `extra_body` sends them)."""
    body: dict[str, Any] = {"max_tokens": options.max_new_tokens, "temperature": options.temperature,
                            "top_p": options.top_p, "policy": options.policy}
    for name in ("seed", "start", "end"):
        if getattr(options, name) is not None:
            body[name] = getattr(options, name)
    if options.logprobs:
        body |= {"logprobs": True, "top_logprobs": options.logprobs}
    if not options.speech or options.speech_tokens != AskOptions.speech_tokens:
        body |= {"speech": options.speech, "speech_tokens": options.speech_tokens}
    if options.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer",
                                                                          "schema": options.json_schema}}
    return body


# ---- `vidmini summarize --server`: the batch here, each input's ingest and summary there -----------------------
@dataclass
class RemoteIngest:
    """What the batch reads of an ingest: the stored video's id (and whether its store was there already)."""

    video_id: str
    reused: bool = False


class RemoteSummary:
    """A summary the server computed, as the batch renders and writes it (`vidmini.summaries.formats` reads these
    attributes): every number as the server computed it (the record's `exact` part, not rounded), `source` and
    `name` this command's input, `thumbnails` the event JPEGs; `to_json()` is the record's rounded summary with
    those labels and the thumbnails' written paths in place."""

    def __init__(self, record: dict[str, Any], source: str) -> None:
        exact = record.get("exact")
        if not exact:
            raise UsageError("the server's summaries lack their exact numbers (an older `vidmini serve`?); "
                             "update it, or summarize without --server")
        self._rounded = dict(record["summary"])
        for name, value in exact["summary"].items():
            setattr(self, name, _namespaces(value))
        self.source, self.name = source, source.rsplit("/", 1)[-1]  # as `summarize_session` names a local one
        self.thumbnails = {name: base64.b64decode(data) for name, data in exact["thumbnails"].items()}

    def to_json(self) -> dict[str, Any]:
        events = [dict(e, thumbnail=mine.thumbnail) for e, mine in zip(self._rounded["events"], self.events,
                                                                        strict=True)]
        return self._rounded | {"source": self.source, "name": self.name, "events": events}


def _namespaces(value: Any) -> Any:
    """JSON objects inside a summary (spans, chapters, events) as attribute objects, as the renderers read them."""
    if isinstance(value, list):
        return [_namespaces(v) for v in value]
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespaces(v) for k, v in value.items()})
    return value


class RemoteLibrary:
    """The service's Library as `vidmini summarize`'s batch uses it (`ingest`, `summarize`), over a running
    `vidmini serve`. An input is added by its path when the server may read it (under one of its --media-root
    folders: the same machine, or a shared mount); else this machine's file is uploaded (streamed)."""

    def __init__(self, service: RemoteService) -> None:
        self.service = service

    def ingest(self, source: str, options, on_progress=None) -> RemoteIngest:
        job = self._add(source, options)
        while job["status"] in ("queued", "ingesting"):
            if on_progress is not None and job["total"]:
                on_progress(SimpleNamespace(frames_done=job["frames_done"], total=job["total"]))
            time.sleep(POLL_S)
            job = self.service._call("GET", f"/v1/jobs/{urllib.parse.quote(job['id'])}")
        if job["status"] != "ready" or not job["video_id"]:
            raise UsageError(f"{source}: ingest {job['status']} on the server: {job['error'] or 'no video stored'}")
        return RemoteIngest(job["video_id"])

    def _add(self, source: str, options) -> dict[str, Any]:
        path = Path(source)
        try:
            body = {"source": source, "fps": options.fps, "asr": options.asr, "language": options.language}
            if options.asr_model is not None:
                body["asr_model"] = options.asr_model  # a path on the server
            if options.asr_workers is not None:
                body["asr_workers"] = options.asr_workers
            return self.service._call("POST", "/v1/videos", body)
        except ServerError as e:
            if e.status not in (403, 404):  # 403: not under a media root; 404: not on the server's disk
                raise
            if not path.is_file():
                raise UsageError(f"{source}: no such file here, and {e}") from None
        if options.fps != IngestOptions.fps:
            raise UsageError(f"{source}: the server ingests uploads at {IngestOptions.fps:g} fps; for --fps "
                             f"{options.fps:g} put the file under one of its --media-root folders")
        with path.open("rb") as f:
            return self.service._call("POST", "/v1/videos/upload?" + urllib.parse.urlencode({"filename": path.name}),
                                      data=f, headers={"Content-Type": "application/octet-stream",
                                                       "Content-Length": str(path.stat().st_size)})

    def summarize(self, video_id: str, options, source: str | None = None, on_progress=None) -> RemoteSummary:
        body = {"mode": options.mode, "window": options.window, "events": list(options.events), "exact": True}
        record = self.service._call("POST", f"/v1/videos/{urllib.parse.quote(video_id)}/summaries", body)
        while record["status"] == "running":
            time.sleep(POLL_S)
            record = self.service._call("GET", f"/v1/summaries/{urllib.parse.quote(record['id'])}")
        if record["status"] != "ready":
            raise UsageError(f"the summary failed on the server: {record['error']}")
        summary = RemoteSummary(record, source or record["summary"]["source"])
        if on_progress is not None:
            on_progress(summary.frames, summary.frames)
        return summary
