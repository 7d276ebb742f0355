"""A live watch's rules: when a frame-level event probe turns into `new` / `update` / `end` alerts.

Three layers:
  RuleSpec       what the user asked for (the event, its hysteresis, cool-down, threshold, updates); JSON-ready.
  RuleTracker    the pure state machine of one (watch, rule): confidences in, alerts out. No model, no clock.
  RuleEvaluator  a live `VideoSession`'s new frames → one first-token probe per frame per distinct question
                 (`describe.probe_for`; rules whose probes ask the same question share it) → the trackers.

Hysteresis: `on_frames` (k) consecutive positive frames (confidence >= threshold) start an event, `off_frames`
(m) consecutive negative frames end it, so with m > 1 a noisy frame or two inside an event do not split it.

Times. A frame stands for the `frame_s` seconds from its wall-clock time on (1 s at the watches' 1 fps):
  start  the wall-clock time of the FIRST positive frame of the k-run, not of the k-th (the `new` alert is sent
         when the k-th arrives, so it is k - 1 frames late, but it names when the event began);
  end    the time of the last positive frame plus `frame_s` (the end of the last frame that showed it); the `end`
         alert is sent when the m-th negative frame arrives. An outage (`gap`) ends an open event the same way,
         at its last positive frame, whatever comes after.
  So an event seen on frames 10 s … 14 s runs [10 s, 15 s), and one k = 1 frame at t lasts [t, t + frame_s).
Cool-down: after an event of a rule ends (at its `end`), a new one of the same rule cannot start before
end + `cooldown_s`; positive frames earlier than that neither start nor count towards one.

Confidence: the PEAK frame confidence of the event so far, in `new` (peak of the k-run), `update` and `end`
alike: one meaning across an event's alerts, never decreasing from `new` to `end` (a receiver that shows the
latest alert never sees it drop), and not dragged down by the sub-threshold frames the hysteresis bridges.

Keys (`alert.Alert`): `<watch>:<rule>:<start epoch ms>:<kind>` for `new` and `end`; an `update` carries its own
sequence number `…:update:<n>`, n = whole `update_every_s` periods since the start, so updates do not collapse
into one another at a receiver. Everything a key is made of is in `RuleTracker.state()`: a restarted watch
restored from it continues an open event (no second `new`) and re-sends exactly the keys it would have sent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from vidmini.watch.alert import Alert, Kind, parse_time

if TYPE_CHECKING:  # torch-backed: imported where they run
    from vidmini.engine.inference import Engine
    from vidmini.engine.session import VideoSession
    from vidmini.summaries.describe import EventProbe

STATE_VERSION = 1
CONFIDENCE_SLACK = 1e-4  # float rounding of summed probabilities; beyond it a confidence is a caller's error


@dataclass(frozen=True)
class RuleSpec:
    """One rule of a watch. `name` (optional, not in the issue's list) is the rule's id in alerts, keys and saved
    state; the event text itself when not given."""

    event: str
    on_frames: int = 2
    off_frames: int = 3
    cooldown_s: float = 0.0
    threshold: float | None = None  # None: the probe's (describe.EventProbe.threshold)
    update_every_s: float | None = None  # None: no `update` alerts
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.event, str) or not self.event.strip():
            raise ValueError("a rule needs an event description")
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ValueError("a rule's name must be non-empty when given")
        for label, value in (("on_frames", self.on_frames), ("off_frames", self.off_frames)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, not {value!r}")
        if not _number(self.cooldown_s) or self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be a number >= 0, not {self.cooldown_s!r}")
        if self.threshold is not None and not (_number(self.threshold) and 0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold must be in [0, 1] (or None for the probe's), not {self.threshold!r}")
        if self.update_every_s is not None and not (_number(self.update_every_s) and self.update_every_s > 0):
            raise ValueError(f"update_every_s must be > 0 seconds (or None for no updates), not "
                             f"{self.update_every_s!r}")

    @property
    def rule(self) -> str:
        """The rule's id in alerts: `name`, else the event text."""
        return self.name or self.event

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RuleSpec:
        """The inverse of `to_dict`; unknown keys are ignored (a newer writer's extra fields don't break)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _aware(t: datetime, what: str) -> datetime:
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(f"{what} must be a datetime with a time zone, not {t!r}")
    return t


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def _time(s: str | None) -> datetime | None:
    return None if s is None else parse_time(s)


class RuleTracker:
    """The hysteresis of one (watch, rule): `feed` each frame's confidence in time order, get the alerts it
    causes. `threshold` is the fallback when the spec names none (the probe's); `frame_s` is a frame's
    duration (the sampling interval), added to the last positive frame's time to make an event's end."""

    def __init__(self, spec: RuleSpec, watch: str, *, threshold: float = 0.5, frame_s: float = 1.0) -> None:
        if not (_number(threshold) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], not {threshold!r}")
        if not (_number(frame_s) and frame_s > 0):
            raise ValueError(f"frame_s must be > 0 seconds, not {frame_s!r}")
        Alert(watch, spec.rule, "new", "1970-01-01T00:00:00+00:00")  # the watch name's rules are the alert's
        self.spec, self.watch = spec, watch
        self.probe_threshold = float(threshold)
        self.frame_s = float(frame_s)
        self._last: datetime | None = None  # the last frame fed (or an outage's start): frames come after it
        self._run: list[tuple[datetime, float]] = []  # positive frames so far of a run that may start an event
        self._start: datetime | None = None  # the open event's start (None: no event open)
        self._last_positive: datetime | None = None
        self._peak = 0.0
        self._negatives = 0  # consecutive negative frames of the open event
        self._update = 0  # the last update period sent (periods of update_every_s since the start)
        self._cooldown_until: datetime | None = None

    # ---- reading ---------------------------------------------------------------------------------------------
    @property
    def threshold(self) -> float:
        return self.spec.threshold if self.spec.threshold is not None else self.probe_threshold

    @property
    def rule(self) -> str:
        return self.spec.rule

    @property
    def open(self) -> bool:
        return self._start is not None

    # ---- feeding ---------------------------------------------------------------------------------------------
    def feed(self, frame_time: datetime, confidence: float) -> list[Alert]:
        """One frame (later than every frame fed before); the alerts it causes: at most one (a frame that starts
        or ends an event sends no update)."""
        t = _aware(frame_time, "frame_time")
        if not _number(confidence) or not -CONFIDENCE_SLACK <= confidence <= 1 + CONFIDENCE_SLACK:
            raise ValueError(f"confidence must be in [0, 1], not {confidence!r}")
        c = min(max(float(confidence), 0.0), 1.0)
        if self._last is not None and t <= self._last:
            raise ValueError(f"frames must come in time order: {t.isoformat()} is not after "
                             f"{self._last.isoformat()}")
        self._last = t
        positive = c >= self.threshold
        if self._start is not None:
            if positive:
                self._last_positive, self._negatives = t, 0
                self._peak = max(self._peak, c)
            else:
                self._negatives += 1
                if self._negatives >= self.spec.off_frames:
                    return [self._close()]
            return self._maybe_update(t)
        if not positive or (self._cooldown_until is not None and t < self._cooldown_until):
            self._run.clear()
            return []
        self._run.append((t, c))
        if len(self._run) < self.spec.on_frames:
            return []
        self._start, self._last_positive = self._run[0][0], t
        self._peak = max(x for _, x in self._run)
        self._negatives = 0
        self._update = self._period(t)
        self._run.clear()
        return [self._alert("new")]

    def gap(self, since: datetime, until: datetime) -> list[Alert]:
        """The stream was out from `since` to `until`: an open event ends at its last positive frame (its `end`
        alert is returned), a run that had not yet started one is dropped (k frames must be consecutive).
        Frames fed afterwards must come after `since`."""
        since, until = _aware(since, "since"), _aware(until, "until")
        if until < since:
            raise ValueError(f"an outage cannot end ({until.isoformat()}) before it starts ({since.isoformat()})")
        self._run.clear()
        self._last = since if self._last is None else max(self._last, since)
        return [self._close()] if self._start is not None else []

    def _period(self, t: datetime) -> int:
        every = self.spec.update_every_s
        return 0 if every is None else int((t - self._start).total_seconds() // every)

    def _maybe_update(self, t: datetime) -> list[Alert]:
        n = self._period(t)
        if self.spec.update_every_s is None or n <= self._update:
            return []
        self._update = n
        return [self._alert("update", key_suffix=f":{n}")]

    def _close(self) -> Alert:
        end = self._last_positive + timedelta(seconds=self.frame_s)
        alert = self._alert("end", end=end)
        self._cooldown_until = end + timedelta(seconds=self.spec.cooldown_s) if self.spec.cooldown_s > 0 else None
        self._start = self._last_positive = None
        self._peak, self._negatives, self._update = 0.0, 0, 0
        return alert

    def _alert(self, kind: Kind, end: datetime | None = None, key_suffix: str = "") -> Alert:
        start = self._start.isoformat(timespec="milliseconds")
        alert = Alert(self.watch, self.rule, kind, start, None if end is None else end.isoformat(timespec="milliseconds"),
                      confidence=self._peak)
        if key_suffix:  # keep the default key's derivation (alert.py) and only extend it
            alert = Alert(alert.watch, alert.rule, kind, alert.start, alert.end, alert.confidence,
                          key=alert.key + key_suffix)
        return alert

    # ---- persistence -----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-ready: everything `feed` depends on (times at full precision, so restored keys are the same)."""
        return {
            "version": STATE_VERSION, "watch": self.watch, "rule": self.rule,
            "probe_threshold": self.probe_threshold, "frame_s": self.frame_s,
            "last": _iso(self._last), "run": [[t.isoformat(), c] for t, c in self._run],
            "open": None if self._start is None else {
                "start": self._start.isoformat(), "last_positive": self._last_positive.isoformat(),
                "peak": self._peak, "negatives": self._negatives, "update": self._update},
            "cooldown_until": _iso(self._cooldown_until),
        }

    @classmethod
    def restore(cls, spec: RuleSpec, watch: str, state: dict[str, Any]) -> RuleTracker:
        """A tracker continuing where `state()` left off (an open event stays open: no second `new`). The spec is
        the current one (its k, m, cool-down and threshold apply from here on); the state must be this rule's."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported rule state version {state.get('version')!r}")
        if state.get("watch") != watch or state.get("rule") != spec.rule:
            raise ValueError(f"this state is rule {state.get('rule')!r} of watch {state.get('watch')!r}, not "
                             f"{spec.rule!r} of {watch!r}")
        tracker = cls(spec, watch, threshold=state["probe_threshold"], frame_s=state["frame_s"])
        tracker._last = _time(state.get("last"))
        tracker._run = [(parse_time(t), float(c)) for t, c in state.get("run", [])]
        if (event := state.get("open")) is not None:
            tracker._start, tracker._last_positive = parse_time(event["start"]), parse_time(event["last_positive"])
            tracker._peak, tracker._negatives = float(event["peak"]), int(event["negatives"])
            tracker._update = int(event["update"])
        tracker._cooldown_until = _time(state.get("cooldown_until"))
        return tracker


class RuleEvaluator:
    """A watch's rules over a live session. Probes are built once (`probe_for(event, engine)`); per new frame each
    distinct probe question is asked once over that frame alone (rules on the same template, e.g. several words
    for the demo model, share it), and every rule's confidence goes to its tracker.

    `states`: saved `state()` to resume from (rule → tracker state; rules without one start fresh)."""

    def __init__(self, engine: Engine, watch: str, specs: Sequence[RuleSpec], *, frame_s: float = 1.0,
                 states: dict[str, dict[str, Any]] | None = None) -> None:
        from vidmini.summaries.describe import probe_for

        rules = [s.rule for s in specs]
        if len(set(rules)) != len(rules):
            raise ValueError(f"a watch's rules need distinct names: {rules}")
        self.engine, self.watch, self.specs = engine, watch, list(specs)
        self.probes: list[EventProbe] = [probe_for(s.event, engine) for s in self.specs]
        states = states or {}
        self.trackers = [
            RuleTracker.restore(s, watch, states[s.rule]) if s.rule in states
            else RuleTracker(s, watch, threshold=p.threshold, frame_s=frame_s)
            for s, p in zip(self.specs, self.probes, strict=True)]
        self.questions = 0  # model calls made (one per frame per distinct question)
        self.last_confidences: list[float] = []

    def confidences(self, session: VideoSession, frame: int) -> list[float]:
        """Each rule's confidence on one frame (index into the session), from that frame alone."""
        import torch

        t = float(session.timestamps[frame])
        probs: dict[str, torch.Tensor] = {}
        for probe in self.probes:
            if probe.question not in probs:
                logits = session.first_logits(probe.question, t, t, "all")
                probs[probe.question] = torch.softmax(logits.reshape(-1, logits.shape[-1])[-1].float(), -1).cpu()
                self.questions += 1
        return [probe.confidence(probs[probe.question]) for probe in self.probes]

    def evaluate(self, session: VideoSession, frames: range, times: Sequence[datetime]) -> list[Alert]:
        """The session's new `frames` (their wall-clock `times`), in order: the alerts they cause, in time order."""
        if len(times) != len(frames):
            raise ValueError(f"one time per frame: {len(frames)} frames, {len(times)} times")
        if len(frames) and (frames.step != 1 or frames.start < 0 or frames.stop > session.num_frames):
            raise ValueError(f"frames {frames} are not consecutive frames of the session "
                             f"({session.num_frames} frames)")
        alerts: list[Alert] = []
        for frame, t in zip(frames, times, strict=True):
            self.last_confidences = self.confidences(session, frame)
            for tracker, c in zip(self.trackers, self.last_confidences, strict=True):
                alerts += tracker.feed(t, c)
        return alerts

    def gap(self, since: datetime, until: datetime) -> list[Alert]:
        """A stream outage (or the stream's end): every open event ends at its last positive frame."""
        return [a for tracker in self.trackers for a in tracker.gap(since, until)]

    def state(self) -> dict[str, dict[str, Any]]:
        """Rule → tracker state, for `RuleEvaluator(..., states=...)` after a restart."""
        return {t.rule: t.state() for t in self.trackers}
