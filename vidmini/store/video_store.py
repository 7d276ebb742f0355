"""The on-disk store: one folder per (video, model), written in atomically committed chunks.

Layout of a store folder `<root>/videos/<video_id>/`:
  manifest.json                     key, meta, tensor schema, committed chunks, complete/gaps/duration/failed
  chunks/chunk-000000.safetensors   that chunk's per-frame tensors + `timestamps`, `pts` (float64)
                                    [+ `embeddings`]; safetensors only, never pickle
  thumbs/chunk-000000.bin           the chunk's thumbnails (opaque bytes): u32 count, u32 sizes, then the bytes
  runs.jsonl                        optional per-run log (timings, host...): the one file NOT byte-compared
A chunk is written to a temp file, fsynced and renamed, and only then listed in the manifest (itself replaced
atomically), so a killed writer leaves at most an unlisted chunk or a temp file, which the next `open` deletes.
Nothing time-dependent goes into the manifest or the chunks, so a resumed ingest ends byte-identical to an
uninterrupted one. Writers take an flock on the store folder for each commit and refuse to commit over a
manifest that changed on disk since they read it (a second writer, or a removal).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vidmini.common.files import atomic_write, fsync_dir, locked_dir
from vidmini.common.fingerprint import fingerprint, fingerprint_url
from vidmini.store.manifest import MANIFEST, ManifestFolder, StoreConflict, dump_manifest

if TYPE_CHECKING:  # the tensor parts import torch and safetensors where they run, so that listing stores does not
    import torch

__all__ = ["StoreCatalog", "StoreConflict", "StoreInfo", "StoreKey", "StoreMismatch", "UnknownVideo", "VideoStore",
           "atomic_write", "fingerprint", "fingerprint_url"]

FORMAT_VERSION = 1
RUN_LOG = "runs.jsonl"
NON_COMPARED = frozenset({RUN_LOG})  # files that may differ between a resumed and an uninterrupted ingest
RESERVED = frozenset({"timestamps", "pts", "embeddings"})
IDENTITY_META = ("model", "sampling")  # meta fields that must match when an existing store is reopened
_SAFE_FP = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class StoreMismatch(ValueError):
    """The folder for this key holds a store of another video, model or sampling (or a newer format)."""


class UnknownVideo(KeyError):
    """No stored video (or more than one) matches an id or id prefix."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else "unknown video"


@dataclass(frozen=True)
class StoreKey:
    """What makes two ingests interchangeable: same content, same model + config, same sampling."""

    video_fp: str
    model_id: str
    config_hash: str
    sampling: str

    def __post_init__(self) -> None:
        if not _SAFE_FP.fullmatch(self.video_fp):  # it becomes a folder name
            raise ValueError(f"video fingerprint {self.video_fp!r} is not a safe folder name")

    @property
    def video_id(self) -> str:
        tail = hashlib.sha256(f"{self.model_id}|{self.config_hash}|{self.sampling}".encode()).hexdigest()[:8]
        return f"{self.video_fp}-{tail}"


# ---- durable file primitives ----------------------------------------------------------------------------------


_locked = locked_dir  # flock on the store folder


def _pack_thumbs(thumbs: Sequence[bytes]) -> bytes:
    return struct.pack(f"<I{len(thumbs)}I", len(thumbs), *(len(b) for b in thumbs)) + b"".join(thumbs)


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _as_float64(values: Sequence[float] | np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.array(values, dtype=np.float64).reshape(-1))


