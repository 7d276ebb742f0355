"""Times as people read them, one way everywhere (CLI, app, summaries, the demo's questions)."""

from __future__ import annotations


def clock(seconds: float) -> str:
    """m:ss below an hour, h:mm:ss from an hour on; whole seconds, rounded down (a moment at 65.9 s is 1:05)."""
    h, rest = divmod(int(seconds), 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def span(start: float, end: float, always_range: bool = False) -> str:
    """"1:05–1:20"; one clock when both ends fall in the same second, unless `always_range`."""
    a, b = clock(start), clock(end)
    return a if a == b and not always_range else f"{a}–{b}"
