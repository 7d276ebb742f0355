"""Times and time ranges in a video: "1:02:03", "62:03", "3723", "3723.5" → seconds; the frames in a range;
times mentioned in a question ("what happens at 1:05:00?") → a range around them.

Ranges are closed, [start, end], over the frames' sampling timestamps, so "--from 10 --to 20" at 1 fps uses
the 11 frames t = 10 … 20.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# A time named in a question covers this many seconds either side: at 1 fps, 31 frames around the moment —
# enough to see what happens "at" a time without losing the point of asking about it.
QUESTION_TIME_WINDOW_S = 15.0

_CLOCK = re.compile(r"^(\d+)(?::(\d{1,2}))?(?::(\d{1,2}(?:\.\d+)?))?$")
_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")
# h:mm:ss or m:ss in running text; bare numbers ("3 dogs") are never read as times
_IN_TEXT = re.compile(r"(?<![\d:.])(\d{1,3}:\d{2}(?::\d{2})?(?:\.\d+)?)(?![\d:])")


def parse_time(text: str | float | int) -> float:
    """Seconds from "h:mm:ss", "m:ss" (minutes may exceed 59: "62:03") or plain seconds ("3723", "3723.5").

    Fields after the first must be below 60; negative, empty or malformed input is a ValueError.
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a time must be a finite number of seconds >= 0, not {text!r}")
        return value
    if not isinstance(text, str):
        raise ValueError(f"not a time: {text!r}")
    s = text.strip()
    if _SECONDS.match(s):
        return float(s)
    parts = s.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"not a time: {text!r} (use 1:02:03, 62:03 or seconds such as 3723.5)")
    *whole, last = parts
    if not all(p.isdigit() for p in whole) or not _SECONDS.match(last):
        raise ValueError(f"not a time: {text!r} (use 1:02:03, 62:03 or seconds such as 3723.5)")
    fields = [int(p) for p in whole] + [float(last)]
    if any(f >= 60 for f in fields[1:]) or any(len(p) > 2 for p in whole[1:]) or len(last.split(".")[0]) > 2:
        raise ValueError(f"not a time: {text!r} (minutes and seconds after the first field must be 00-59)")
    value = 0.0
    for f in fields:
        value = value * 60 + f
    return value


def format_time(seconds: float) -> str:
    """3723.5 → "1:02:03.5": the inverse of parse_time, for reports."""
    whole = int(seconds)
    h, rem = divmod(whole, 3600)
    m, s = divmod(rem, 60)
    frac = f"{seconds - whole:.3f}".rstrip("0").rstrip(".")[1:] if seconds != whole else ""
    return f"{h}:{m:02d}:{s:02d}{frac}"


@dataclass(frozen=True)
class TimeRange:
    """A closed range of video time in seconds; `source` says where it came from ("explicit", "question")."""

    start: float
    end: float
    source: str = "explicit"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.start) and math.isfinite(self.end)):
            raise ValueError("a time range needs finite bounds")
        if self.end < self.start:
            raise ValueError(f"the range ends ({format_time(self.end)}) before it starts "
                             f"({format_time(self.start)})")

    def frame_span(self, timestamps: Sequence[float] | np.ndarray) -> range:
        """The frames whose timestamps lie in [start, end] (timestamps are sorted), as an index range;
        a ValueError when there are none."""
        ts = np.asarray(timestamps, dtype=np.float64)
        eps = 1e-6  # timestamps are k / fps in float64: "10" must include the frame at 9.999999999
        lo = int(np.searchsorted(ts, self.start - eps, side="left"))
        hi = int(np.searchsorted(ts, self.end + eps, side="right"))
        if hi <= lo:
            span = f"{ts[0]:.1f}-{ts[-1]:.1f} s" if len(ts) else "no frames"
            raise ValueError(f"no frames between {format_time(self.start)} and {format_time(self.end)} "
                             f"(the video has {span})")
        return range(lo, hi)


def make_range(start: str | float | None, end: str | float | None, duration: float | None = None
               ) -> TimeRange | None:
    """The range asked for by --from/--to style bounds; None when neither is given (the whole video)."""
    if start is None and end is None:
        return None
    lo = parse_time(start) if start is not None else 0.0
    if end is not None:
        return TimeRange(lo, parse_time(end))
    # open end: to the end of the video (a start past it then finds no frames, rather than a reversed range)
    return TimeRange(lo, max(lo, duration) if duration is not None else 1e12)


def times_in_question(question: str) -> list[float]:
    """Clock times written in the question ("1:05:00", "12:30"), in seconds, in order of appearance."""
    out = []
    for m in _IN_TEXT.finditer(question):
        try:
            out.append(parse_time(m.group(1)))
        except ValueError:
            continue  # "7:75" is not a time
    return out


def range_from_question(question: str, window_s: float = QUESTION_TIME_WINDOW_S) -> TimeRange | None:
    """The range a question points at: its named times, widened by `window_s` either side (one time: ±window;
    "between 1:00 and 2:00": 0:45 to 2:15). None when it names no time."""
    times = times_in_question(question)
    if not times:
        return None
    return TimeRange(max(0.0, min(times) - window_s), max(times) + window_s, source="question")


def choose_range(question: str, start: str | float | None = None, end: str | float | None = None,
                 duration: float | None = None) -> TimeRange | None:
    """An explicit [start, end] if either bound is given, else a time the question names, else None (whole video)."""
    explicit = make_range(start, end, duration)
    return explicit if explicit is not None else range_from_question(question)
