"""Live watches through the service's door: the watches of a data home (add, list, pause, resume, remove, their
alerts) and running them on a Library's model (`vidmini serve`, `vidmini watch run`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from vidmini.service.library import Library
from vidmini.service.options import AskOptions
from vidmini.watch.alert import Alert
from vidmini.watch.manager import WatchManager
from vidmini.watch.rules import RuleSpec
from vidmini.watch.spec import DEFAULT_RETAIN_S, WatchError, WatchFolders, WatchSpec, parse_duration

__all__ = ["DEFAULT_RETAIN_S", "Alert", "RuleSpec", "WatchError", "WatchFolders", "WatchManager", "WatchSpec",
           "WatchAnswer", "ask_watch", "parse_duration", "run_watches", "running_watches", "watch_alerts"]


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


# ---- questions over live time ---------------------------------------------------------------------------------
@dataclass
class WatchAnswer:
    """An answer over a watch's recording: the text, the span it covered in wall-clock time, and the frames it
    saw with their wall-clock times (ISO 8601 with a zone)."""

    watch: str
    question: str
    text: str
    since: str
    until: str
    frames: int
    times: list[str]
    answer: object  # the engine's SessionAnswer (timeline seconds)

    def to_json(self) -> dict:
        return {"watch": self.watch, "question": self.question, "text": self.text, "since": self.since,
                "until": self.until, "frames": self.frames, "times": self.times,
                "policy": self.answer.policy, "ttft_ms": self.answer.ttft_ms}


class WatchAsking:
    """A question over a watch's span in flight: iterate `text()`, then `result()`."""

    def __init__(self, library: Library, timeline, stream, question: str) -> None:
        from vidmini.service.library import Asking

        self.timeline, self.question = timeline, question
        self._asking = Asking(library, timeline.key(), stream, question)

    def text(self):
        return self._asking.text()

    def cancel(self) -> None:
        self._asking.cancel()

    def result(self) -> WatchAnswer:
        answer = self._asking._stream.result()
        tl = self.timeline
        walls = [tl.wall(t).isoformat(timespec="milliseconds") for t in answer.timestamps]
        first = tl.wall(0.0)
        last_part = tl.parts[-1]
        end = last_part.segment_start + timedelta(
            seconds=float(last_part.store.timestamps()[last_part.stop - 1]))
        return WatchAnswer(tl.name, self.question, answer.text, first.isoformat(timespec="milliseconds"),
                           end.isoformat(timespec="milliseconds"), tl.num_frames, walls, answer)


_OPEN_KEYS: dict[tuple[int, str], str] = {}  # (library, watch) → the session key it last opened


def ask_watch(library: Library, name: str, question: str, since=None, until=None,
              options: AskOptions | None = None, folders: WatchFolders | None = None) -> WatchAsking:
    """A question over watch `name`'s recording between `since` and `until` (wall clock: datetimes, ISO 8601
    strings, or durations back from now such as '10m'; either open). Asked through the library's session manager,
    so it is batched with every other question on the model."""
    from vidmini.engine.generate import SamplingConfig
    from vidmini.watch.timeline import open_timeline_session, parse_when, watch_timeline

    options = options or AskOptions()
    if not question.strip():
        raise WatchError("empty question")
    folders = folders or WatchFolders(library.root)
    timeline = watch_timeline(folders, name, parse_when(since), parse_when(until))
    engine, manager = library.engine, library.manager
    key = timeline.key()
    with _RUNNING_LOCK:
        old = _OPEN_KEYS.get((id(library), name))
        _OPEN_KEYS[(id(library), name)] = key
    if old is not None and old != key:
        manager.close(old)  # the watch recorded more since: that span's session is not asked again
    if key not in manager.live_keys:
        manager.open(key, lambda **kw: open_timeline_session(engine, timeline, **kw))
    sampling = SamplingConfig(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                              top_p=options.top_p, seed=options.seed, stop_ids=engine.eos_ids)
    stream = manager.ask(key, question, policy=options.policy, sampling=sampling)
    return WatchAsking(library, timeline, stream, question)


# ---- "while you were away" -------------------------------------------------------------------------------------
def watch_report(library: Library, names: list[str] | None = None, since=None, until=None,
                 window_s: float = 60.0, folders: WatchFolders | None = None) -> dict:
    """Several watches over one span: per watch, a summary of what its recording shows (a line per window, in
    wall-clock time) and its alerts; then every watch's alerts in time order. A watch with no frames in the span
    says so instead of failing the report."""
    from vidmini.summaries.summarize import SummarizeOptions, summarize_session
    from vidmini.watch.alert import parse_time
    from vidmini.watch.timeline import open_timeline_session, parse_when, watch_timeline

    folders = folders or WatchFolders(library.root)
    names = names or folders.names()
    start, end = parse_when(since), parse_when(until)
    report = {"since": start.isoformat() if start else None, "until": end.isoformat() if end else None,
              "watches": [], "alerts": []}
    for name in names:
        alerts = [a for a in watch_alerts(folders, name)
                  if (start is None or parse_time(a.end or a.start) >= start)
                  and (end is None or parse_time(a.start) <= end)]
        entry = {"name": name, "alerts": [a.to_dict(thumbnail=False) for a in alerts]}
        try:
            timeline = watch_timeline(folders, name, start, end)
        except WatchError as e:
            entry.update(frames=0, summary=str(e), windows=[])
        else:
            session = open_timeline_session(library.engine, timeline)
            try:
                summary = summarize_session(session, SummarizeOptions("general", window_s), source=name,
                                            video_id=timeline.key(), duration=None)
            finally:
                session.close()
            entry.update(frames=timeline.num_frames, summary=summary.summary,
                         windows=[{"start": timeline.wall(w.start).isoformat(timespec="seconds"),
                                   "end": timeline.wall(w.end).isoformat(timespec="seconds"), "text": w.text}
                                  for w in summary.windows])
        report["watches"].append(entry)
        report["alerts"] += entry["alerts"]
    report["alerts"].sort(key=lambda a: (a["start"], a["watch"], a["rule"], a["kind"]))
    return report
