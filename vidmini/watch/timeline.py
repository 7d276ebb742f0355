"""A watch's retained recording as one timeline, for questions over live time ("what happened in the last 10
minutes?", since/until in wall-clock time).

A watch stores one video store per recorded segment. `watch_timeline` picks the segments that overlap the span
and places each store's frames on one clock (seconds since `base`, the wall clock of the first frame included);
`open_timeline_session` makes one `VideoSession` over them without copying states: the stores' chunks are chained
as tier B (`ChunkedStates.extend`), their compressed tokens concatenated as tier A. Only frames inside the span
are included, so a question over the last 10 minutes of a 24-hour watch reads 10 minutes of states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vidmini.watch.spec import WatchError, WatchFolders, parse_duration

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?\s*[dhms]\s*)+(ago)?\s*$", re.I)


def parse_when(text: str | datetime | None, now: datetime | None = None) -> datetime | None:
    """A wall-clock time: an ISO 8601 time (a time without a zone is this machine's local time), 'now', or a
    duration back from now ('10m', '1h30m', '2h ago')."""
    if text is None or isinstance(text, datetime):
        return _aware(text) if text is not None else None
    s = str(text).strip()
    now = now or datetime.now(UTC)
    if s.lower() == "now":
        return now
    if _RELATIVE.match(s):
        return now - timedelta(seconds=parse_duration(re.sub(r"\s*ago\s*$", "", s, flags=re.I)))
    try:
        return _aware(datetime.fromisoformat(s))
    except ValueError:
        raise WatchError(f"not a time: {text!r} (say e.g. 10m, 2h ago, 2026-12-04T09:30+01:00)") from None


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None and t.utcoffset() is not None else t.astimezone()


@dataclass
class TimelinePart:
    """One segment's store on the timeline: its frames `first`..`stop` (store frame indices) inside the span,
    the first of them at timeline second `offset` - store timestamp `first`."""

    store: object  # VideoStore
    segment_start: datetime
    first: int
    stop: int


@dataclass
class WatchTimeline:
    name: str
    base: datetime  # timeline second 0
    parts: list[TimelinePart]
    since: datetime | None
    until: datetime | None

    @property
    def num_frames(self) -> int:
        return sum(p.stop - p.first for p in self.parts)

    def wall(self, seconds: float) -> datetime:
        return self.base + timedelta(seconds=float(seconds))

    def seconds(self, when: datetime) -> float:
        return (when - self.base).total_seconds()

    def key(self) -> str:
        """Names this exact set of frames (a session over it can be reused until the watch records more)."""
        ends = ",".join(f"{Path(p.store.path).name}:{p.first}-{p.stop}" for p in self.parts)
        return f"watch:{self.name}:{ends}"


def watch_timeline(folders: WatchFolders, name: str, since: datetime | None = None,
                   until: datetime | None = None) -> WatchTimeline:
    """The watch's stored frames within [since, until] (either open), in time order."""
    from vidmini.store.video_store import VideoStore
    from vidmini.watch.recorder import read_segments

    folder = folders.folder(name)
    if not (folder / "watch.json").is_file():
        raise WatchError(f"no watch named {name!r}")
    if since is not None and until is not None and until <= since:
        raise WatchError(f"the span ends ({until.isoformat()}) before it starts ({since.isoformat()})")
    stores = folders.read_state(name).get("stores", {})
    parts: list[TimelinePart] = []
    for seg in read_segments(folder / "segments"):
        path = stores.get(seg.file)
        if not path or not (Path(path) / "manifest.json").is_file():
            continue
        if until is not None and seg.start > until:
            continue
        store = VideoStore.load_existing(path)
        n = store.committed_frames
        if not n:
            continue
        ts = store.timestamps()
        walls = [seg.start + timedelta(seconds=float(t)) for t in ts]
        inside = [i for i, w in enumerate(walls) if (since is None or w >= since) and (until is None or w <= until)]
        if inside:
            parts.append(TimelinePart(store, seg.start, inside[0], inside[-1] + 1))
    if not parts:
        span = (f" between {since.isoformat() if since else 'the start'} and {until.isoformat() if until else 'now'}")
        raise WatchError(f"watch {name!r} has no frames{span}")
    first = parts[0]
    base = first.segment_start + timedelta(seconds=float(first.store.timestamps()[first.first]))
    return WatchTimeline(name, base, parts, since, until)


def open_timeline_session(engine, timeline: WatchTimeline, **options):
    """One `VideoSession` over the timeline's frames (see the module docstring); `options` as `VideoSession`'s."""
    import torch

    from vidmini.engine.session import VideoSession
    from vidmini.engine.tiers import ChunkedStates
    from vidmini.store.session import store_states

    source: ChunkedStates | None = None
    compressed, timestamps = [], []
    for part in timeline.parts:
        states = _frames_of(store_states(part.store), part.first, part.stop)
        source = states if source is None else source.extend(states)
        compressed.append(part.store.load(["compressed"], frames=slice(part.first, part.stop))["compressed"])
        offset = (part.segment_start - timeline.base).total_seconds()
        timestamps += [offset + float(t) for t in part.store.timestamps()[part.first : part.stop]]
    return VideoSession(engine, source, torch.cat(compressed), timestamps, **options)


def _frames_of(states, first: int, stop: int):
    """`states` (a store's chunks) narrowed to frames first..stop, renumbered from 0."""
    from vidmini.engine.tiers import ChunkedStates

    if first == 0 and stop == states.num_frames:
        return states
    chunks = [c for c in range(states.num_chunks) if states.starts[c] < stop and states.starts[c + 1] > first]
    starts = [max(states.starts[c], first) - first for c in chunks] + [stop - first]
    loader = states.loader

    def load(i: int, names: list[str]) -> dict:
        c = chunks[i]
        lo, hi = states.starts[c], states.starts[c + 1]
        got = loader(c, names)
        a, b = max(first, lo) - lo, min(stop, hi) - lo
        return {k: v[a:b] for k, v in got.items()}

    return ChunkedStates(starts, load, states.num_layers, states.key_valid, states.prefix_ids, states.next_position,
                         states.frame_bytes)
