"""From matching frames to moments: merge neighbours into segments, collapse near-duplicates, find scene cuts."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DUPLICATE_COSINE = 0.97  # frames this similar show the same thing (a static scene, a repeated shot)


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

    def to_json(self) -> dict:
        return {"video_id": self.video_id, "start": self.start, "end": self.end, "score": round(self.score, 4),
                "frame": self.frame, "time": self.time, "frames": len(self.frames)}


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