# ---- one store ------------------------------------------------------------------------------------------------
class VideoStore(ManifestFolder):
    """A handle on one store folder; `open` for writing (it cleans up after killed runs), `load_existing` to read.
    The manifest changes only through `_commit` (`store.manifest.ManifestFolder`)."""

    # ---- opening --------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path, key: StoreKey, meta: dict) -> VideoStore:
        """Create, or reopen to resume. On reopen the stored meta is kept (the one passed is only checked on
        IDENTITY_META), and unlisted chunk files and temp files left by a killed run are deleted."""
        path = Path(root) / "videos" / key.video_id
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            mpath = path / MANIFEST
            if mpath.exists():
                store = cls(path, mpath.read_text())
                store._check_identity(key, meta)
            else:
                manifest = {"version": FORMAT_VERSION, "video_id": key.video_id, "key": asdict(key),
                            "meta": meta, "schema": None, "thumbnails": None, "chunks": [], "frames": 0,
                            "complete": False, "gaps": [], "duration": None, "failed": None, "extra": {}}
                text = dump_manifest(manifest)  # fails here, before anything is written, on non-JSON meta
                for sub in ("chunks", "thumbs"):
                    (path / sub).mkdir(exist_ok=True)
                fsync_dir(path)
                fsync_dir(path.parent)
                atomic_write(mpath, text.encode())
                store = cls(path, text)
            store._discard_unlisted()
        return store

    @classmethod
    def load_existing(cls, path: str | Path) -> VideoStore:
        """A read handle; no cleanup, so it can be used while a writer is running."""
        return cls(Path(path), (Path(path) / MANIFEST).read_text())

    def refresh(self) -> None:
        """Re-read the manifest (a reader following a live ingest)."""
        self._text = (self._path / MANIFEST).read_text()
        self._m = json.loads(self._text)

    def _check_identity(self, key: StoreKey, meta: dict) -> None:
        m = self._m
        if m.get("version", 0) > FORMAT_VERSION:
            raise StoreMismatch(f"store {self._path} has format {m['version']}; this vidmini reads {FORMAT_VERSION}")
        if m.get("key") != asdict(key):
            raise StoreMismatch(f"store {self._path} belongs to another video/model: {m.get('key')} != {asdict(key)}")
        stored = m.get("meta", {})
        for field in IDENTITY_META:
            if field in stored and field in meta and json.loads(json.dumps(meta[field])) != stored[field]:
                raise StoreMismatch(f"store {self._path} was made with {field} {stored[field]}, not {meta[field]}; "
                                    "remove it or ingest under another key")

    def _discard_unlisted(self) -> None:
        listed = {c["name"] for c in self._m["chunks"]}
        (self._path / (MANIFEST + ".tmp")).unlink(missing_ok=True)
        for folder in (self._path / "chunks", self._path / "thumbs"):
            if folder.is_dir():
                for f in folder.iterdir():
                    if f.name.endswith(".tmp") or f.name.split(".")[0] not in listed:
                        shutil.rmtree(f) if f.is_dir() else f.unlink()

    # ---- state ----------------------------------------------------------------------------------------------
    @property
    def video_id(self) -> str:
        return self._m["video_id"]

    @property
    def committed_frames(self) -> int:
        return int(self._m["frames"])

    @property
    def complete(self) -> bool:
        return bool(self._m["complete"])

    @property
    def tensor_names(self) -> list[str]:
        return sorted(n for n in (self._m.get("schema") or {}) if n not in RESERVED)

    # ---- writing --------------------------------------------------------------------------------------------
    def update_meta(self, extra: dict) -> None:
        """Merge into meta (part of the compared manifest: deterministic values only)."""
        with self._commit() as m:
            m["meta"].update(extra)

    def append_chunk(self, timestamps: Sequence[float], pts: Sequence[float], tensors: dict[str, torch.Tensor],
                     thumbnails: Sequence[bytes] | None = None, embeddings: torch.Tensor | None = None,
                     *, start_frame: int | None = None) -> None:
        """Commit the next `len(timestamps)` frames. `start_frame`, when given, must equal committed_frames (a
        resumed job passing its own frame counter gets a ValueError instead of a gap or a duplicate)."""
        from safetensors.torch import save

        n = len(timestamps)
        payload = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        if embeddings is not None:
            payload["embeddings"] = embeddings.detach().cpu().contiguous()
        if n == 0 or len(pts) != n or any(t.ndim == 0 or t.shape[0] != n for t in payload.values()):
            raise ValueError("a chunk needs the same number (> 0) of frames in timestamps, pts and every tensor")
        if RESERVED & tensors.keys():
            raise ValueError(f"tensor names {sorted(RESERVED & tensors.keys())} are reserved by the store")
        if thumbnails is not None and len(thumbnails) != n:
            raise ValueError(f"{len(thumbnails)} thumbnails for {n} frames")
        schema = {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
                  for k, t in payload.items()}
        payload["timestamps"], payload["pts"] = _as_float64(timestamps), _as_float64(pts)
        with self._commit() as m:
            start = m["frames"]
            if m["complete"]:
                raise ValueError(f"store {self.video_id} is complete; nothing more can be appended")
            if start_frame is not None and start_frame != start:
                raise ValueError(f"chunk starts at frame {start_frame}, but {start} frames are committed")
            if m.get("schema") is not None and m["schema"] != schema:  # .get: manifests from before the schema
                raise ValueError(f"chunk tensors {schema} differ from the store's {m['schema']}")
            if m.get("thumbnails") is not None and m["thumbnails"] != (thumbnails is not None):
                raise ValueError("thumbnails must be given for every chunk or for none")
            name = f"chunk-{len(m['chunks']):06d}"
            data = save(payload, metadata={"start_frame": str(start)})
            atomic_write(self._path / "chunks" / f"{name}.safetensors", data)
            entry = {"name": name, "start_frame": start, "frames": n, "sha256": hashlib.sha256(data).hexdigest()}
            if thumbnails is not None:
                packed = _pack_thumbs(thumbnails)
                atomic_write(self._path / "thumbs" / f"{name}.bin", packed)
                entry["thumbs_sha256"] = hashlib.sha256(packed).hexdigest()
            m["chunks"].append(entry)
            m["frames"] = start + n
            m["schema"], m["thumbnails"] = schema, thumbnails is not None

    def mark_complete(self, gaps: Sequence[tuple[float, float]], duration: float | None,
                      extra: dict | None = None) -> None:
        """The only way a store becomes complete. `extra` lands in the compared manifest: no wall times."""
        with self._commit() as m:
            m.update(complete=True, gaps=[[float(a), float(b)] for a, b in gaps],
                     duration=None if duration is None else float(duration), failed=None, extra=extra or {})

    def mark_failed(self, reason: str) -> None:
        """Record why an ingest gave up; the store stays incomplete (a later run may still finish it)."""
        with self._commit() as m:
            if m["complete"]:
                raise ValueError(f"store {self.video_id} is complete; it cannot be marked failed")
            m["failed"] = str(reason)

    def log_run(self, record: dict) -> None:
        """Append one JSON line to runs.jsonl: the place for timings, hosts and resume points, which would break
        byte-identity anywhere else. Not atomic with commits; readers skip a torn last line."""
        with open(self._path / RUN_LOG, "a") as f:
            f.write(json.dumps(record, sort_keys=True, default=str) + "\n")

    def runs(self) -> list[dict]:
        try:
            lines = (self._path / RUN_LOG).read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    # ---- reading --------------------------------------------------------------------------------------------
    def _span(self, frames: slice | None) -> tuple[int, int]:
        if frames is None:
            return 0, self.committed_frames
        start, stop, step = frames.indices(self.committed_frames)
        if step != 1:
            raise ValueError("frames must be a contiguous slice (step 1)")
        return start, max(start, stop)

    def iter_chunks(self, names: list[str] | None = None, frames: slice | None = None, device: str = "cpu"
                    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(first frame index, tensors) per chunk overlapping `frames`, reading only those chunks: for
        streaming over a long video without holding it all in memory."""
        from safetensors import safe_open

        start, stop = self._span(frames)
        schema = self._m.get("schema") or {}
        wanted = self.tensor_names if names is None else list(names)
        unknown = [n for n in wanted if n not in schema and n not in ("timestamps", "pts")]
        if unknown:
            raise KeyError(f"no tensors {unknown} in store {self.video_id}; it has {sorted(schema)}")
        for c in self._m["chunks"]:
            lo, hi = max(start - c["start_frame"], 0), min(stop - c["start_frame"], c["frames"])
            if lo >= hi:
                continue
            with safe_open(str(self._path / "chunks" / f"{c['name']}.safetensors"), framework="pt") as st:
                yield c["start_frame"] + lo, {n: st.get_slice(n)[lo:hi].to(device) for n in wanted}

    def load(self, names: list[str] | None = None, frames: slice | None = None, device: str = "cpu"
             ) -> dict[str, torch.Tensor]:
        """Tensors (default: all but the reserved ones) over `frames`, concatenated. An empty store gives {};
        an empty slice of a non-empty one gives zero-length tensors."""
        import torch

        parts: dict[str, list[torch.Tensor]] = {}
        for _, tensors in self.iter_chunks(names, frames, device):
            for k, t in tensors.items():
                parts.setdefault(k, []).append(t)
        if not parts and self._m["chunks"]:  # empty slice: shapes from the first chunk
            first = self._m["chunks"][0]["start_frame"]
            _, tensors = next(self.iter_chunks(names, slice(first, first + 1), device))
            return {k: t[:0] for k, t in tensors.items()}
        return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}

    def _column(self, name: str) -> np.ndarray:
        out = self.load([name]).get(name)
        return out.numpy() if out is not None else np.zeros(0, dtype=np.float64)

    def timestamps(self) -> np.ndarray:
        """Seconds from the start of the video (sampling time), float64, one per frame."""
        return self._column("timestamps")

    def pts(self) -> np.ndarray:
        """Presentation time of the decoded frame used for each sample, float64."""
        return self._column("pts")

    def embeddings(self, frames: slice | None = None) -> torch.Tensor | None:
        if "embeddings" not in (self._m.get("schema") or {}):
            return None
        return self.load(["embeddings"], frames)["embeddings"]

    def _chunk_of(self, frame: int) -> dict:
        chunks = self._m["chunks"]
        if not 0 <= frame < self.committed_frames:
            raise IndexError(f"frame {frame} is not stored ({self.committed_frames} frames)")
        return chunks[bisect.bisect_right([c["start_frame"] for c in chunks], frame) - 1]

    def thumbnail(self, frame: int) -> bytes:
        c = self._chunk_of(frame)
        path = self._path / "thumbs" / f"{c['name']}.bin"
        if not path.is_file():
            raise LookupError(f"store {self.video_id} has no thumbnail for frame {frame}")
        i = frame - c["start_frame"]
        with open(path, "rb") as f:
            (n,) = struct.unpack("<I", f.read(4))
            sizes = struct.unpack(f"<{n}I", f.read(4 * n))
            f.seek(4 + 4 * n + sum(sizes[:i]))
            return f.read(sizes[i])

    def verify(self, check_hashes: bool = True) -> list[str]:
        """Problems found (empty: consistent): missing or altered files, frame counts that disagree."""
        from safetensors import safe_open

        problems = []
        total = 0
        for c in self._m["chunks"]:
            name, n = c["name"], c["frames"]
            if c["start_frame"] != total:
                problems.append(f"{name}: starts at frame {c['start_frame']}, expected {total}")
            total += n
            f = self._path / "chunks" / f"{name}.safetensors"
            if not f.exists():
                problems.append(f"{name}: chunk file missing")
            elif check_hashes and _sha256_file(f) != c["sha256"]:
                problems.append(f"{name}: chunk checksum mismatch")
            else:
                try:
                    with safe_open(str(f), framework="pt") as st:
                        counts = {k: st.get_slice(k).get_shape()[0] for k in st.keys()}
                except Exception as e:  # noqa: BLE001 - any parse failure is a problem to report
                    problems.append(f"{name}: unreadable ({e})")
                    counts = {}
                problems += [f"{name}: {k} has {v} frames, manifest says {n}" for k, v in counts.items() if v != n]
            if "thumbs_sha256" in c:
                t = self._path / "thumbs" / f"{name}.bin"
                if not t.exists():
                    problems.append(f"{name}: thumbnails missing")
                elif check_hashes and _sha256_file(t) != c["thumbs_sha256"]:
                    problems.append(f"{name}: thumbnails checksum mismatch")
        if total != self.committed_frames:
            problems.append(f"manifest says {self.committed_frames} frames, its chunks hold {total}")
        return problems

    def disk_bytes(self) -> int:
        return _tree_bytes(self._path)


# ---- all stores under a root ----------------------------------------------------------------------------------
@dataclass
class StoreInfo:
    video_id: str
    source: str
    model_id: str
    frames: int
    duration: float | None
    complete: bool
    path: str
    bytes_on_disk: int
    failed: str | None = None


class StoreCatalog:
    """All stores under a data root (`<root>/videos/*`); folders starting with '.' are never stores."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.videos = self.root / "videos"

    def _paths(self) -> list[Path]:
        if not self.videos.is_dir():
            return []
        return sorted(p for p in self.videos.iterdir() if not p.name.startswith(".") and (p / MANIFEST).is_file())

    def list(self) -> list[StoreInfo]:
        """Every store; one whose manifest cannot be read is listed as failed, so that it can be removed."""
        out = []
        for p in self._paths():
            try:
                s = VideoStore.load_existing(p)
                m = s._m
                out.append(StoreInfo(s.video_id, m["meta"].get("source", ""), m["key"]["model_id"],
                                     s.committed_frames, m.get("duration"), s.complete, str(p), _tree_bytes(p),
                                     m.get("failed")))
            except (OSError, ValueError, KeyError, TypeError) as e:
                out.append(StoreInfo(p.name, "", "", 0, None, False, str(p), _tree_bytes(p), f"unreadable: {e!r}"))
        return out

    def find(self, key: StoreKey) -> VideoStore | None:
        """The store for exactly this key, complete or not."""
        p = self.videos / key.video_id
        if not (p / MANIFEST).is_file():
            return None
        store = VideoStore.load_existing(p)
        return store if store._m.get("key") == asdict(key) else None

    def get(self, video_id: str) -> VideoStore:
        """By id, or by a prefix that matches exactly one stored id."""
        return VideoStore.load_existing(self._match(video_id))

    def _match(self, video_id: str) -> Path:
        paths = self._paths()
        matches = [p for p in paths if p.name == video_id] or [p for p in paths if video_id and p.name.startswith(video_id)]
        if not matches:
            raise UnknownVideo(f"no stored video {video_id!r} under {self.videos}")
        if len(matches) > 1:
            raise UnknownVideo(f"{video_id!r} matches {len(matches)} stored videos: "
                               + ", ".join(p.name for p in matches))
        return matches[0]

    def remove(self, video_id: str) -> None:
        """Rename to a hidden tombstone, then delete: a crash never leaves a half-deleted store that looks valid.
        Refused (StoreConflict) while a writer is committing; a writer's next commit then fails cleanly."""
        path = self._match(video_id)  # by folder name: works on a store whose manifest is damaged
        tomb = self.videos / f".deleted-{path.name}-{uuid.uuid4().hex[:8]}"
        try:
            with _locked(path, blocking=False):
                os.rename(path, tomb)
                fsync_dir(self.videos)
        except BlockingIOError:
            raise StoreConflict(f"store {path.name} is being written; try again") from None
        shutil.rmtree(tomb, ignore_errors=True)
        for old in self.videos.glob(".deleted-*"):  # tombstones of earlier crashed removals
            shutil.rmtree(old, ignore_errors=True)
