"""Live watches through the service's door: the watches of a data home (add, list, pause, resume, remove, their
alerts) and running them on a Library's model (`vidmini serve`, `vidmini watch run`)."""

from __future__ import annotations

import threading
from pathlib import Path

from vidmini.service.library import Library
from vidmini.watch.alert import Alert
from vidmini.watch.manager import WatchManager
from vidmini.watch.rules import RuleSpec
from vidmini.watch.spec import DEFAULT_RETAIN_S, WatchError, WatchFolders, WatchSpec, parse_duration

__all__ = ["DEFAULT_RETAIN_S", "Alert", "RuleSpec", "WatchError", "WatchFolders", "WatchManager", "WatchSpec",
           "parse_duration", "run_watches", "running_watches", "watch_alerts"]


def watch_alerts(folders: WatchFolders, name: str) -> list[Alert]:
    """A watch's alerts as its outbox keeps them, oldest first."""
    from vidmini.watch.outbox import Outbox

    folder = folders.folder(name)
    if not (folder / "watch.json").is_file():
        raise WatchError(f"no watch named {name!r}")
    if not (folder / "alerts").is_dir():
        return []
    with Outbox(folder / "alerts", []) as outbox:
        return outbox.alerts()


_RUNNING: dict[int, WatchManager] = {}  # library id → its one manager (the service and the app in one process)
_RUNNING_LOCK = threading.Lock()


def run_watches(library: Library, home: str | Path | None = None, **options) -> WatchManager:
    """Every unpaused watch of the data home running on the library's model (loaded when the first one starts),
    kept in step with the folders; `close()` it to stop them. One manager per library: `vidmini serve --app`
    asks from the HTTP face and from the app, and the watches must run once."""
    with _RUNNING_LOCK:
        running = _RUNNING.get(id(library))
        if running is not None and not running.closed:
            return running
        manager = WatchManager(WatchFolders(home or library.root), lambda: library.engine, **options).start()
        _RUNNING[id(library)] = manager
        return manager


def running_watches(library: Library) -> WatchManager | None:
    """The manager `run_watches` started for this library, if it is still running."""
    with _RUNNING_LOCK:
        running = _RUNNING.get(id(library))
        return running if running is not None and not running.closed else None
