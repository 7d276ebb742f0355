"""A `VideoSummary` as Markdown, JSON, SRT and WebVTT. The subtitles are the video's speech (its transcript) when
it has one, else its chapters, events or timeline entries as cues (`subtitles`: auto | speech | summary), so a
video player shows them over the video."""

from __future__ import annotations

import json
import textwrap

from vidmini.common.timefmt import clock, span
from vidmini.summaries.summarize import Span, VideoSummary

FORMATS = ("md", "json", "srt", "vtt")
SUBTITLES = ("auto", "speech", "summary")  # auto: the speech when there is a transcript, else the summary's cues
LINE_CHARS = 42  # a subtitle line, as broadcasters and players wrap them
CUE_LINES = 2
CUE_MAX_S = 7.0  # a longer stretch of speech is split into several cues (at word times when the recognizer gave them)
CUE_MIN_S = 0.5

_SPAN = {"type": "object", "required": ["start", "end", "text"],
         "properties": {"start": {"type": "number", "minimum": 0}, "end": {"type": "number", "minimum": 0},
                        "text": {"type": "string"}}}
JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "vidmini summary",
    "type": "object",
    "required": ["schema", "source", "name", "video_id", "model", "mode", "window", "duration", "frames", "summary",
                 "windows", "chapters", "events", "quiet", "timeline", "event_queries"],
    "properties": {
        "schema": {"const": "vidmini.summary/1"},
        "source": {"type": "string"}, "name": {"type": "string"}, "video_id": {"type": "string"},
        "model": {"type": "string"}, "mode": {"enum": ["lecture", "surveillance", "general"]},
        "window": {"type": "number", "exclusiveMinimum": 0}, "duration": {"type": "number", "minimum": 0},
        "frames": {"type": "integer", "minimum": 1}, "summary": {"type": "string"},
        "windows": {"type": "array", "items": _SPAN},
        "chapters": {"type": "array", "items": {
            "type": "object", "required": ["start", "end", "title", "summary"],
            "properties": {"start": {"type": "number"}, "end": {"type": "number"}, "title": {"type": "string"},
                           "summary": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}}}},
        "events": {"type": "array", "items": {
            "type": "object", "required": ["event", "start", "end", "confidence", "peak", "thumbnail"],
            "properties": {"event": {"type": "string"}, "start": {"type": "number"}, "end": {"type": "number"},
                           "confidence": {"type": "number", "minimum": 0, "maximum": 1},
                           "peak": {"type": "number"}, "thumbnail": {"type": ["string", "null"]}}}},
        "quiet": {"type": "array", "items": _SPAN},
        "timeline": {"type": "array", "items": _SPAN},
        "event_queries": {"type": "array", "items": {"type": "string"}},
        "transcript": {"type": "array", "items": {
            "type": "object", "required": ["start", "end", "text", "words"],
            "properties": {"start": {"type": "number", "minimum": 0}, "end": {"type": "number", "minimum": 0},
                           "text": {"type": "string"}, "confidence": {"type": ["number", "null"]},
                           "words": {"type": "array", "items": {
                               "type": "object", "required": ["start", "end", "text"],
                               "properties": {"start": {"type": "number"}, "end": {"type": "number"},
                                              "text": {"type": "string"},
                                              "confidence": {"type": ["number", "null"]}}}}}}},
    },
}


def to_json(s: VideoSummary) -> str:
    return json.dumps(s.to_json(), indent=2, ensure_ascii=False) + "\n"


def to_markdown(s: VideoSummary) -> str:
    lines = [f"# {s.name}", "", f"*{s.mode} summary · {clock(s.duration)} · {s.frames} frames · model {s.model}*", "",
             s.summary, ""]
    if s.mode == "lecture":
        lines += ["## Chapters", ""]
        for i, c in enumerate(s.chapters, 1):
            lines += [f"### {i}. {c.title} ({span(c.start, c.end, always_range=True)})", "", *[x for x in c.summary if x], ""]
    elif s.mode == "surveillance":
        lines += ["## Event log", "", "| start | end | event | confidence | thumbnail |", "| --- | --- | --- | --- | --- |"]
        for start, _, row in _log(s):
            lines.append(row if isinstance(row, str) else
                         f"| {clock(start)} | {clock(row.end)} | {row.event} | {row.confidence:.2f} | "
                         + (f"![]({row.thumbnail})" if row.thumbnail else "") + " |")
        lines.append("")
    else:
        lines += ["## Timeline", ""] + [f"- **{span(t.start, t.end, always_range=True)}** {t.text}" for t in s.timeline] + [""]
    return "\n".join(lines)


def _log(s: VideoSummary) -> list:
    """Events and quiet stretches in time order; a quiet stretch is one table line."""
    rows = [(e.start, 1, e) for e in s.events]
    rows += [(q.start, 0, f"| {clock(q.start)} | {clock(q.end)} | *quiet* | | |") for q in s.quiet]
    return [(start, order, row) for start, order, row in sorted(rows, key=lambda r: (r[0], r[1]))]


