"""One watch at work: record the source → ingest each segment as it grows → judge the new frames against the
watch's rules → alerts into the outbox, which delivers them (webhooks, MQTT) and the feed.

Data flows one way. The `Recorder` copies the source into MPEG-TS segments with wall-clock times; a follower
thread ingests the segment being written (`run_ingest` of a growing file, chunk by chunk, into a store per
segment under the watch's folder) and, for every committed chunk, asks each rule's question of each new frame
(`RuleEvaluator`, one small question per frame). Alerts get the first positive frame's thumbnail; an event's
`end` also gets a short clip cut from the recording (stream copy). Where the watch got to (the trackers' open
events, the last frame judged, which store holds which segment) is saved after every chunk, so a restarted
service resumes without losing or repeating an alert (a repeat would carry the same idempotency key anyway).
Retention removes whole segments past the watch's bounds together with their stores.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from vidmini.watch.alert import Alert
from vidmini.watch.recorder import CLOSED, OPENED, REVISED, Recorder, RecorderEvent, Segment
from vidmini.watch.spec import WatchFolders, WatchSpec

log = logging.getLogger(__name__)

RETAIN_EVERY_S = 30.0  # how often retention runs
GAP_FRAMES = 2.5  # frames' worth of time between two judged frames that counts as an outage for the rules
CLIP_PAD_S = 2.0


@dataclass
class WatchStatus:
    """What `watch list`, the API and the app show of a running watch."""

    name: str
    state: str  # recording | connecting | backoff | paused | stopped | failed
    frames: int = 0
    last_frame: str | None = None  # ISO wall clock of the last frame judged
    open_events: list[str] = field(default_factory=list)
    alerts: int = 0
    segments: int = 0
    disk_bytes: int = 0
    gaps: int = 0
    error: str | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


class WatchRunner:
    """Runs one watch until `stop()`. `submit(alert)` hands each alert on (the dispatcher's outbox, and the feed);
    it must not raise. The engine is shared with everything else the service does (its forward passes are
    thread-safe; the watch's sessions are its own)."""

    def __init__(self, spec: WatchSpec, folders: WatchFolders, engine, submit, *, chunk_frames: int = 1,
                 stall_s: float = 10.0, retain_every_s: float = RETAIN_EVERY_S,
                 recorder_options: dict | None = None) -> None:
        from vidmini.watch.rules import RuleEvaluator, RuleSpec

        self.spec, self.folders, self.engine, self._submit = spec, folders, engine, submit
        self.folder = folders.folder(spec.name)
        self.chunk_frames, self.stall_s, self.retain_every_s = chunk_frames, stall_s, retain_every_s
        state = folders.read_state(spec.name)
        self._stores: dict[str, str] = dict(state.get("stores", {}))  # segment file → store folder
        self._last_judged: datetime | None = (datetime.fromisoformat(state["last_frame"])
                                              if state.get("last_frame") else None)
        self._frames, self._alerts = int(state.get("frames", 0)), int(state.get("alerts", 0))
        rules = [RuleSpec.from_dict(r) for r in spec.rules]
        self.evaluator = RuleEvaluator(engine, spec.name, rules, frame_s=1.0 / spec.fps,
                                       states=state.get("rules") or None)
        self.recorder = Recorder(spec.source, self.folder / "segments", spec.segment_s, stall_s=stall_s,
                                 **(recorder_options or {}))
        self._events = self.recorder.subscribe()
        self._closed: set[str] = set()
        self._stop = threading.Event()
        self._state_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._error: str | None = None
        self._last_retain = 0.0

    # ---- control ------------------------------------------------------------------------------------------
    def start(self) -> WatchRunner:
        self.recorder.start()
        self._thread = threading.Thread(target=self._follow, name=f"vidmini-watch-{self.spec.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop recording (the segment is finished cleanly), then judge what was recorded up to then."""
        self.recorder.stop(timeout)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.recorder.unsubscribe(self._events)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def status(self) -> WatchStatus:
        segments = self.recorder.segments()
        with self._state_lock:
            return WatchStatus(
                self.spec.name, "failed" if self._error else self.recorder.state, self._frames,
                self._last_judged.isoformat() if self._last_judged else None,
                [t.rule for t in self.evaluator.trackers if t.open], self._alerts, len(segments),
                _tree_bytes(self.folder),
                len(self.recorder.gaps()), self._error)

    # ---- the follower thread ------------------------------------------------------------------------------
    def _follow(self) -> None:
        try:
            todo = [s for s in self.recorder.segments() if not self._done_with(s)]
            while not self._stop.is_set() or todo:
                self._drain_events(todo)
                if todo:
                    self._ingest(todo.pop(0))
                elif self._stop.is_set():
                    break
                else:
                    self._drain_events(todo, wait=0.5)
                self._maybe_retain()
        except Exception as e:  # noqa: BLE001 - the watch fails visibly (status), the service goes on
            log.exception("watch %s failed", self.spec.name)
            self._error = " ".join(str(e).split()) or type(e).__name__

    def _drain_events(self, todo: list[Segment], wait: float = 0.0) -> None:
        import queue

        while True:
            try:
                event: RecorderEvent = self._events.get(timeout=wait) if wait else self._events.get_nowait()
            except queue.Empty:
                return
            wait = 0.0
            if event.kind == OPENED and event.segment is not None:
                todo.append(event.segment)
            elif event.kind in (CLOSED, REVISED) and event.segment is not None:
                if event.kind == CLOSED:
                    self._closed.add(event.segment.file)
                for i, s in enumerate(todo):
                    if s.file == event.segment.file:
                        todo[i] = event.segment

    def _done_with(self, segment: Segment) -> bool:
        """A segment recorded before a restart whose frames were all judged."""
        if segment.duration is None or self._last_judged is None:
            return False
        return segment.start + timedelta(seconds=segment.duration) <= self._last_judged

    def _finished(self, segment: Segment) -> bool:
        """The recorder has moved past this segment (or stopped): its ingest ends without an idle wait."""
        if segment.file in self._closed or segment.duration is not None or self._stop.is_set():
            return True
        current = self.recorder.current
        return current is None or current.file != segment.file

    def _latest(self, segment: Segment) -> Segment:
        """The segment as the recorder now knows it: its start is revised as the wall-clock estimate improves."""
        return next((s for s in self.recorder.segments() if s.file == segment.file), segment)

    def _ingest(self, segment: Segment) -> None:
        from vidmini.ingest.job import run_ingest
        from vidmini.ingest.options import IngestOptions

        if not segment.path.exists():
            return  # retained away before it was judged (a very long outage of the model)
        old = self._stores.pop(segment.file, None)
        if old:  # a segment half judged before a restart: ingested afresh, judged from where it stopped
            shutil.rmtree(old, ignore_errors=True)
        def on_chunk(store, first: int, embeddings) -> None:
            self._stores[segment.file] = str(store.path)
            self._judge(store, first, self._latest(segment))

        options = IngestOptions(fps=self.spec.fps, chunk_frames=self.chunk_frames, live=True,
                                idle_timeout=self.stall_s * 2)
        try:
            run_ingest(str(segment.path), self.engine, self.folder, options, on_chunk=on_chunk,
                       finished=lambda: self._finished(segment))
        except Exception as e:  # noqa: BLE001 - a damaged segment: its frames are lost, the watch goes on
            log.warning("watch %s: segment %s: %s", self.spec.name, segment.file, " ".join(str(e).split()))

    def _judge(self, store, first: int, segment: Segment) -> None:
        """The rules over the chunk's frames (those not judged before a restart), in time order."""
        from vidmini.engine.session import VideoSession
        from vidmini.ingest.job import tensors_to_states

        n = store.committed_frames - first
        offsets = store.timestamps()[first : first + n]  # from the segment's first frame, whose wall clock it has
        times = [segment.start + timedelta(seconds=float(t)) for t in offsets]
        keep = [i for i, t in enumerate(times) if self._last_judged is None or t > self._last_judged]
        if keep and self._last_judged is not None and \
                (times[keep[0]] - self._last_judged).total_seconds() > GAP_FRAMES / self.spec.fps:
            # nothing was seen in between (the source dropped, or the service was down): open events end there
            self._hand_on(self.evaluator.gap(self._last_judged, times[keep[0]]))
        if keep:
            span = slice(first, first + n)
            states = tensors_to_states(store.load(frames=span), store.manifest["meta"])
            session = VideoSession.from_states(self.engine, states, [float(t) for t in store.timestamps()[span]])
            frames = range(keep[0], n)
            alerts = self.evaluator.evaluate(session, frames, times[keep[0]:])
            alerts = [self._with_media(a, store, first, times) for a in alerts]
            self._hand_on(alerts)
            with self._state_lock:
                self._frames += len(frames)
                self._last_judged = times[-1]
        self._save_state()

    def _with_media(self, alert: Alert, store, first: int, times: list[datetime]) -> Alert:
        """The event's first frame as its thumbnail (when that frame is in this chunk's store); a clip on `end`."""
        from dataclasses import replace

        start = datetime.fromisoformat(alert.start)
        thumb = None
        for i, t in enumerate(times):
            if abs((t - start).total_seconds()) < 0.5 / self.spec.fps:
                thumb = store.thumbnail(first + i)
        if thumb is None and alert.kind == "new":
            frame = store.committed_frames - 1
            thumb = store.thumbnail(frame)
        clip = None
        if alert.kind == "end" and alert.end is not None:
            clip = self._clip(alert)
        return replace(alert, thumbnail=thumb if alert.kind == "new" else None, clip_path=clip)

    def _clip(self, alert: Alert) -> str | None:
        from vidmini.watch.clips import cut_clip

        start, end = datetime.fromisoformat(alert.start), datetime.fromisoformat(alert.end)
        out = self.folder / "clips" / f"{int(start.timestamp() * 1000)}-{_safe(alert.rule)}.mp4"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            cut_clip(self.recorder.segments(), start, end, out, pad_s=CLIP_PAD_S)
        except Exception as e:  # noqa: BLE001 - the alert still goes out, without its clip
            log.warning("watch %s: no clip for %s: %s", self.spec.name, alert.key, " ".join(str(e).split()))
            return None
        return str(out)

    def _hand_on(self, alerts: list[Alert]) -> None:
        for alert in alerts:
            self._submit(alert)
            with self._state_lock:
                self._alerts += 1

    def _save_state(self) -> None:
        with self._state_lock:
            state = {"rules": self.evaluator.state(), "stores": dict(self._stores), "frames": self._frames,
                     "alerts": self._alerts,
                     "last_frame": self._last_judged.isoformat() if self._last_judged else None}
        self.folders.write_state(self.spec.name, state)

    def _maybe_retain(self) -> None:
        now = time.monotonic()
        if now - self._last_retain < self.retain_every_s:
            return
        self._last_retain = now
        self.retain()

    def retain(self) -> list[str]:
        """Segments past the retention removed, with their stores (never the one being written), and the clips of
        events that started before the oldest segment kept (their footage is gone with it)."""
        removed = self.recorder.retain(max_age_s=self.spec.retain_s, max_bytes=self.spec.retain_bytes)
        files = [s.file if isinstance(s, Segment) else str(s) for s in removed]
        for f in files:
            store = self._stores.pop(f, None)
            if store:
                shutil.rmtree(store, ignore_errors=True)
        if files:
            self._save_state()
            kept = self.recorder.segments()
            if kept:
                oldest_ms = (kept[0].start.timestamp() - CLIP_PAD_S) * 1000
                for clip in (self.folder / "clips").glob("*.mp4"):
                    started = clip.name.split("-", 1)[0]
                    if started.isdigit() and int(started) < oldest_ms:
                        clip.unlink(missing_ok=True)
        return files


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)[:40].strip("-") or "rule"


def _file_bytes(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed by retention meanwhile
        return 0


def _tree_bytes(path: Path) -> int:
    """Bytes under `path`; files that retention removes while this walks count as 0."""
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(_file_bytes(Path(folder, f)) for f in files)
    return total
