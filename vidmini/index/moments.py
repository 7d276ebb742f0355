"""From matching frames to moments: merge neighbours into segments, collapse near-duplicates, find scene cuts; and
the seen moments merged with the heard ones (spoken words) into one ranked list."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DUPLICATE_COSINE = 0.97  # frames this similar show the same thing (a static scene, a repeated shot)
RRF_K = 10  # reciprocal-rank fusion: a moment ranked r in a list adds weight / (RRF_K + r)
OVERLAP_S = 1.0  # a seen and a heard moment this close (a frame's sampling interval) are one moment, "both"


@dataclass
class Hit:
    video_id: str
    frame: int
    time: float
    score: float


@dataclass
class Moment:
    """A stretch of one video that matches: [start, end] in seconds, its best frame and that frame's score."""

    video_id: str
    start: float
    end: float
    score: float
    frame: int
    time: float
    frames: list[int] = field(default_factory=list)
    thumbnail: bytes | None = None
    source: str = "seen"  # seen (in the frames) | heard (in the speech) | both
    text: str | None = None  # heard, both: what was said
    seen_score: float | None = None  # the best frame's similarity to the query
    heard_score: float | None = None  # the share of the query's words said in it
    rank_score: float | None = None  # the fused rank the merged list is ordered by

    def to_json(self) -> dict:
        out = {"video_id": self.video_id, "start": self.start, "end": self.end, "score": round(self.score, 4),
               "frame": self.frame, "time": self.time, "frames": len(self.frames), "source": self.source}
        if self.text is not None:
            out["text"] = self.text
        return out


def merge_hits(hits: list[Hit], max_gap_s: float) -> list[Moment]:
    """Hits of one video whose times are at most `max_gap_s` apart join one segment (scored by its best hit)."""
    moments: list[Moment] = []
    by_video: dict[str, list[Hit]] = {}
    for h in hits:
        by_video.setdefault(h.video_id, []).append(h)
    for video_id, group in by_video.items():
        group.sort(key=lambda h: h.time)
        current: list[Hit] = [group[0]]
        for h in group[1:]:
            if h.time - current[-1].time <= max_gap_s + 1e-6:
                current.append(h)
            else:
                moments.append(_moment(video_id, current))
                current = [h]
        moments.append(_moment(video_id, current))
    moments.sort(key=lambda m: -m.score)
    return moments


def _moment(video_id: str, hits: list[Hit]) -> Moment:
    best = max(hits, key=lambda h: h.score)
    return Moment(video_id, hits[0].time, hits[-1].time, best.score, best.frame, best.time, [h.frame for h in hits])


def collapse_duplicates(moments: list[Moment], vector_of, threshold: float = DUPLICATE_COSINE,
                        ) -> list[Moment]:
    """Keep moments best first, dropping any whose best frame is a near-duplicate (cosine ≥ threshold) of a
    kept one's: ten hits on one static scene are one moment, not the top ten. The kept moment's span grows
    over a dropped duplicate from the same video when they touch or overlap."""
    kept: list[Moment] = []
    kept_vectors: list[np.ndarray] = []
    for m in sorted(moments, key=lambda m: -m.score):
        v = vector_of(m.video_id, m.frame)
        duplicate = next((i for i, kv in enumerate(kept_vectors) if float(kv @ v) >= threshold), None)
        if duplicate is None:
            kept.append(m)
            kept_vectors.append(v)
            continue
        other = kept[duplicate]
        if other.video_id == m.video_id:
            other.frames.extend(m.frames)
    return kept


def scene_boundaries(vectors: np.ndarray, times: np.ndarray, min_change: float = 0.2, sigma: float = 5.0,
                     min_scene_s: float = 2.0) -> list[float]:
    """Times where a new scene starts: the cosine distance between consecutive frames is a local peak, above
    `min_change` and `sigma` deviations above the video's typical change (so slow drift, camera noise and a
    busy but continuous shot do not cut). Cuts closer than `min_scene_s` keep the stronger."""
    x = np.asarray(vectors, dtype=np.float32)
    if len(x) < 2:
        return []
    change = 1.0 - np.sum(x[1:] * x[:-1], axis=1)
    med = float(np.median(change))
    spread = float(np.median(np.abs(change - med))) * 1.4826 + 1e-6
    limit = max(min_change, med + sigma * spread)
    candidates = [i for i in np.argsort(-change) if change[i] >= limit]
    cuts: list[int] = []
    for i in candidates:
        t = float(times[i + 1])
        if all(abs(t - float(times[j + 1])) >= min_scene_s for j in cuts):
            cuts.append(int(i))
    return sorted(float(times[i + 1]) for i in cuts)


def fuse_moments(seen: list[Moment], heard: list[Moment], k: int, overlap_s: float = OVERLAP_S) -> list[Moment]:
    """One ranked list from the seen moments (best first) and the heard ones (best first), by reciprocal-rank
    fusion: a seen moment adds 1 / (RRF_K + rank), a heard one its share of the query's words / (RRF_K + rank).
    A heard moment within `overlap_s` of a seen one of the same video joins it (the best-ranked one it touches) as
    "both": the span of the two, the spoken text, its `time` and frame those of the words (where a player seeks:
    the frames there are in the seen span too), the two weights added. On a tie a heard moment comes first (every
    word of the query said there). `score` stays each source's own: the best frame's similarity (seen, both) or
    the share of the words said (heard)."""
    fused: list[Moment] = []
    for r, m in enumerate(seen):
        m.seen_score = m.score if m.seen_score is None else m.seen_score
        m.rank_score = 1.0 / (RRF_K + r + 1)
        fused.append(m)
    order = {id(m): 1 for m in fused}
    for r, h in enumerate(heard):
        weight = (h.heard_score if h.heard_score is not None else h.score) / (RRF_K + r + 1)
        partner = next((m for m in fused if m.source == "seen" and m.video_id == h.video_id
                        and h.start - overlap_s <= m.end and m.start <= h.end + overlap_s), None)
        if partner is None:
            h.heard_score = h.score if h.heard_score is None else h.heard_score
            h.rank_score = weight
            fused.append(h)
            order[id(h)] = 0
            continue
        partner.source, partner.text = "both", h.text
        partner.time, partner.frame = h.time, h.frame
        partner.thumbnail = h.thumbnail if h.thumbnail is not None else partner.thumbnail
        partner.frames = sorted({*partner.frames, *h.frames})
        partner.heard_score = h.heard_score if h.heard_score is not None else h.score
        partner.start, partner.end = min(partner.start, h.start), max(partner.end, h.end)
        partner.rank_score = (partner.rank_score or 0.0) + weight
    fused.sort(key=lambda m: (-(m.rank_score or 0.0), order[id(m)], m.start))
    return fused[:k]
