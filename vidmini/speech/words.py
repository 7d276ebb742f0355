"""Recognized words grouped into transcript segments at pauses: what every backend hands back."""

from __future__ import annotations

from collections.abc import Iterable

from vidmini.speech.types import Segment, Word

SEGMENT_GAP_S = 0.8  # a pause this long between two words starts a new segment


def segments_from_words(words: Iterable[Word], max_gap_s: float = SEGMENT_GAP_S) -> list[Segment]:
    """Words (in time order) grouped into segments at pauses longer than `max_gap_s`; a segment's confidence is
    the mean of its words' (None when they have none)."""
    groups: list[list[Word]] = []
    for w in sorted(words, key=lambda w: (w.start, w.end)):
        if groups and w.start - groups[-1][-1].end <= max_gap_s:
            groups[-1].append(w)
        else:
            groups.append([w])
    out = []
    for g in groups:
        confs = [w.confidence for w in g if w.confidence is not None]
        conf = round(sum(confs) / len(confs), 4) if confs else None
        out.append(Segment(g[0].start, max(w.end for w in g), " ".join(w.text for w in g), tuple(g), conf))
    return out