def cues(s: VideoSummary) -> list[Span]:
    """What a player shows, in time order: chapters (title, then the two lines), events with their confidence
    and quiet stretches, or timeline entries."""
    if s.mode == "lecture":
        out = [Span(c.start, c.end, "\n".join([c.title, *[x for x in c.summary if x]])) for c in s.chapters]
    elif s.mode == "surveillance":
        out = [Span(e.start, e.end, f"{e.event} ({e.confidence:.2f})") for e in s.events]
        out += [Span(q.start, q.end, "quiet") for q in s.quiet]
    else:
        out = list(s.timeline)
    return sorted((c for c in out if c.end > c.start), key=lambda c: (c.start, c.end, c.text))


def _wrap(text: str) -> str:
    """Subtitle lines of at most LINE_CHARS characters (a longer single word stays whole)."""
    return "\n".join(textwrap.wrap(" ".join(text.split()), LINE_CHARS, break_long_words=False)) or "-"


def _pieces(seg) -> list[Span]:
    """One transcript segment as cues that fit CUE_LINES lines and CUE_MAX_S seconds: cut between words at their
    times when the segment has them, else the text cut into line-sized parts over its time by length."""
    text = " ".join(str(seg.text).split())
    words = [w for w in getattr(seg, "words", ()) or () if str(w.text).strip()]
    limit = LINE_CHARS * CUE_LINES
    out: list[Span] = []
    if words:
        group: list = []
        for w in words:
            joined = " ".join(str(x.text) for x in [*group, w])
            if group and (len(joined) > limit or w.end - group[0].start > CUE_MAX_S):
                out.append(Span(group[0].start, group[-1].end, " ".join(str(x.text) for x in group)))
                group = []
            group.append(w)
        out.append(Span(group[0].start, group[-1].end, " ".join(str(x.text) for x in group)))
        return out
    parts = textwrap.wrap(text, limit, break_long_words=False) or [text]
    total = sum(len(p) for p in parts) or 1
    t = float(seg.start)
    for part in parts:
        dt = (float(seg.end) - float(seg.start)) * len(part) / total
        out.append(Span(t, t + dt, part))
        t += dt
    return out


def speech_cues(s: VideoSummary) -> list[Span]:
    """The transcript as subtitle cues in time order: each at least CUE_MIN_S long where the next allows, none
    overlapping the next, the text wrapped to lines."""
    raw = sorted((c for seg in getattr(s, "transcript", None) or () for c in _pieces(seg) if c.text.strip()),
                 key=lambda c: (c.start, c.end))
    out = []
    for i, c in enumerate(raw):
        end = max(c.end, c.start + CUE_MIN_S)
        if i + 1 < len(raw):
            end = min(end, raw[i + 1].start) if raw[i + 1].start > c.start else end
        if end > c.start:
            out.append(Span(c.start, end, _wrap(c.text)))
    return out


def subtitle_cues(s: VideoSummary, subtitles: str = "auto") -> list[Span]:
    if subtitles not in SUBTITLES:
        raise ValueError(f"subtitles must be one of {', '.join(SUBTITLES)}, got {subtitles!r}")
    if subtitles == "speech" or (subtitles == "auto" and getattr(s, "transcript", None)):
        return speech_cues(s)
    return cues(s)


def _cue_text(text: str) -> str:
    """No blank lines (they end a cue) and no arrow (it marks a timing line) inside a cue."""
    return "\n".join(line for line in text.replace("-->", "→").splitlines() if line.strip()) or "-"


def _stamp(t: float, sep: str) -> str:
    ms = int(round(max(t, 0.0) * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    sec, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{sec:02d}{sep}{ms:03d}"


def to_srt(s: VideoSummary, subtitles: str = "auto") -> str:
    blocks = [f"{i}\n{_stamp(c.start, ',')} --> {_stamp(c.end, ',')}\n{_cue_text(c.text)}\n"
              for i, c in enumerate(subtitle_cues(s, subtitles), 1)]
    return "\n".join(blocks)


def to_vtt(s: VideoSummary, subtitles: str = "auto") -> str:
    blocks = [f"{_stamp(c.start, '.')} --> {_stamp(c.end, '.')}\n{_cue_text(c.text)}\n"
              for c in subtitle_cues(s, subtitles)]
    return "\n".join([f"WEBVTT - {_cue_text(s.name).splitlines()[0]}\n", *blocks])


def render(s: VideoSummary, fmt: str, subtitles: str = "auto") -> str:
    if fmt in ("srt", "vtt"):
        return (to_srt if fmt == "srt" else to_vtt)(s, subtitles)
    return {"md": to_markdown, "json": to_json}[fmt](s)
