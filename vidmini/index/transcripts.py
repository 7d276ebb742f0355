"""Spoken words as moments: BM25 over the transcripts' segments (rank-bm25), one moment per matching segment,
spanning the words of the query that were said in it.

The corpus is every transcript segment of the videos searched (a video's best transcript: see
`TranscriptStore.best`); it is rebuilt only when a transcript's manifest changed. Transcripts are keyed by the
video's content fingerprint, so one transcript serves every stored video (model) of that content.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vidmini.index.moments import Moment
from vidmini.speech.store import TRANSCRIPTS, TranscriptStore
from vidmini.speech.types import Segment
from vidmini.store.video_store import StoreCatalog, UnknownVideo

_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)?")
# words that carry no topic: a question's frame ("when does she say ...") must not match every segment
STOPWORDS = frozenset("""
a an the and or but if of to in on at by for with from as is are was were be been being am do does did doing done
have has had it its this that these those there here i you he she we they me him her us them my your his our their
what when where which who whom why how whether not no so than too very can could will would shall should may might
must about into over under again then once any all each few more most other some such only own same just
say says said saying mention mentions mentioned talk talks talked speak speaks spoke spoken hear heard word words
someone somebody anyone video moment moments time find show me
""".split())


def tokens(text: str) -> list[str]:
    return [t.lower() for t in _TOKEN.findall(text)]


def query_terms(text: str) -> list[str]:
    """The query's words that name what to look for (stop words dropped, unless nothing else is left)."""
    words = list(dict.fromkeys(tokens(text)))
    kept = [w for w in words if w not in STOPWORDS]
    return kept or words


@dataclass(frozen=True)
class _Doc:
    video_fp: str
    segment: Segment


class TranscriptSearch:
    """Text search over the transcripts under a data root."""

    def __init__(self, root: str | Path, catalog: StoreCatalog | None = None) -> None:
        self.root = Path(root)
        self.catalog = catalog or StoreCatalog(self.root)
        self._signature: tuple | None = None
        self._docs: list[_Doc] = []
        self._tokens: list[list[str]] = []
        self._bm25 = None
        self._lock = threading.Lock()  # one corpus rebuild at a time; searches read a consistent corpus

    # ---- the corpus ---------------------------------------------------------------------------------------------
    def _manifests(self) -> tuple:
        folder = self.root / TRANSCRIPTS
        if not folder.is_dir():
            return ()
        out = []
        for m in sorted(folder.glob("*/*/manifest.json")):
            try:
                st = m.stat()
            except OSError:
                continue
            out.append((str(m), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def _corpus(self) -> None:
        """(Re)build the corpus when a transcript changed since the last search."""
        signature = self._manifests()
        if signature == self._signature:
            return
        from rank_bm25 import BM25Plus

        docs, toks = [], []
        for fp in sorted({Path(m).parent.parent.name for m, _, _ in signature}):
            best = TranscriptStore.best(self.root, fp)
            if best is None:
                continue
            try:
                segments = best.segments()
            except (OSError, ValueError, KeyError):
                continue  # a window file missing or damaged: that video is not searchable by speech
            for s in segments:
                t = tokens(s.text)
                if t:
                    docs.append(_Doc(fp, s))
                    toks.append(t)
        self._docs, self._tokens = docs, toks
        self._bm25 = BM25Plus(toks) if toks else None
        self._signature = signature

    # ---- search -------------------------------------------------------------------------------------------------
    def search(self, text: str, video: str | None = None, k: int = 10) -> list[Moment]:
        """Up to k heard moments, best first: segments that contain at least one of the query's words, ranked by
        BM25; each moment's span is that of the query's words in the segment, `score` the share of the query's
        words that were said there, `text` the segment's text."""
        if k < 1:
            raise ValueError("k must be at least 1")
        terms = query_terms(text)
        if not terms:
            return []
        with self._lock:
            self._corpus()
            bm25, docs, toks = self._bm25, self._docs, self._tokens
        if bm25 is None:
            return []
        stores = self._stores(video)
        if not stores:
            return []
        scores = np.asarray(bm25.get_scores(terms), dtype=np.float64)
        wanted = set(terms)
        found: list[tuple[float, float, _Doc, set[str]]] = []
        for i, doc in enumerate(docs):
            if doc.video_fp not in stores:
                continue
            matched = wanted & set(toks[i])
            if matched:
                found.append((scores[i], len(matched) / len(wanted), doc, matched))
        found.sort(key=lambda f: (-f[1], -f[0], f[2].segment.start))  # every word said beats a higher BM25 on some
        moments: list[Moment] = []
        for _, coverage, doc, matched in found:
            for video_id, times, thumb in stores[doc.video_fp]:
                moments.append(_heard(video_id, doc.segment, matched, coverage, times, thumb))
            if len(moments) >= k:
                break
        return moments[:k]

    def _stores(self, video: str | None) -> dict[str, list]:
        """fingerprint → [(video id, frame times, thumbnail getter)] of the stored videos searched."""
        if video is not None:
            stores = [self.catalog.get(video)]  # UnknownVideo for an id that names none
        else:
            stores = []
            for info in self.catalog.list():
                if info.failed or not info.frames:
                    continue
                try:
                    stores.append(self.catalog.get(info.video_id))
                except UnknownVideo:
                    continue
        out: dict[str, list] = {}
        for store in stores:
            fp = store.manifest["key"]["video_fp"]
            out.setdefault(fp, []).append((store.video_id, _Lazy(store.timestamps), store.thumbnail))
        return out


class _Lazy:
    """A store's frame times, read on first use (only videos with a hit pay for it)."""

    def __init__(self, read) -> None:
        self._read, self._value = read, None

    def __call__(self) -> np.ndarray:
        if self._value is None:
            self._value = self._read()
        return self._value


def _heard(video_id: str, s: Segment, matched: set[str], coverage: float, times: _Lazy, thumbnail) -> Moment:
    """A moment over the query's words in segment `s` (the whole segment when it has no word times); its frame
    is the stored frame nearest the first of them."""
    words = [w for w in s.words if set(tokens(w.text)) & matched]
    start, end = (words[0].start, words[-1].end) if words else (s.start, s.end)
    ts = times()
    frame = int(np.argmin(np.abs(ts - start))) if len(ts) else 0
    m = Moment(video_id, float(start), float(max(end, start)), float(coverage), frame, float(start), [frame],
               source="heard", text=s.text)
    m.heard_score = float(coverage)
    if len(ts):
        try:
            m.thumbnail = thumbnail(frame)
        except (LookupError, IndexError, OSError):
            m.thumbnail = None
    return m
