"""`vidmini ask|search --server URL` (or `$VIDMINI_SERVER`): the same verbs against a running `vidmini serve`, so
no model loads in the command and the video's session is already warm. Plain HTTP with the standard library;
the server's answers come back in the same JSON shapes the local commands print."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from vidmini.common.errors import UsageError

SERVER_ENV = "VIDMINI_SERVER"
KEY_ENV = "VIDMINI_API_KEY"


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

    def _call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if self.key:
            req.add_header("Authorization", f"Bearer {self.key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            try:
                message = json.load(e)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise UsageError(f"the server at {self.url} answered {e.code}: {message}") from None
        except urllib.error.URLError as e:
            raise UsageError(f"cannot reach the server at {self.url}: {e.reason}") from None

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
    if options.json_schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer",
                                                                          "schema": options.json_schema}}
    return body
