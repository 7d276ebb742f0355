"""Moment search: a text query → the best-matching stretches of video, merged, de-duplicated, with thumbnails."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from vidmini.engine.retrieval import RetrievalSpace, SearchUnavailable
from vidmini.index.library import LibraryIndex, NotIndexed
from vidmini.index.moments import Moment, collapse_duplicates, merge_hits, scene_boundaries

WHEN_QUESTION = re.compile(r"^\s*(when\b|at what (time|point|moment)\b|what time\b|find\b|show me\b)", re.I)
CANDIDATES_PER_RESULT = 20  # frames fetched per moment asked for, before merging and collapsing
KEEP_FRACTION = 0.5  # a candidate is a hit when it scores in the upper half of the candidates' range


def strong_hits(hits: list) -> list:
    """The candidates that really match: scoring in the upper part of the range between the best and the worst
    candidate. Without this a short video's every frame is a candidate and one segment spans it all."""
    scores = np.array([h.score for h in hits])
    floor = scores.max() - KEEP_FRACTION * (scores.max() - scores.min())
    return [h for h in hits if h.score >= floor]


class MomentSearch:
    def __init__(self, root: str | Path, space: RetrievalSpace | None, index: LibraryIndex | None = None) -> None:
        self.space = space
        self.index = index or LibraryIndex(root)

    def _require_space(self) -> RetrievalSpace:
        if self.space is None:
            raise SearchUnavailable("search is unavailable: this model has no text tower to embed queries "
                                    "(the default demo model and CLIP-based checkpoints have one)")
        return self.space

    def search(self, text: str, video: str | None = None, k: int = 10, gap_s: float | None = None) -> list[Moment]:
        """Up to k moments, best first. Frames within `gap_s` (default: 1.5 sampling intervals) merge."""
        if not text.strip():
            raise ValueError("empty search query")
        if k < 1:
            raise ValueError("k must be at least 1")
        query = self._require_space().embed_text([text])[0].numpy()
        hits = self.index.search(query, max(k * CANDIDATES_PER_RESULT, 200), video)
        if not hits:
            return []
        hits = strong_hits(hits)
        moments = merge_hits(hits, gap_s if gap_s is not None else self._gap(hits))
        vectors: dict[str, np.ndarray] = {}

        def vector_of(video_id: str, frame: int) -> np.ndarray:
            if video_id not in vectors:
                vectors[video_id] = self.index.frame_vectors(video_id)
            return vectors[video_id][frame]

        out = collapse_duplicates(moments, vector_of)[:k]
        for m in out:
            m.thumbnail = self.index.library.get(m.video_id).thumbnail(m.frame)
        return out

    def _gap(self, hits) -> float:
        """1.5 × the median sampling interval of the videos hit (1.5 s at 1 fps)."""
        intervals = []
        for video_id in {h.video_id for h in hits}:
            t = self.index.library.get(video_id).timestamps()
            if len(t) > 1:
                intervals.append(float(np.median(np.diff(t))))
        return 1.5 * (float(np.median(intervals)) if intervals else 1.0)

    def scenes(self, video: str) -> list[float]:
        """Scene start times of a video (from changes between consecutive frames' embeddings)."""
        store = self.index.library.get(video)
        return scene_boundaries(self.index.frame_vectors(store.video_id), store.timestamps())


def is_when_question(question: str) -> bool:
    """"When does the red circle appear?", "At what time …", "Find …": answered with moments too."""
    return bool(WHEN_QUESTION.match(question))


def frame_picker(search: MomentSearch, video_id: str) -> Callable[[str, Sequence[int], int], list[int]] | None:
    """The `retrieved:K` policy's picker for one stored video: the K frames of the frame set most similar to
    the question in the retrieval space, in time order. None when the video or model cannot be searched."""
    if search.space is None:
        return None
    try:
        vectors = search.index.frame_vectors(video_id)
    except NotIndexed:
        return None
    space = search.space

    def pick(question: str, frames: Sequence[int], k: int) -> list[int]:
        query = space.embed_text([question])[0].numpy()
        candidates = np.asarray(frames, dtype=np.int64)
        best = candidates[np.argsort(-(vectors[candidates] @ query), kind="stable")[:k]]
        return sorted(int(i) for i in best)

    return pick
