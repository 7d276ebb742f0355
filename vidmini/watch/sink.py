"""What a sink is to the dispatcher, and the three ways a delivery can fail (they decide what the outbox does)."""

from __future__ import annotations

from collections.abc import Callable

from vidmini.watch.alert import Alert


class DeliveryError(Exception):
    """A delivery that did not happen; the subclass says whether to try again."""


class RetryableError(DeliveryError):
    """Try again after a backoff; counts as an attempt (toward the policy's `max_attempts`).

    `sink_down`: the receiver was not reached at all (connection refused, timeout), so the dispatcher pauses the
    whole sink until this delivery's next attempt instead of burning every pending alert's attempts on it.
    `retry_after`: the receiver asked for at least this many seconds (HTTP Retry-After).
    """

    def __init__(self, message: str, *, sink_down: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.sink_down = sink_down
        self.retry_after = retry_after


class PermanentError(DeliveryError):
    """The receiver refused this alert for good (e.g. HTTP 400): dead-letter it now, retrying would not help."""


class SinkUnavailable(DeliveryError):
    """The sink cannot take anything right now (MQTT broker not connected): nothing was attempted, nothing is
    counted; the dispatcher waits until `Sink.ready()` (the sink calls its wake callback when it is)."""


class Sink:
    """A destination the dispatcher drains one outbox lane to. Subclasses implement `deliver`: return once the
    receiver acknowledged the alert, raise a `DeliveryError` otherwise (any other exception counts as retryable)."""

    name: str

    def __init__(self, name: str):
        if not name:
            raise ValueError("a sink needs a name (the outbox keeps one delivery state per alert and sink name)")
        self.name = name
        self._wake: Callable[[], None] | None = None

    def set_wake(self, wake: Callable[[], None]) -> None:
        """The dispatcher's callback for "I can take deliveries again" (e.g. the broker is back)."""
        self._wake = wake

    def wake(self) -> None:
        if self._wake is not None:
            self._wake()

    def ready(self) -> bool:
        """False while deliveries would only fail without reaching anyone (they then wait, uncounted)."""
        return True

    def deliver(self, alert: Alert) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections; the dispatcher calls it once its lane has stopped."""
