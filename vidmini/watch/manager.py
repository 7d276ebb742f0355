"""The watches of one data home, kept running: what is on disk (`WatchFolders`) is what runs.

`vidmini watch add|rm|pause|resume` only change the folders; a running service (`vidmini serve`, `vidmini watch
run`) reconciles every `poll_s` — a new unpaused watch starts, a removed or paused one stops — so the command line
needs no connection to it. Each watch has its own outbox and sinks (`Dispatcher`); every alert also goes to the
in-memory feed (the API's server-sent events, the app) after it is safely in the outbox.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from vidmini.watch.alert import Alert
from vidmini.watch.spec import WatchFolders, WatchSpec

log = logging.getLogger(__name__)

FEED_SIZE = 1000


def sink_configs(spec: WatchSpec) -> list:
    """The watch's sinks as the dispatcher's configs (lane names stable across restarts: the outbox keys on them)."""
    from vidmini.watch.mqtt import MqttConfig
    from vidmini.watch.webhook import WebhookConfig

    configs = []
    for i, sink in enumerate(spec.sinks):
        if sink["type"] == "webhook":
            configs.append(WebhookConfig(f"webhook-{i}", sink["url"], sink["secret"]))
        else:
            configs.append(MqttConfig(f"mqtt-{i}", sink["host"], int(sink.get("port", 1883)), watches=(spec.name,),
                                      topic_prefix=sink.get("topic_prefix", "vidmini")))
    return configs


class Feed:
    """The latest alerts of every watch, and listeners woken by each new one (SSE, the app)."""

    def __init__(self, size: int = FEED_SIZE) -> None:
        self._items: deque[tuple[int, Alert]] = deque(maxlen=size)
        self._seq = 0
        self._cond = threading.Condition()

    def add(self, alert: Alert) -> None:
        with self._cond:
            self._seq += 1
            self._items.append((self._seq, alert))
            self._cond.notify_all()

    def since(self, seq: int = 0, watch: str | None = None) -> list[tuple[int, Alert]]:
        with self._cond:
            return [(n, a) for n, a in self._items if n > seq and (watch is None or a.watch == watch)]

    def wait(self, seq: int, timeout: float) -> int:
        """Block until an alert after `seq` exists (or timeout); the latest sequence number."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > seq, timeout)
            return self._seq


class WatchManager:
    """Runs every unpaused watch of `folders` on `engine` (`engine_of()` is called when the first watch starts, so
    a service with no watches never loads the model for them)."""

    def __init__(self, folders: WatchFolders, engine_of: Callable[[], object], *, poll_s: float = 2.0,
                 runner_options: dict | None = None) -> None:
        self.folders, self._engine_of, self.poll_s = folders, engine_of, poll_s
        self.runner_options = runner_options or {}
        self.feed = Feed()
        self._runners: dict[str, tuple] = {}  # name → (runner, dispatcher, spec)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors: dict[str, str] = {}

    def start(self) -> WatchManager:
        self.reconcile()
        self._thread = threading.Thread(target=self._loop, name="vidmini-watches", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - logged; the next round tries again
                log.exception("reconciling watches")

    def reconcile(self) -> None:
        """Start what should run and does not; stop what runs and should not (removed, paused, changed)."""
        with self._lock:
            wanted = {s.name: s for s in self.folders.all() if not s.paused}
            for name in [n for n, (_, _, spec) in self._runners.items() if wanted.get(n) != spec]:
                self._stop_one(name)
            for name, spec in wanted.items():
                if name not in self._runners and name not in self.errors:
                    self._start_one(spec)

    def _start_one(self, spec: WatchSpec) -> None:
        from vidmini.watch.dispatcher import Dispatcher
        from vidmini.watch.runner import WatchRunner

        folder = self.folders.folder(spec.name)
        try:
            # delivered alerts are kept as long as the recording they point at (a week when kept by size only)
            keep = spec.retain_s if spec.retain_s is not None else 7 * 24 * 3600.0
            dispatcher = Dispatcher(folder / "alerts", sink_configs(spec), keep_done_s=keep).start()

            def submit(alert: Alert, dispatcher=dispatcher) -> None:
                if dispatcher.submit(alert):  # on disk first; a repeat (same key) is not shown twice
                    self.feed.add(alert)

            runner = WatchRunner(spec, self.folders, self._engine_of(), submit, **self.runner_options).start()
        except Exception as e:  # noqa: BLE001 - this watch is reported failed; the others run
            log.exception("watch %s did not start", spec.name)
            self.errors[spec.name] = " ".join(str(e).split()) or type(e).__name__
            return
        self._runners[spec.name] = (runner, dispatcher, spec)

    def _stop_one(self, name: str) -> None:
        runner, dispatcher, _ = self._runners.pop(name)
        runner.stop()
        dispatcher.close()

    def runner(self, name: str):
        with self._lock:
            got = self._runners.get(name)
        return got[0] if got else None

    def statuses(self) -> list[dict]:
        """Every watch on disk with its spec and, when running, its status."""
        out = []
        for spec in self.folders.all():
            runner = self.runner(spec.name)
            status = runner.status().to_json() if runner is not None else {
                "name": spec.name, "state": "failed" if spec.name in self.errors else
                ("paused" if spec.paused else "stopped"), "error": self.errors.get(spec.name)}
            out.append({**spec.to_json(), "sinks": [{k: v for k, v in s.items() if k != "secret"} for s in spec.sinks],
                        "status": status})
        return out

    @property
    def closed(self) -> bool:
        return self._stop.is_set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            for name in list(self._runners):
                self._stop_one(name)
