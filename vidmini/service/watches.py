"""Live watches through the service's door: the watches of a data home (add, list, pause, resume, remove, their
alerts) and running them on a Library's model (`vidmini serve`, `vidmini watch run`)."""

from __future__ import annotations

from pathlib import Path

from vidmini.service.library import Library
from vidmini.watch.alert import Alert
from vidmini.watch.manager import WatchManager
from vidmini.watch.rules import RuleSpec
from vidmini.watch.spec import DEFAULT_RETAIN_S, WatchError, WatchFolders, WatchSpec, parse_duration

__all__ = ["DEFAULT_RETAIN_S", "Alert", "RuleSpec", "WatchError", "WatchFolders", "WatchManager", "WatchSpec",
           "parse_duration", "run_watches", "watch_alerts"]


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


def run_watches(library: Library, home: str | Path | None = None, **options) -> WatchManager:
    """Every unpaused watch of the data home running on the library's model (loaded when the first one starts),
    kept in step with the folders; `close()` it to stop them."""
    return WatchManager(WatchFolders(home or library.root), lambda: library.engine, **options).start()
