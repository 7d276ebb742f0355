"""Drains the outbox to the sinks: one lane (a thread) per sink, so a sink that is down, slow or backing off
never holds the others. `submit` puts the alert on disk first and then wakes the lanes."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vidmini.watch.alert import Alert
from vidmini.watch.mqtt import MqttConfig, MqttSink
from vidmini.watch.outbox import Outbox, RetryPolicy
from vidmini.watch.sink import PermanentError, RetryableError, Sink, SinkUnavailable
from vidmini.watch.webhook import WebhookConfig, WebhookSink

log = logging.getLogger(__name__)
SinkConfig = WebhookConfig | MqttConfig


def build_sink(config: SinkConfig | Sink) -> Sink:
    """A sink from its config (a ready `Sink` passes through: custom sinks plug in the same way)."""
    if isinstance(config, Sink):
        return config
    if isinstance(config, WebhookConfig):
        return WebhookSink(config)
    if isinstance(config, MqttConfig):
        return MqttSink(config)
    raise TypeError(f"not a sink config: {config!r}")


class _Lane:
    """One sink's delivery loop: the due deliveries in order, each acknowledged, failed (backoff) or rejected."""

    def __init__(self, dispatcher: Dispatcher, sink: Sink):
        self.d, self.sink = dispatcher, sink
        self.wakeup = threading.Event()
        self.hold_until = 0.0  # the sink was unreachable: nothing is tried before this (wall clock, as the outbox)
        sink.set_wake(self.wakeup.set)
        self.thread = threading.Thread(target=self.run, name=f"vidmini-watch-{sink.name}", daemon=True)

    def wait(self, seconds: float) -> None:
        self.wakeup.wait(max(0.0, min(seconds, self.d.idle_poll_s)))

    def run(self) -> None:
        while not self.d._stop.is_set():
            try:
                self.step()
            except Exception:  # an outbox error (disk full, locked too long): keep the lane alive, try again
                log.exception("watch sink %s: lane error", self.sink.name)
                self.wait(self.d.idle_poll_s)

    def step(self) -> None:
        d, outbox, name = self.d, self.d.outbox, self.sink.name
        self.wakeup.clear()  # before looking, so a wake-up that comes while we look is not lost
        d._housekeeping()
        now = d.clock()
        if now < self.hold_until:
            return self.wait(self.hold_until - now)
        if not self.sink.ready():
            return self.wait(d.idle_poll_s)
        batch = outbox.pending(name, limit=d.batch)
        if not batch:
            due = outbox.next_due(name)
            return self.wait(d.idle_poll_s if due is None else due - now)
        for item in batch:
            if d._stop.is_set():
                return
            try:
                self.sink.deliver(item.alert)
            except SinkUnavailable as e:
                log.info("watch sink %s unavailable: %s", name, e)
                return self.wait(d.idle_poll_s)
            except PermanentError as e:
                log.warning("watch sink %s rejected %s (dead-lettered): %s", name, item.key, e)
                outbox.mark_failed(item.key, name, str(e), permanent=True)
            except Exception as e:  # RetryableError, or a sink's bug: both worth another attempt later
                sink_down = isinstance(e, RetryableError) and e.sink_down
                retry_after = e.retry_after if isinstance(e, RetryableError) else None
                log.warning("watch sink %s: %s failed (attempt %d): %s", name, item.key, item.attempts + 1, e)
                next_at = outbox.mark_failed(item.key, name, f"{type(e).__name__}: {e}", retry_after=retry_after)
                if sink_down:
                    self.hold_until = next_at if next_at is not None else 0.0
                    d._progressed()
                    return
            else:
                outbox.mark_delivered(item.key, name)
            d._progressed()


class Dispatcher:
    """Owns the outbox in `folder` and one lane per sink; `start()` (or `with`), `submit(alert)`, `close()`.

    `policy` sets retries and dead-lettering; `idle_poll_s` bounds how long a lane sleeps before looking again
    (alerts put by another process, an MQTT sink that came back without waking it).
    Outbox housekeeping runs every `housekeeping_s`: too-old pending deliveries are dead-lettered, finished
    alerts older than `keep_done_s` forgotten (their keys then stop counting as repeats), and the outbox's file
    compacted (freed pages returned, WAL truncated): its size follows what is kept, it does not creep.
    """

    def __init__(self, folder: Path | str, sinks: Sequence[SinkConfig | Sink], policy: RetryPolicy | None = None,
                 *, idle_poll_s: float = 1.0, batch: int = 100, housekeeping_s: float = 60.0,
                 keep_done_s: float = 7 * 24 * 3600.0):
        self.idle_poll_s, self.batch = idle_poll_s, batch
        self.housekeeping_s, self.keep_done_s = housekeeping_s, keep_done_s
        self.clock = time.time
        self.sinks = [build_sink(s) for s in sinks]
        self.outbox = Outbox(folder, [s.name for s in self.sinks], policy, clock=self.clock)
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._house_lock = threading.Lock()
        self._next_housekeeping = 0.0
        self._lanes = [_Lane(self, s) for s in self.sinks]
        self._started = False

    def start(self) -> Dispatcher:
        if not self._started:
            self._started = True
            for lane in self._lanes:
                lane.thread.start()
        return self

    def submit(self, alert: Alert) -> bool:
        """On disk before this returns; False when the same key was submitted before (nothing is re-sent)."""
        new = self.outbox.put(alert)
        if new:
            self.wake()
        return new

    def wake(self) -> None:
        """Have every lane look at the outbox now (e.g. after alerts were put by another `Outbox`)."""
        for lane in self._lanes:
            lane.wakeup.set()

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is pending for any sink (delivered or dead-lettered) or `timeout` passes;
        True when idle."""
        deadline = time.monotonic() + timeout
        with self._progress:
            while self.outbox.counts()["pending"]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._progress.wait(min(left, self.idle_poll_s))
        return True

    def _progressed(self) -> None:
        with self._progress:
            self._progress.notify_all()

    def _housekeeping(self) -> None:
        """Whichever lane comes first runs it; the others go on."""
        if not self._house_lock.acquire(blocking=False):
            return
        try:
            now = self.clock()
            if now >= self._next_housekeeping:
                self._next_housekeeping = now + self.housekeeping_s
                if self.outbox.expire(now):
                    self._progressed()
                self.outbox.prune(self.keep_done_s, now)
                self.outbox.compact()  # the space pruned goes back to the disk, the WAL is truncated
        finally:
            self._house_lock.release()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the lanes (a delivery in flight finishes or times out first), close the sinks (MQTT says
        "offline"), close the outbox. What is still pending stays on disk for the next start."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for lane in self._lanes:
            if lane.thread.is_alive():
                lane.thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [lane.sink.name for lane in self._lanes if lane.thread.is_alive()]
        for sink in self.sinks:
            try:
                sink.close()
            except Exception:
                log.exception("watch sink %s: close failed", sink.name)
        if stuck:  # a lane still inside a delivery would find its outbox closed; the process exit ends it
            log.warning("watch sinks still delivering at close: %s", stuck)
        else:
            self.outbox.close()

    def __enter__(self) -> Dispatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
