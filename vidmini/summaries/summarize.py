"""One stored video → windows → descriptions → chapters, an event log, or a timeline (hierarchical summaries).

Every question covers only its window's frames (the session's time range), so a window costs a prefill over
its own frame tokens, never the whole video's. Times: frames sit at their sampling times; a boundary between
two frames is put half-way between them (the true change lies somewhere in that interval), a window grid
boundary at its grid time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from vidmini.common.timefmt import clock, span
from vidmini.summaries.describe import Asker, Description, EventProbe, describer_for, frame_step

if TYPE_CHECKING:
    from vidmini.engine.speech_prompt import SpeechContext

MODES = ("lecture", "surveillance", "general")
DEFAULT_WINDOW = {"lecture": 60.0, "general": 60.0, "surveillance": 10.0}

Progress = Callable[[int, int], None]  # (frames covered, frames in the video)


@dataclass
class Span:
    start: float
    end: float
    text: str


@dataclass
class Chapter:
    start: float
    end: float
    title: str
    summary: list[str]  # two lines (a third quotes what was said, where the describer adds it)


@dataclass
class Event:
    event: str
    start: float
    end: float
    confidence: float
    peak: float  # time of the most confident frame (the thumbnail's)
    thumbnail: str | None = None  # path relative to the output folder, set when written


@dataclass
class VideoSummary:
    """Everything one input produced; `thumbnails` (name → JPEG) is written beside the outputs, not in JSON."""

    source: str
    name: str
    video_id: str
    model: str
    mode: str
    window: float
    duration: float
    frames: int
    summary: str
    windows: list[Span]
    chapters: list[Chapter] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    quiet: list[Span] = field(default_factory=list)
    timeline: list[Span] = field(default_factory=list)
    event_queries: list[str] = field(default_factory=list)
    transcript: list = field(default_factory=list)  # the audio's segments (vidmini.speech.types.Segment), in time order
    thumbnails: dict[str, bytes] = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("thumbnails")
        out = {"schema": "vidmini.summary/1", **out}
        return _round(out)


def _round(x):
    if isinstance(x, float):
        return round(x, 3)
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_round(v) for v in x]
    return x


@dataclass
class SummarizeOptions:
    mode: str = "general"
    window: float | None = None  # seconds; None: DEFAULT_WINDOW[mode]
    events: tuple[str, ...] = ()
    quiet_min: float = 2.0  # shortest event-free stretch listed as quiet (seconds)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if self.window is not None and self.window <= 0:
            raise ValueError("--window must be > 0 seconds")
        if self.mode == "surveillance" and not self.events:
            raise ValueError('surveillance mode needs events: --events "a person enters" ...')

    @property
    def window_s(self) -> float:
        return float(self.window or DEFAULT_WINDOW[self.mode])


# ---- pieces of time ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Piece:
    frames: range
    start: float
    end: float


def pieces(timestamps: np.ndarray, duration: float, window: float, cuts: Sequence[float] = ()) -> list[Piece]:
    """The video split on a `window`-second grid and, when given, at scene cuts (first frame times of new
    scenes); each piece knows its frames and its time bounds."""
    ts = np.asarray(timestamps, dtype=np.float64)
    bounds: dict[int, float] = {0: 0.0}
    k = 1
    while k * window < ts[-1] + 1e-9:
        i = int(np.searchsorted(ts, k * window - 1e-6))
        bounds.setdefault(i, k * window)
        k += 1
    for t in cuts:
        i = int(np.searchsorted(ts, t - 1e-6))
        if 0 < i < len(ts):
            bounds[i] = (ts[i - 1] + ts[i]) / 2  # a cut beats a grid line on the same frame
    starts = sorted(bounds)
    ends = starts[1:] + [len(ts)]
    return [Piece(range(a, b), bounds[a], bounds[b] if b in bounds else duration)
            for a, b in zip(starts, ends, strict=True) if b > a]


def _edge(ts: np.ndarray, i: int, duration: float, side: str) -> float:
    """The time between frame i and its neighbour on `side` (the video's edge past the first/last frame)."""
    if side == "left":
        return 0.0 if i == 0 else float(ts[i - 1] + ts[i]) / 2
    return duration if i == len(ts) - 1 else float(ts[i] + ts[i + 1]) / 2


# ---- the modes -----------------------------------------------------------------------------------------------
def summarize_session(session, opts: SummarizeOptions, *, source: str, video_id: str, duration: float | None,
                      cuts: Sequence[float] = (), thumbnail: Callable[[int], bytes | None] | None = None,
                      on_progress: Progress | None = None, transcript: Sequence = (),
                      speech: SpeechContext | None = None) -> VideoSummary:
    """Summarize an open `VideoSession`. `cuts`: scene starts from the index (lecture chapters split there);
    `thumbnail(frame)`: JPEG bytes of a stored frame, for the event log; `transcript`: the video's speech
    segments, carried into the summary (its JSON, and the subtitles), and what each lecture chapter's title and lines
    are made from besides the frames; `speech`: how the model's prompts get that speech (None: the frames alone)."""
    asker = Asker(session, speech=speech)
    ts = np.asarray(session.timestamps, dtype=np.float64)
    duration = float(duration) if duration else float(ts[-1] + frame_step(ts))
    describer = describer_for(session.engine)
    name = source.rsplit("/", 1)[-1]
    out = VideoSummary(source, name, video_id, session.engine.name, opts.mode, opts.window_s, duration, len(ts),
                       "", [], event_queries=list(opts.events), transcript=list(transcript))
    report = on_progress or (lambda done, total: None)
    everything = range(len(ts))
    if opts.mode == "surveillance":
        _events(asker, opts, ts, duration, out, thumbnail, report)
        return out
    parts = pieces(ts, duration, opts.window_s, cuts if opts.mode == "lecture" else ())
    described: list[tuple[Piece, Description]] = []
    for p in parts:
        described.append((p, describer.describe(asker, p.frames)))
        report(p.frames.stop, len(ts))
    out.windows = [Span(p.start, p.end, d.text) for p, d in described]
    overview = [(p.start, p.end, d) for p, d in described]
    if opts.mode == "lecture":
        for run in _same_topic_runs(described):
            frames = range(run[0][0].frames.start, run[-1][0].frames.stop)
            start, end = run[0][0].start, run[-1][0].end
            heard = [seg for seg in out.transcript if seg.end > start and seg.start < end]
            title, lines = describer.chapter(asker, frames, [d for _, d in run], start, end, heard)
            out.chapters.append(Chapter(run[0][0].start, run[-1][0].end, title, lines))
    else:
        out.timeline = list(out.windows)
    out.summary = describer.overall(asker, everything, overview)
    return out


def _same_topic_runs(described: list[tuple[Piece, Description]]) -> list[list[tuple[Piece, Description]]]:
    """Adjacent pieces on the same topic merged (a false scene cut inside a topic joins up again)."""
    runs: list[list[tuple[Piece, Description]]] = []
    for item in described:
        if runs and runs[-1][-1][1].topic == item[1].topic:
            runs[-1].append(item)
        else:
            runs.append([item])
    return runs


def scan_event(asker: Asker, probe: EventProbe, ts: np.ndarray, window: float,
               report: Progress | None = None) -> dict[int, float]:
    """Per-frame confidences where they were needed: coarse windows first (one question each); frame by frame
    inside windows that look likely; then outwards from every positive frame until the event is gone (an event
    that only grazes a window still gets its exact edges from the neighbouring frames)."""
    conf: dict[int, float] = {}

    def frame(i: int) -> float:
        if i not in conf:
            conf[i] = probe.confidence(asker.token_probs(probe.question, range(i, i + 1), probe.ids))
        return conf[i]

    for p in pieces(ts, float(ts[-1]) + 1, window):
        if probe.confidence(asker.token_probs(probe.question, p.frames, probe.ids)) >= probe.scan_threshold:
            for i in p.frames:
                frame(i)
        if report is not None:
            report(p.frames.stop, len(ts))
    todo = [i for i, c in conf.items() if c >= probe.threshold]
    while todo:
        i = todo.pop()
        for j in (i - 1, i + 1):
            if 0 <= j < len(ts) and j not in conf and frame(j) >= probe.threshold:
                todo.append(j)
    return conf


def intervals(conf: dict[int, float], threshold: float, max_gap: int = 1) -> list[list[int]]:
    """Runs of positive frames, joined across gaps of up to `max_gap` negative frames (one noisy frame does
    not split an event)."""
    runs: list[list[int]] = []
    for i in sorted(i for i, c in conf.items() if c >= threshold):
        if runs and i - runs[-1][-1] <= max_gap + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _events(asker: Asker, opts: SummarizeOptions, ts: np.ndarray, duration: float, out: VideoSummary,
            thumbnail, report: Progress) -> None:
    from vidmini.summaries.describe import probe_for

    probes = [probe_for(e, asker.engine) for e in opts.events]
    asker.track.update(i for p in probes for i in p.ids)
    events: list[Event] = []
    jpegs: dict[int, bytes | None] = {}
    for n, probe in enumerate(probes):
        conf = scan_event(asker, probe, ts, opts.window_s,
                          lambda done, total, n=n: report(n * total + done, total * len(probes)))
        for run in intervals(conf, probe.threshold):
            values = [conf.get(i, 0.0) for i in range(run[0], run[-1] + 1)]
            peak = run[int(np.argmax([conf[i] for i in run]))]
            events.append(Event(probe.event, _edge(ts, run[0], duration, "left"), _edge(ts, run[-1], duration, "right"),
                                float(np.mean(values)), float(ts[peak])))
            jpegs[id(events[-1])] = thumbnail(peak) if thumbnail is not None else None
    events.sort(key=lambda e: (e.start, e.end, e.event))
    for i, e in enumerate(events, 1):  # named in time order
        if jpegs[id(e)]:
            e.thumbnail = f"event-{i:03d}.jpg"
            out.thumbnails[e.thumbnail] = jpegs[id(e)]
    out.events = events
    out.quiet = quiet_spans(events, duration, opts.quiet_min)
    counts = {e: sum(1 for x in events if x.event == e) for e in opts.events}
    quiet_s = sum(q.end - q.start for q in out.quiet)
    out.summary = (f"{len(events)} event interval{'s' if len(events) != 1 else ''} in {clock(duration)}: "
                   + "; ".join(f'"{e}" ×{c}' for e, c in counts.items())
                   + f". Quiet for {quiet_s / duration:.0%} of the time.")
    out.windows = [Span(p.start, p.end, ", ".join(sorted({e.event for e in events if e.start < p.end and
                                                          e.end > p.start})) or "quiet")
                   for p in pieces(ts, duration, opts.window_s)]


def quiet_spans(events: Sequence[Event], duration: float, min_s: float) -> list[Span]:
    """The stretches with no event at all, each as one line (only those at least `min_s` long)."""
    spans, t = [], 0.0
    for e in sorted(events, key=lambda e: e.start):
        if e.start - t >= min_s:
            spans.append(Span(t, e.start, f"quiet {span(t, e.start, always_range=True)}"))
        t = max(t, e.end)
    if duration - t >= min_s:
        spans.append(Span(t, duration, f"quiet {span(t, duration, always_range=True)}"))
    return spans
