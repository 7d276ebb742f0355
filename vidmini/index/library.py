"""The moment-search indexes of a data root: one per video and one over the whole library.

Layout, beside the stores (`<root>/videos/`):
  <root>/index/videos/<video_id>.faiss (+ .json)   ids = frame numbers
  <root>/index/library.faiss (+ .json)             ids = video number << 32 | frame
  <root>/index/library.json                        video id → number, and how many frames each has indexed

The stores are the truth; indexes are derived and rebuilt from the stores' embeddings when missing, corrupt or
behind (`sync`). Writers take `<root>/index/.lock`.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from vidmini.common.files import atomic_write
from vidmini.index.moments import Hit
from vidmini.index.vectors import EXACT_LIMIT, FrameVectors, IndexCorrupt
from vidmini.store.video_store import StoreCatalog, UnknownVideo, VideoStore

FRAME_BITS = 32


class NotIndexed(RuntimeError):
    """The video has no retrieval embeddings (a model without a text tower, or an older ingest)."""


class LibraryIndex:
    def __init__(self, root: str | Path, exact_limit: int = EXACT_LIMIT) -> None:
        self.root = Path(root)
        self.dir = self.root / "index"
        self.exact_limit = exact_limit
        self.library = StoreCatalog(self.root)
        self._loaded: dict[str, FrameVectors] = {}
        self._all: FrameVectors | None = None
        self.rebuilt: list[str] = []  # what sync/loads had to rebuild, for reports and tests

    # ---- bookkeeping ---------------------------------------------------------------------------------------
    @contextmanager
    def _lock(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        with (self.dir / ".lock").open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _table(self) -> dict:
        try:
            table = json.loads((self.dir / "library.json").read_text())
            if isinstance(table.get("videos"), dict) and isinstance(table.get("next"), int):
                return table
        except (OSError, ValueError):
            pass
        return {"videos": {}, "next": 0, "dim": None}

    def _save_table(self, table: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / "library.json", json.dumps(table, indent=1).encode())

    def _video_path(self, video_id: str) -> Path:
        return self.dir / "videos" / f"{video_id}.faiss"

    @staticmethod
    def _embeddings(store: VideoStore, start: int = 0) -> np.ndarray:
        vectors = store.embeddings(slice(start, store.committed_frames))
        if vectors is None:
            raise NotIndexed(f"video {store.video_id} was ingested without retrieval embeddings (the model has no "
                             "text tower, or the store predates search); re-ingest it with a model that has one")
        return vectors.float().numpy()

    # ---- per video ---------------------------------------------------------------------------------------
    def video(self, video_id: str) -> FrameVectors:
        """The video's index, rebuilt from its store when missing, corrupt or behind the store."""
        store = self.library.get(video_id)
        cached = self._loaded.get(store.video_id)
        if cached is not None and cached.size == store.committed_frames:
            return cached
        path = self._video_path(store.video_id)
        try:
            index = FrameVectors.load(path)
            if index.size != store.committed_frames:
                raise IndexCorrupt(f"{path}: {index.size} frames indexed, store has {store.committed_frames}")
        except IndexCorrupt:
            vectors = self._embeddings(store)
            index = FrameVectors.build(vectors, np.arange(len(vectors)), vectors.shape[1], self.exact_limit)
            with self._lock():
                index.save(path)
            self.rebuilt.append(store.video_id)
        self._loaded[store.video_id] = index
        return index

    # ---- the library ---------------------------------------------------------------------------------------
    def _build_all(self, table: dict) -> FrameVectors:
        parts, ids, dim = [], [], table.get("dim")
        infos = self.library.list()
        for info in infos:
            if not info.frames or info.failed:
                continue
            store = VideoStore.load_existing(info.path)
            try:
                vectors = self._embeddings(store)
            except NotIndexed:
                continue
            num = table["videos"].setdefault(store.video_id, {"num": table["next"], "frames": 0})["num"]
            if num == table["next"]:
                table["next"] += 1
            table["videos"][store.video_id]["frames"] = len(vectors)
            parts.append(vectors)
            ids.append((num << FRAME_BITS) + np.arange(len(vectors), dtype=np.int64))
            dim = vectors.shape[1]
        present = {i.video_id for i in infos}
        table["videos"] = {v: e for v, e in table["videos"].items() if v in present}
        table["dim"] = dim
        if dim is None:
            raise NotIndexed("no stored video has retrieval embeddings yet")
        x = np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
        return FrameVectors.build(x, np.concatenate(ids) if ids else np.zeros(0, np.int64), dim, self.exact_limit)

    def sync(self) -> FrameVectors:
        """Bring the library index in step with the stores: load it (rebuilding if missing or corrupt), add
        frames the stores gained, drop videos that were removed, switch to the approximate index when it grows."""
        with self._lock():
            table = self._table()
            path = self.dir / "library.faiss"
            try:
                index = FrameVectors.load(path)
                if index.size != sum(e["frames"] for e in table["videos"].values()):
                    raise IndexCorrupt(f"{path}: does not match library.json")
            except IndexCorrupt:
                if path.exists() or table["videos"]:
                    self.rebuilt.append("library")  # damaged or out of step; a first build is not a repair
                table = {"videos": {}, "next": table["next"], "dim": table.get("dim")}
                index = self._build_all(table)
                index.save(path)
                self._save_table(table)
                self._all = index
                return index
            changed = False
            stores = {i.video_id: i for i in self.library.list() if not i.failed}
            for video_id in [v for v in table["videos"] if v not in stores]:
                changed |= self._drop(index, table, video_id) > 0
            for video_id, info in stores.items():
                entry = table["videos"].get(video_id)
                done = entry["frames"] if entry else 0
                if info.frames <= done:
                    continue
                try:
                    vectors = self._embeddings(VideoStore.load_existing(info.path), done)
                except NotIndexed:
                    continue
                changed |= self._append(index, table, video_id, done, vectors)
            if index.spec.kind == "flat" and index.size > self.exact_limit:
                index = self._build_all(table)
                changed = True
            if changed:
                index.save(path)
                self._save_table(table)
            self._all = index
            return index

    def _append(self, index: FrameVectors, table: dict, video_id: str, first: int, vectors: np.ndarray) -> bool:
        if not len(vectors):
            return False
        entry = table["videos"].setdefault(video_id, {"num": table["next"], "frames": 0})
        if entry["num"] == table["next"]:
            table["next"] += 1
        if entry["frames"] != first:
            raise ValueError(f"{video_id}: frames {first}… added but {entry['frames']} are indexed")
        index.add(vectors, (entry["num"] << FRAME_BITS) + first + np.arange(len(vectors), dtype=np.int64))
        entry["frames"] = first + len(vectors)
        table["dim"] = vectors.shape[1]
        return True

    @staticmethod
    def _drop(index: FrameVectors, table: dict, video_id: str) -> int:
        entry = table["videos"].pop(video_id)
        return index.remove((entry["num"] << FRAME_BITS) + np.arange(entry["frames"], dtype=np.int64))

    # ---- changes as they happen ----------------------------------------------------------------------------
    def add_chunk(self, store: VideoStore, first: int, vectors) -> None:
        """A chunk just committed by ingest (a live source grows while people search it)."""
        if vectors is None:
            return
        x = np.asarray(vectors.float().numpy() if hasattr(vectors, "numpy") else vectors, dtype=np.float32)
        per_video = self._video_path(store.video_id)
        with self._lock():
            try:
                index = FrameVectors.load(per_video)
                if index.size != first:
                    raise IndexCorrupt("behind")
                index.add(x, first + np.arange(len(x)))
            except IndexCorrupt:
                store.refresh()
                full = self._embeddings(store)[: first + len(x)]
                index = FrameVectors.build(full, np.arange(len(full)), full.shape[1], self.exact_limit)
            index.save(per_video)
            self._loaded[store.video_id] = index
            table = self._table()
            path = self.dir / "library.faiss"
            try:
                lib = FrameVectors.load(path)
                entry = table["videos"].get(store.video_id)
                if (entry["frames"] if entry else 0) != first:
                    return  # out of step: the next sync() repairs it from the store
                self._append(lib, table, store.video_id, first, x)
                lib.save(path)
                self._save_table(table)
                self._all = lib
            except IndexCorrupt:
                pass  # missing (the first video) or damaged: built from the stores below, outside this lock
            else:
                return
        self.sync()

    def remove_video(self, video_id: str) -> None:
        """Forget a deleted video: its own index and its frames in the library index."""
        with self._lock():
            for p in (self._video_path(video_id), self._video_path(video_id).with_suffix(".faiss.json")):
                p.unlink(missing_ok=True)
            self._loaded.pop(video_id, None)
            table = self._table()
            if video_id not in table["videos"]:
                return
            try:
                lib = FrameVectors.load(self.dir / "library.faiss")
            except IndexCorrupt:
                table["videos"].pop(video_id)
                self._save_table(table)
                return
            self._drop(lib, table, video_id)
            lib.save(self.dir / "library.faiss")
            self._save_table(table)
            self._all = lib

    # ---- search --------------------------------------------------------------------------------------------
    def search(self, query: np.ndarray, k: int, video: str | None = None) -> list[Hit]:
        """The k nearest frames to one query vector, in one video or the whole library."""
        if video is not None:
            store = self.library.get(video)
            index = self.video(store.video_id)
            scores, ids = index.search(np.asarray(query, np.float32)[None], k)
            times = store.timestamps()
            return [Hit(store.video_id, int(i), float(times[i]), float(s))
                    for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]
        index = self.sync()
        scores, ids = index.search(np.asarray(query, np.float32)[None], k)
        table = self._table()
        by_num = {e["num"]: v for v, e in table["videos"].items()}
        hits, times = [], {}
        for s, i in zip(scores[0], ids[0], strict=True):
            if i < 0 or int(i) >> FRAME_BITS not in by_num:
                continue
            video_id, frame = by_num[int(i) >> FRAME_BITS], int(i) & ((1 << FRAME_BITS) - 1)
            if video_id not in times:
                try:
                    times[video_id] = self.library.get(video_id).timestamps()
                except UnknownVideo:
                    continue
            hits.append(Hit(video_id, frame, float(times[video_id][frame]), float(s)))
        return hits

    def frame_vectors(self, video_id: str) -> np.ndarray:
        """All of a video's frame embeddings (F, dim)."""
        return self._embeddings(self.library.get(video_id))

