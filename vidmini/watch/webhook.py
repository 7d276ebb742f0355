"""Alerts as signed JSON POSTs (stdlib urllib: one request at a time per sink needs no client library).

Every request carries `X-Vidmini-Signature: sha256=<hex HMAC-SHA256 of the raw body with the sink's secret>`,
`X-Vidmini-Timestamp` (unix seconds of this attempt) and `Idempotency-Key` (the alert's key, the same on every
retry). 2xx: delivered. 408, 429, 5xx, timeouts, connection errors: retried with backoff. Any other status
(other 4xx, 3xx: redirects are not followed) is final: dead-lettered at once.
Receivers check the body with `verify_signature` and drop repeats by the key.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from vidmini.watch.alert import Alert
from vidmini.watch.sink import PermanentError, RetryableError, Sink

SIGNATURE_HEADER = "X-Vidmini-Signature"
TIMESTAMP_HEADER = "X-Vidmini-Timestamp"
KEY_HEADER = "Idempotency-Key"
RETRYABLE_4XX = {408, 429}


@dataclass(frozen=True)
class WebhookConfig:
    """One webhook sink. `name` is its delivery lane in the outbox: keep it stable across restarts."""

    name: str
    url: str
    secret: str = field(repr=False)
    timeout_s: float = 10.0
    headers: Mapping[str, str] = field(default_factory=dict)  # extra ones, e.g. an Authorization
    include_thumbnail: bool = True  # the bytes as base64 in the body

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"webhook {self.name!r}: not an http(s) URL: {self.url!r}")
        if not self.secret:
            raise ValueError(f"webhook {self.name!r} needs a secret (receivers check the body's signature)")


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Vidmini-Signature` value for `body`: `sha256=<hex>`."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """For receivers: does `header` (the X-Vidmini-Signature value) sign exactly these raw bytes? Compare before
    parsing the JSON; constant-time."""
    if not header or not header.startswith("sha256="):
        return False
    return hmac.compare_digest(sign(secret, body).encode(), header.strip().encode())


def encode(alert: Alert, include_thumbnail: bool = True) -> bytes:
    """The request body: compact JSON with sorted keys (what is signed is what is sent)."""
    return json.dumps(alert.to_dict(thumbnail=include_thumbnail), sort_keys=True, separators=(",", ":")).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirected POST would be re-sent as a GET by urllib; a moved endpoint is a configuration error."""

    def redirect_request(self, *args, **kwargs):
        return None


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class WebhookSink(Sink):
    def __init__(self, config: WebhookConfig):
        super().__init__(config.name)
        self.config = config
        self._opener = urllib.request.build_opener(_NoRedirect)

    def request(self, alert: Alert) -> urllib.request.Request:
        """The signed POST for `alert`, timestamped now."""
        body = encode(alert, self.config.include_thumbnail)
        headers = {**self.config.headers, "Content-Type": "application/json", "User-Agent": "vidmini-watch",
                   SIGNATURE_HEADER: sign(self.config.secret, body),
                   TIMESTAMP_HEADER: str(int(time.time())), KEY_HEADER: alert.key}
        return urllib.request.Request(self.config.url, data=body, headers=headers, method="POST")

    def deliver(self, alert: Alert) -> None:
        try:
            with self._opener.open(self.request(alert), timeout=self.config.timeout_s) as resp:
                resp.read()
                status = resp.status
        except urllib.error.HTTPError as e:
            status = e.code
            detail = e.read(500).decode("utf-8", "replace").strip()
            e.close()
            message = f"HTTP {status} from {self.config.url}" + (f": {detail}" if detail else "")
            if status in RETRYABLE_4XX or status >= 500:
                raise RetryableError(message, retry_after=_retry_after(e.headers.get("Retry-After"))) from None
            raise PermanentError(message) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", None) or e
            raise RetryableError(f"{self.config.url} not reached: {reason}", sink_down=True) from None
        if not 200 <= status < 300:
            raise PermanentError(f"HTTP {status} from {self.config.url}")
