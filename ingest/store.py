"""The on-disk store: one folder per (video, model), written in atomically committed chunks.

Layout of a store folder `<root>/videos/<video_id>/`:
  manifest.json            key, meta, committed chunks (name, start_frame, frames, sha256), complete, gaps
  chunks/chunk-000000.safetensors   per-frame tensors of that chunk + `timestamps`, `pts` (float64)
  thumbs/chunk-000000.bin           the chunk's JPEG thumbnails, concatenated, with a length table header
A chunk is written to a temp file, fsynced and renamed, and only then listed in the manifest (itself
replaced atomically), so a killed writer leaves at most an unlisted chunk that the next open discards.
Nothing time-dependent is written, so a resumed ingest ends byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

FORMAT_VERSION = 1
HEAD_TAIL_BYTES = 1 << 20


def fingerprint(path: str | Path) -> str:
    """size + sha256 of the leading and trailing 1 MiB: cheap for multi-GB files; a change confined to the
    middle of a large file is not detected."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(HEAD_TAIL_BYTES))
        if size > HEAD_TAIL_BYTES:
            f.seek(max(HEAD_TAIL_BYTES, size - HEAD_TAIL_BYTES))
            h.update(f.read(HEAD_TAIL_BYTES))
    return h.hexdigest()[:16]


def fingerprint_url(url: str, started_at: str) -> str:
    """A live source has no fixed content: key it by what and when."""
    return "live-" + hashlib.sha256(f"{url}|{started_at}".encode()).hexdigest()[:11]


@dataclass(frozen=True)
class StoreKey:
    video_fp: str
    model_id: str
    config_hash: str
    sampling: str

    @property
    def video_id(self) -> str:
        tail = hashlib.sha256(f"{self.model_id}|{self.config_hash}|{self.sampling}".encode()).hexdigest()[:8]
        return f"{self.video_fp}-{tail}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class VideoStore:
    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest

    # ---- opening ------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path, key: StoreKey, meta: dict) -> VideoStore:
        """Create, or reopen and resume: unlisted chunk files and temp files from a killed run are removed."""
        path = Path(root) / "videos" / key.video_id
        mpath = path / "manifest.json"
        if mpath.exists():
            store = cls(path, json.loads(mpath.read_text()))
            if store.manifest.get("key") != asdict(key):
                raise ValueError(f"store {path} belongs to another video/model: {store.manifest.get('key')}")
            store._discard_unlisted()
            return store
        (path / "chunks").mkdir(parents=True, exist_ok=True)
        (path / "thumbs").mkdir(exist_ok=True)
        manifest = {"version": FORMAT_VERSION, "video_id": key.video_id, "key": asdict(key), "meta": meta,
                    "chunks": [], "frames": 0, "complete": False, "gaps": [], "duration": None, "failed": None}
        store = cls(path, manifest)
        store._save_manifest()
        return store

    @classmethod
    def load_existing(cls, path: Path) -> VideoStore:
        return cls(path, json.loads((path / "manifest.json").read_text()))

    def _discard_unlisted(self) -> None:
        listed = {c["name"] for c in self.manifest["chunks"]}
        (self.path / "manifest.json.tmp").unlink(missing_ok=True)
        for folder in (self.path / "chunks", self.path / "thumbs"):
            for f in folder.glob("*"):
                if f.name.endswith(".tmp") or f.name.split(".")[0] not in listed:
                    f.unlink()

    def _save_manifest(self) -> None:
        atomic_write(self.path / "manifest.json", json.dumps(self.manifest, indent=1, sort_keys=True).encode())

    # ---- state --------------------------------------------------------------------------------------------
    @property
    def video_id(self) -> str:
        return self.manifest["video_id"]

    @property
    def committed_frames(self) -> int:
        return int(self.manifest["frames"])

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    # ---- writing ------------------------------------------------------------------------------------------
    def update_meta(self, extra: dict) -> None:
        self.manifest["meta"].update(extra)
        self._save_manifest()

    def append_chunk(self, timestamps: list[float], pts: list[float], tensors: dict[str, torch.Tensor],
                     thumbnails: list[bytes] | None = None) -> None:
        n = len(timestamps)
        if n == 0 or len(pts) != n or any(t.shape[0] != n for t in tensors.values()):
            raise ValueError("a chunk needs the same number of frames in timestamps, pts and every tensor")
        if self.complete:
            raise ValueError("store is complete; nothing more can be appended")
        name = f"chunk-{len(self.manifest['chunks']):06d}"
        payload = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        payload["timestamps"] = torch.tensor(timestamps, dtype=torch.float64)
        payload["pts"] = torch.tensor(pts, dtype=torch.float64)
        data = save(payload, metadata={"start_frame": str(self.committed_frames)})
        atomic_write(self.path / "chunks" / f"{name}.safetensors", data)
        if thumbnails is not None:
            if len(thumbnails) != n:
                raise ValueError("one thumbnail per frame")
            header = struct.pack(f"<I{n}I", n, *(len(b) for b in thumbnails))
            atomic_write(self.path / "thumbs" / f"{name}.bin", header + b"".join(thumbnails))
        self.manifest["chunks"].append({"name": name, "start_frame": self.committed_frames, "frames": n,
                                        "sha256": hashlib.sha256(data).hexdigest()})
        self.manifest["frames"] = self.committed_frames + n
        self._save_manifest()

    def mark_complete(self, gaps: list[tuple[float, float]], duration: float | None) -> None:
        self.manifest.update(complete=True, gaps=[list(g) for g in gaps], duration=duration, failed=None)
        self._save_manifest()

    def mark_failed(self, reason: str) -> None:
        self.manifest["failed"] = reason
        self._save_manifest()

    # ---- reading ------------------------------------------------------------------------------------------
    def _chunk_files(self, frames: slice | None = None) -> list[tuple[dict, Path]]:
        start, stop = (0, self.committed_frames) if frames is None else frames.indices(self.committed_frames)[:2]
        return [(c, self.path / "chunks" / f"{c['name']}.safetensors") for c in self.manifest["chunks"]
                if c["start_frame"] < stop and c["start_frame"] + c["frames"] > start]

    def load(self, names: list[str] | None = None, frames: slice | None = None, device: str = "cpu"
             ) -> dict[str, torch.Tensor]:
        """Tensors concatenated over the chunks that cover `frames` (a step-1 slice), read lazily."""
        start, stop = (0, self.committed_frames) if frames is None else frames.indices(self.committed_frames)[:2]
        parts: dict[str, list[torch.Tensor]] = {}
        for chunk, f in self._chunk_files(frames):
            lo = max(start - chunk["start_frame"], 0)
            hi = min(stop - chunk["start_frame"], chunk["frames"])
            with safe_open(str(f), framework="pt", device=str(device)) as st:
                for name in names or [k for k in st.keys() if k not in ("timestamps", "pts")]:
                    parts.setdefault(name, []).append(st.get_slice(name)[lo:hi])
        return {k: torch.cat(v) for k, v in parts.items()}

    def _column(self, name: str) -> np.ndarray:
        return self.load([name])[name].numpy() if self.committed_frames else np.zeros(0)

    def timestamps(self) -> np.ndarray:
        return self._column("timestamps")

    def pts(self) -> np.ndarray:
        return self._column("pts")

    def thumbnail(self, frame: int) -> bytes:
        for chunk in self.manifest["chunks"]:
            if chunk["start_frame"] <= frame < chunk["start_frame"] + chunk["frames"]:
                data = (self.path / "thumbs" / f"{chunk['name']}.bin").read_bytes()
                n = struct.unpack_from("<I", data)[0]
                sizes = struct.unpack_from(f"<{n}I", data, 4)
                i = frame - chunk["start_frame"]
                off = 4 + 4 * n + sum(sizes[:i])
                return data[off : off + sizes[i]]
        raise IndexError(f"frame {frame} is not stored")

    def verify(self) -> list[str]:
        problems = []
        total = 0
        for chunk in self.manifest["chunks"]:
            f = self.path / "chunks" / f"{chunk['name']}.safetensors"
            if chunk["start_frame"] != total:
                problems.append(f"{chunk['name']}: starts at {chunk['start_frame']}, expected {total}")
            total += chunk["frames"]
            if not f.exists():
                problems.append(f"{chunk['name']}: missing")
            elif hashlib.sha256(f.read_bytes()).hexdigest() != chunk["sha256"]:
                problems.append(f"{chunk['name']}: checksum mismatch")
        if total != self.committed_frames:
            problems.append(f"manifest says {self.committed_frames} frames, chunks hold {total}")
        return problems


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


