"""How much one client may ask of the HTTP face: a per-caller rate limit and a bound on questions in flight.
Both answer 429 with Retry-After rather than letting work pile up behind one model."""

from __future__ import annotations

import threading
import time
from collections import deque

from vidmini.api.errors import ApiError


class RateLimiter:
    """At most `per_minute` requests per caller in any 60 s window (a sliding log; callers are key digests, or
    client addresses when the server has no keys)."""

    def __init__(self, per_minute: int, window_s: float = 60.0) -> None:
        self.per_minute, self.window_s = per_minute, window_s
        self._seen: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, caller: str) -> None:
        now = time.monotonic()
        with self._lock:
            times = self._seen.setdefault(caller, deque())
            while times and now - times[0] >= self.window_s:
                times.popleft()
            if len(times) >= self.per_minute:
                wait = self.window_s - (now - times[0])
                raise ApiError(429, f"rate limit: {self.per_minute} requests per minute; retry in {wait:.0f}s",
                               "rate_limit_error", code="rate_limit_exceeded", retry_after=wait)
            times.append(now)


class PendingBound:
    """Questions in flight; the (max_pending + 1)-th waits nowhere: it is refused at once (a bounded queue)."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self.pending = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        with self._lock:
            if self.pending >= self.max_pending:
                raise ApiError(429, f"the server is answering {self.pending} questions, its limit; retry shortly",
                               "rate_limit_error", code="queue_full")
            self.pending += 1

    def leave(self) -> None:
        with self._lock:
            self.pending -= 1

    def releaser(self):
        """A `leave` that counts once however often it is called (a stream ends on several paths)."""
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                self.leave()
        return release
