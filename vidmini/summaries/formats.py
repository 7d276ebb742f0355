"""A `VideoSummary` as Markdown, JSON, SRT and WebVTT (chapters, events and timeline entries as cues, so a video
player shows them over the video)."""

from __future__ import annotations

import json

from vidmini.common.timefmt import clock, span
from vidmini.summaries.summarize import Span, VideoSummary

FORMATS = ("md", "json", "srt", "vtt")

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


def _cue_text(text: str) -> str:
    """No blank lines (they end a cue) and no arrow (it marks a timing line) inside a cue."""
    return "\n".join(line for line in text.replace("-->", "→").splitlines() if line.strip()) or "-"


def _stamp(t: float, sep: str) -> str:
    ms = int(round(max(t, 0.0) * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    sec, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{sec:02d}{sep}{ms:03d}"


def to_srt(s: VideoSummary) -> str:
    blocks = [f"{i}\n{_stamp(c.start, ',')} --> {_stamp(c.end, ',')}\n{_cue_text(c.text)}\n"
              for i, c in enumerate(cues(s), 1)]
    return "\n".join(blocks)


def to_vtt(s: VideoSummary) -> str:
    blocks = [f"{_stamp(c.start, '.')} --> {_stamp(c.end, '.')}\n{_cue_text(c.text)}\n" for c in cues(s)]
    return "\n".join([f"WEBVTT - {_cue_text(s.name).splitlines()[0]}\n", *blocks])


def render(s: VideoSummary, fmt: str) -> str:
    return {"md": to_markdown, "json": to_json, "srt": to_srt, "vtt": to_vtt}[fmt](s)