class Library:
    """All stores under a data root."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.videos = self.root / "videos"

    def _paths(self) -> list[Path]:
        if not self.videos.exists():
            return []
        return sorted(p for p in self.videos.iterdir() if (p / "manifest.json").exists() and not p.name.startswith("."))

    def list(self) -> list[StoreInfo]:
        out = []
        for p in self._paths():
            m = json.loads((p / "manifest.json").read_text())
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            out.append(StoreInfo(m["video_id"], m["meta"].get("source", ""), m["key"]["model_id"], m["frames"],
                                 m.get("duration"), m["complete"], str(p), size))
        return out

    def find(self, key: StoreKey) -> VideoStore | None:
        p = self.videos / key.video_id
        return VideoStore.load_existing(p) if (p / "manifest.json").exists() else None

    def get(self, video_id: str) -> VideoStore:
        """By id or a unique prefix of it."""
        matches = [p for p in self._paths() if p.name.startswith(video_id)] if video_id else []
        exact = [p for p in matches if p.name == video_id]
        if exact:
            matches = exact
        if len(matches) != 1:
            reason = "no stored video" if not matches else f"{len(matches)} stored videos match"
            raise KeyError(f"{reason} {video_id!r}")
        return VideoStore.load_existing(matches[0])

    def remove(self, video_id: str) -> None:
        """Rename to a hidden tombstone first, so a crash never leaves a half-deleted store that looks valid."""
        store = self.get(video_id)
        tomb = self.videos / f".deleted-{store.video_id}"
        os.replace(store.path, tomb)
        _fsync_dir(self.videos)
        shutil.rmtree(tomb)
