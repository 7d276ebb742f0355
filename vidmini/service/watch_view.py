"""What the app shows of the live watches, and the changes it makes, through the service's door (the faces read no
watch files themselves): the watches with their status, a watch's latest recorded frames, the newest alerts of
every watch, a clip by its file name, and a `WatchSpec` made from what a person typed.

The watches of a Library are those of the manager `run_watches` started for it (its folders), else those under
the Library's data root.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from vidmini.service.library import Library
from vidmini.service.watches import (
    DEFAULT_RETAIN_S,
    Alert,
    RuleSpec,
    WatchError,
    WatchFolders,
    WatchSpec,
    parse_duration,
    running_watches,
    watch_alerts,
)

LIVE_FRAMES = 8
ALERTS_SHOWN = 50
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(gb|mb|tb)", re.I)
_SIZE_BYTES = {"mb": 10**6, "gb": 10**9, "tb": 10**12}


@dataclass(frozen=True)
class WatchRow:
    """One watch as the app lists it: what was set up (no secrets) and what it is doing."""

    name: str
    source: str  # without a password in it
    paused: bool
    fps: float
    rules: list[str]
    retain_s: float | None
    retain_bytes: int | None
    sinks: list[str]  # "webhook https://…", "mqtt host:port"
    state: str  # recording | connecting | backoff | paused | pausing | starting | stopped | failed
    frames: int = 0
    last_frame: str | None = None
    open_events: list[str] = field(default_factory=list)
    alerts: int = 0
    segments: int = 0
    disk_bytes: int = 0
    gaps: int = 0
    error: str | None = None


@dataclass(frozen=True)
class LiveFrame:
    """A recorded frame: its wall-clock time (ISO 8601 with the zone) and its JPEG thumbnail."""

    time: str
    jpeg: bytes


def watch_folders(library: Library) -> WatchFolders:
    manager = running_watches(library)
    return manager.folders if manager is not None else WatchFolders(library.root)


def watch_names(library: Library) -> list[str]:
    return watch_folders(library).names()


def redact_url(url: str) -> str:
    """A source URL without the password of its user part (rtsp://user:***@camera/...), as the API lists it."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
    except ValueError:
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"))


def _sink_text(sink: dict) -> str:
    if sink.get("type") == "webhook":
        return f"webhook {sink.get('url')}"
    return f"mqtt {sink.get('host')}:{sink.get('port', 1883)}"


def _tree_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    total = 0
    for p in path.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:  # removed by retention while we counted
            pass
    return total


def watch_rows(library: Library) -> list[WatchRow]:
    """Every watch on disk, by name. A running one reports its live status; one that is not running (paused,
    not started yet, or no manager in this process) what it saved last (frames, alerts, last frame) and the
    folder's size. A watch paused on disk whose runner has not stopped yet is `pausing`; an unpaused one the
    running manager has not started yet is `starting`."""
    manager = running_watches(library)
    folders = manager.folders if manager is not None else WatchFolders(library.root)
    try:
        statuses = {s["name"]: s["status"] for s in manager.statuses()} if manager is not None else {}
    except (WatchError, OSError, ValueError):  # a watch removed while it was listed: as on disk, this once
        statuses = {}
    rows = []
    for name in folders.names():
        try:
            spec = folders.load(name)
        except (WatchError, OSError, ValueError):
            continue  # removed meanwhile
        status = statuses.get(spec.name)
        running = status is not None and "frames" in status
        if not running:
            saved = folders.read_state(spec.name)
            status = {"state": (status or {}).get("state") or ("paused" if spec.paused else "stopped"),
                      "error": (status or {}).get("error"), "frames": int(saved.get("frames", 0)),
                      "alerts": int(saved.get("alerts", 0)), "last_frame": saved.get("last_frame"),
                      "disk_bytes": _tree_bytes(folders.folder(spec.name))}
        state = status.get("state") or "stopped"
        if spec.paused and running and state not in ("paused", "stopped", "failed"):
            state = "pausing"
        elif not spec.paused and not running and manager is not None and state == "stopped":
            state = "starting"
        rows.append(WatchRow(
            spec.name, redact_url(spec.source), spec.paused, spec.fps, [r.get("name") or r["event"] for r in spec.rules],
            spec.retain_s, spec.retain_bytes, [_sink_text(s) for s in spec.sinks], state,
            int(status.get("frames") or 0), status.get("last_frame"), list(status.get("open_events") or []),
            int(status.get("alerts") or 0), int(status.get("segments") or 0), int(status.get("disk_bytes") or 0),
            int(status.get("gaps") or 0), status.get("error")))
    return rows


def parse_retention(text: str) -> tuple[float | None, int | None]:
    """(retain_s, retain_bytes) from '24h', '90m', '2d' (a duration) or '5GB', '500MB' (a size on disk); both
    joined by '/' or ',' ('24h / 5GB'). Empty: the default (24 h)."""
    parts = [p.strip() for p in re.split(r"[/,;]| and ", text or "") if p.strip()]
    if not parts:
        return DEFAULT_RETAIN_S, None
    retain_s = retain_bytes = None
    for part in parts:
        size = _SIZE.fullmatch(part)
        if size:
            retain_bytes = int(float(size.group(1)) * _SIZE_BYTES[size.group(2).lower()])
            if retain_bytes <= 0:
                raise WatchError(f"a retention size must be more than 0: {part!r}")
        else:
            try:
                retain_s = parse_duration(part)
            except WatchError:
                raise WatchError(f"retention: not a duration or a size: {part!r} (say e.g. 24h, 90m, 2d or "
                                 "5GB)") from None
    return retain_s, retain_bytes


def new_watch_spec(name: str, source: str, rules: str | list[str] = (), retention: str = "24h", fps: float = 1.0,
                   webhook_url: str = "", webhook_secret: str = "", mqtt: str = "", paused: bool = False,
                   segment: str | float = 60.0) -> WatchSpec:
    """A watch from what a person typed: `rules` one event per line, `retention` as `parse_retention` reads it,
    an optional webhook (URL and its secret) and an MQTT broker `host[:port]`. WatchError (one line) when any of
    it is wrong; nothing is saved here (`add_watch`)."""
    lines = rules.splitlines() if isinstance(rules, str) else list(rules)
    events = [e.strip() for e in lines if e.strip()]
    retain_s, retain_bytes = parse_retention(retention)
    try:
        rule_dicts = tuple(RuleSpec(e).to_dict() for e in events)
    except ValueError as e:
        raise WatchError(str(e)) from None
    sinks: list[dict] = []
    webhook_url, webhook_secret, mqtt = (webhook_url or "").strip(), (webhook_secret or "").strip(), (mqtt or "").strip()
    if webhook_secret and not webhook_url:
        raise WatchError("a webhook secret without a webhook URL")
    if webhook_url:
        if not webhook_secret:
            raise WatchError("a webhook needs a secret (the receiver checks the alerts' signature with it)")
        sinks.append({"type": "webhook", "url": webhook_url, "secret": webhook_secret})
    if mqtt:
        host, _, port = mqtt.rpartition(":") if ":" in mqtt else (mqtt, "", "1883")
        if not host or not port.isdigit():
            raise WatchError(f"an MQTT broker is host[:port], not {mqtt!r}")
        sinks.append({"type": "mqtt", "host": host, "port": int(port)})
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise WatchError(f"fps must be a number, not {fps!r}") from None
    return WatchSpec((name or "").strip(), (source or "").strip(), fps=fps, retain_s=retain_s,
                     retain_bytes=retain_bytes, rules=rule_dicts, sinks=tuple(sinks),
                     segment_s=parse_duration(segment), paused=paused)


def _forget_failure(library: Library, name: str) -> None:
    """A watch of this name that failed to start is tried again (the manager does not retry a failed start)."""
    manager = running_watches(library)
    if manager is not None:
        manager.errors.pop(name, None)


def add_watch(library: Library, spec: WatchSpec) -> WatchSpec:
    """Saved in the watches' folders; the running manager starts it within its poll (a couple of seconds)."""
    saved = watch_folders(library).add(spec)
    _forget_failure(library, spec.name)
    return saved


def pause_watch(library: Library, name: str, paused: bool = True) -> WatchSpec:
    """Paused or resumed on disk; the running manager stops or starts it within its poll (a failed watch resumed
    is tried again)."""
    spec = watch_folders(library).set_paused(name, paused)
    if not paused:
        _forget_failure(library, name)
    return spec


def remove_watch(library: Library, name: str) -> None:
    """The watch and everything it recorded. A running one is paused and stopped first (its recorder would go on
    writing into the folder being removed)."""
    manager = running_watches(library)
    folders = watch_folders(library)
    spec = folders.load(name)  # WatchError when there is none
    if manager is not None and manager.runner(name) is not None:
        if not spec.paused:
            folders.set_paused(name, True)
        manager.reconcile()
    folders.remove(name)
    _forget_failure(library, name)


def latest_frames(library: Library, name: str, count: int = LIVE_FRAMES) -> list[LiveFrame]:
    """The watch's `count` newest recorded frames that were ingested (the live view), oldest first: from the
    stores of its newest segments (`state.json` says which store holds which segment; the segment index gives
    each segment's wall-clock start). Empty when nothing was ingested yet; frames removed by retention while
    they are read are left out."""
    from vidmini.store.video_store import VideoStore
    from vidmini.watch.recorder import read_segments

    folders = watch_folders(library)
    folder = folders.folder(name)
    if not (folder / "watch.json").is_file():
        raise WatchError(f"no watch named {name!r}")
    stores = folders.read_state(name).get("stores") or {}
    starts = {s.file: s.start for s in read_segments(folder / "segments")}
    found: list[LiveFrame] = []
    for file in sorted((f for f in stores if f in starts), key=lambda f: starts[f], reverse=True):
        try:
            store = VideoStore.load_existing(stores[file])
            times = store.timestamps()
            n = min(store.committed_frames, len(times))
            for i in range(n - 1, -1, -1):
                t = starts[file] + timedelta(seconds=float(times[i]))
                found.append(LiveFrame(t.isoformat(timespec="milliseconds"), store.thumbnail(i)))
                if len(found) >= count:
                    break
        except (OSError, ValueError, KeyError, LookupError, IndexError):
            continue  # retained away, or being replaced after a restart
        if len(found) >= count:
            break
    return sorted(found, key=lambda f: datetime.fromisoformat(f.time))


def recent_alerts(library: Library, limit: int = ALERTS_SHOWN, watch: str | None = None) -> list[Alert]:
    """The newest alerts of every watch (or of `watch`), newest first by start and then by kind order. An
    `update` or `end` carries no thumbnail of its own: it gets its event's (the `new` alert's)."""
    folders = watch_folders(library)
    names = [watch] if watch else folders.names()
    found: list[tuple[tuple, Alert]] = []
    for name in names:
        try:
            alerts = watch_alerts(folders, name)
        except (WatchError, OSError):
            continue  # removed meanwhile
        thumbs = {a.event: a.thumbnail for a in alerts if a.thumbnail}
        for i, a in enumerate(alerts):
            if a.thumbnail is None and a.event in thumbs:
                a = replace(a, thumbnail=thumbs[a.event])
            moment = a.end if a.kind == "end" and a.end else a.start
            found.append(((datetime.fromisoformat(moment).timestamp(), i), a))
    found.sort(key=lambda pair: pair[0], reverse=True)
    return [a for _, a in found[:limit]]


def alerts_version(library: Library) -> tuple:
    """A cheap token that changes when any watch's alerts may have changed (an alert put in an outbox by this
    process or another, a delivery marked, a watch added or removed): the outboxes' file sizes and times, read
    without opening them. Poll it; read `recent_alerts` again when it changed."""
    from vidmini.watch.outbox import DB_NAME

    folders = watch_folders(library)
    version = []
    for name in folders.names():
        db = folders.folder(name) / "alerts" / DB_NAME
        for path in (db, db.with_name(DB_NAME + "-wal")):
            try:
                st = path.stat()
                version.append((name, path.name, st.st_size, st.st_mtime_ns))
            except OSError:
                version.append((name, path.name))
    return tuple(version)


def clip_file(library: Library, name: str, file: str) -> Path | None:
    """A clip of the watch by its file name (as alerts name it: `clip_path`), when it is in the watch's clips
    folder; None otherwise (another path is never served)."""
    if not file or "/" in file or "\\" in file or file.startswith("."):
        return None
    try:
        folder = watch_folders(library).folder(name) / "clips"
    except WatchError:
        return None
    path = folder / file
    return path if path.is_file() and path.parent == folder else None


def clip_name(library: Library, alert: Alert) -> str | None:
    """The file name to ask `clip_file` for, when the alert's clip is in its watch's clips folder."""
    if not alert.clip_path:
        return None
    name = Path(alert.clip_path).name
    found = clip_file(library, alert.watch, name)
    return name if found is not None and found.resolve() == Path(alert.clip_path).resolve() else None

