"""A video's transcript on disk: stored with the video, independent of the vision model, committed per audio window.

Layout of one transcript, `<root>/transcripts/<video_fp>/<name>/` (`video_fp`: the frames' stores' content key, so
every model's store of a video shares its transcripts; `<name>`: the backend's name, slugged, plus `--<language>`
when one was asked for: another recognizer or language is another transcript):
  manifest.json             backend, language, window_s, committed windows, complete / no_audio / gaps / failed
  windows/window-000000.json  that window's segments (with word times), on the video's clock
Each window file is written to a temp file, fsynced and renamed, and only then listed in the manifest (itself
replaced atomically) under an flock on the folder, refused when the manifest changed on disk since this handle
read it (the video store's discipline, vidmini/store/video_store.py). A killed transcription leaves at most an
unlisted window file or a temp file, which the next `open` deletes; it resumes at `covered_until`. Nothing
time-dependent is written, and times are rounded to the millisecond, so a resumed run ends byte-identical to an
uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from vidmini.common.files import atomic_write, fsync_dir, locked_dir
from vidmini.speech.types import Segment, Word
from vidmini.store.manifest import MANIFEST, ManifestFolder
from vidmini.store.video_store import StoreMismatch

__all__ = ["NO_AUDIO", "TRANSCRIPTS", "TranscriptStore", "remove_transcripts", "transcript_name",
           "transcript_state"]

FORMAT_VERSION = 1
TRANSCRIPTS = "transcripts"
WINDOWS = "windows"
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
STATES = ("none", "running", "incomplete", "complete", "no_audio", "failed")
NO_AUDIO = "no-audio"  # the backend name of the record that a video has no audio stream (no recognizer needed)


def transcript_name(backend: str, language: str | None = None) -> str:
    """The folder name of a transcript: the backend's name (e.g. "whisper-openai/whisper-tiny") made safe, plus
    the language asked for."""
    slug = _SLUG.sub("_", backend).strip("._-") or "asr"
    return f"{slug}--{_SLUG.sub('_', language)}" if language else slug


def _ms(t: float) -> float:
    return round(float(t), 3)


def _segment_json(s: Segment) -> dict:
    """A segment as stored: times to the millisecond, confidences to 4 places (stable bytes across runs)."""
    def conf(c: float | None) -> float | None:
        return None if c is None else round(float(c), 4)

    return {"start": _ms(s.start), "end": _ms(s.end), "text": s.text, "confidence": conf(s.confidence),
            "words": [{"start": _ms(w.start), "end": _ms(w.end), "text": w.text, "confidence": conf(w.confidence)}
                      for w in s.words]}


def _dump(data: dict) -> str:
    return json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False)


class TranscriptStore(ManifestFolder):
    """A handle on one transcript folder: `open` to write (cleans up after a killed run), `load` to read. The
    manifest changes only through `_commit` (`store.manifest.ManifestFolder`)."""

    KIND = "transcript"
    _dump = staticmethod(_dump)  # the transcript's text is kept as said (not \u-escaped)

    def __init__(self, path: Path, text: str) -> None:
        super().__init__(path, text)
        self._cache: dict[str, list[Segment]] = {}  # window file name + sha → its segments

    # ---- opening ------------------------------------------------------------------------------------------------
    @staticmethod
    def folder(root: str | Path, video_fp: str, backend: str, language: str | None = None) -> Path:
        if not _SAFE.fullmatch(video_fp):
            raise ValueError(f"video fingerprint {video_fp!r} is not a safe folder name")
        return Path(root) / TRANSCRIPTS / video_fp / transcript_name(backend, language)

    @classmethod
    def open(cls, root: str | Path, video_fp: str, backend: str, language: str | None = None,
             window_s: float = 30.0, source: str = "") -> TranscriptStore:
        """Create, or reopen to resume (the stored window length is kept: a resume continues the same windows).
        Unlisted window files and temp files left by a killed run are deleted."""
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        path = cls.folder(root, video_fp, backend, language)
        path.mkdir(parents=True, exist_ok=True)
        with locked_dir(path):
            mpath = path / MANIFEST
            if mpath.exists():
                store = cls(path, mpath.read_text())
                m = store._m
                if m.get("version", 0) > FORMAT_VERSION:
                    raise StoreMismatch(f"transcript {path} has format {m['version']}; this vidmini reads "
                                        f"{FORMAT_VERSION}")
                if (m.get("video_fp"), m.get("backend"), m.get("language")) != (video_fp, backend, language):
                    raise StoreMismatch(f"transcript {path} belongs to {m.get('video_fp')}/{m.get('backend')}"
                                        f"/{m.get('language')}, not {video_fp}/{backend}/{language}")
            else:
                manifest = {"version": FORMAT_VERSION, "video_fp": video_fp, "backend": backend,
                            "language": language, "window_s": float(window_s), "source": str(source),
                            "windows": [], "covered_until": 0.0, "complete": False, "no_audio": False,
                            "gaps": [], "failed": None, "duration": None}
                text = _dump(manifest)
                (path / WINDOWS).mkdir(exist_ok=True)
                fsync_dir(path)
                fsync_dir(path.parent)
                atomic_write(mpath, text)
                store = cls(path, text)
            store._discard_unlisted()
        return store

    @classmethod
    def load(cls, path: str | Path) -> TranscriptStore:
        """A read handle (no cleanup: usable while a writer runs)."""
        return cls(Path(path), (Path(path) / MANIFEST).read_text())

    @classmethod
    def all_for(cls, root: str | Path, video_fp: str) -> list[TranscriptStore]:
        """Every readable transcript of a video, by folder name."""
        folder = Path(root) / TRANSCRIPTS / video_fp
        if not _SAFE.fullmatch(video_fp) or not folder.is_dir():
            return []
        out = []
        for p in sorted(folder.iterdir()):
            if p.name.startswith(".") or not (p / MANIFEST).is_file():
                continue
            try:
                out.append(cls.load(p))
            except (OSError, ValueError):
                continue
        return out

    @classmethod
    def best(cls, root: str | Path, video_fp: str, prefer: str | None = None) -> TranscriptStore | None:
        """The transcript a video's answers, search and summaries use: `prefer`'s (a backend name) when it has
        one, else a complete one over an incomplete one, then the one that covers the most, then by name."""
        stores = cls.all_for(root, video_fp)
        if not stores:
            return None
        return max(stores, key=lambda s: (s.backend == prefer, s.complete and not s.failed, s.covered_until,
                                          -stores.index(s)))

    def refresh(self) -> None:
        self._text = (self._path / MANIFEST).read_text()
        self._m = json.loads(self._text)

    def _discard_unlisted(self) -> None:
        listed = {w["name"] for w in self._m["windows"]}
        (self._path / (MANIFEST + ".tmp")).unlink(missing_ok=True)
        folder = self._path / WINDOWS
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name.endswith(".tmp") or f.name.split(".")[0] not in listed:
                    shutil.rmtree(f) if f.is_dir() else f.unlink()

    # ---- state --------------------------------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._m["backend"]

    @property
    def language(self) -> str | None:
        return self._m.get("language")

    @property
    def video_fp(self) -> str:
        return self._m["video_fp"]

    @property
    def window_s(self) -> float:
        return float(self._m["window_s"])

    @property
    def complete(self) -> bool:
        return bool(self._m["complete"])

    @property
    def no_audio(self) -> bool:
        return bool(self._m.get("no_audio"))

    @property
    def failed(self) -> str | None:
        return self._m.get("failed")

    @property
    def covered_until(self) -> float:
        """Seconds on the video's clock up to which audio has been transcribed and committed (where a resumed
        transcription starts)."""
        return float(self._m["covered_until"])

    @property
    def gaps(self) -> list[dict]:
        """Stretches whose audio could not be read: {"start", "end" (None: to the end), "error"}."""
        return [dict(g) for g in self._m.get("gaps", [])]

    @property
    def windows(self) -> int:
        return len(self._m["windows"])

    @property
    def state(self) -> str:
        """"complete", "no_audio", "failed" or "incomplete" (a writer may be running: the library says
        "running" for one it runs)."""
        if self.no_audio:
            return "no_audio"
        if self.complete:
            return "complete"
        return "failed" if self.failed else "incomplete"

    def summary(self) -> dict:
        """What a listing shows of it."""
        return {"state": self.state, "backend": self.backend, "language": self.language,
                "covered_until": self.covered_until, "segments": sum(w["segments"] for w in self._m["windows"]),
                "gaps": self.gaps, "error": self.failed}

    # ---- writing ------------------------------------------------------------------------------------------------
    def append_window(self, start: float, end: float, segments: Sequence[Segment]) -> None:
        """Commit one audio window [start, end) and the segments spoken in it. Windows come in time order: one
        that starts before `covered_until` (a resumed writer repeating a committed window) is a ValueError."""
        start, end = _ms(start), _ms(end)
        if end < start:
            raise ValueError(f"window ends ({end}) before it starts ({start})")
        data = _dump({"start": start, "end": end,
                      "segments": [_segment_json(s) for s in sorted(segments, key=lambda s: (s.start, s.end))]})
        with self._commit() as m:
            if m["complete"]:
                raise ValueError(f"transcript {self._path} is complete; nothing more can be appended")
            if start < m["covered_until"] - 1e-3:
                raise ValueError(f"window at {start:g}s starts before the committed audio ends "
                                 f"({m['covered_until']:g}s)")
            name = f"window-{len(m['windows']):06d}"
            raw = data.encode()
            atomic_write(self._path / WINDOWS / f"{name}.json", raw)
            m["windows"].append({"name": name, "start": start, "end": end, "segments": len(segments),
                                 "sha256": hashlib.sha256(raw).hexdigest()})
            m["covered_until"] = max(float(m["covered_until"]), end)

    def record_gap(self, start: float, end: float | None, error: str) -> None:
        """Audio from `start` to `end` (None: the rest) could not be read; the error, on one line."""
        with self._commit() as m:
            m["gaps"].append({"start": _ms(start), "end": None if end is None else _ms(end),
                              "error": " ".join(str(error).split())})

    def mark_complete(self, duration: float | None = None) -> None:
        """The whole audio track has been transcribed (or every readable part of it, gaps recorded)."""
        with self._commit() as m:
            m.update(complete=True, failed=None, duration=None if duration is None else _ms(duration))

    def mark_no_audio(self) -> None:
        """The video has no audio stream: complete, with nothing in it."""
        with self._commit() as m:
            m.update(complete=True, no_audio=True, failed=None)

    def mark_failed(self, reason: str) -> None:
        """Why a transcription gave up (the recognizer would not load...); the transcript stays resumable."""
        with self._commit() as m:
            if m["complete"]:
                raise ValueError(f"transcript {self._path} is complete; it cannot be marked failed")
            m["failed"] = " ".join(str(reason).split())

    # ---- reading ------------------------------------------------------------------------------------------------
    def _window_segments(self, entry: dict) -> list[Segment]:
        key = f"{entry['name']}:{entry['sha256']}"
        if key not in self._cache:
            data = json.loads((self._path / WINDOWS / f"{entry['name']}.json").read_text())
            self._cache[key] = [Segment(s["start"], s["end"], s["text"],
                                        tuple(Word(**w) for w in s.get("words", ())), s.get("confidence"))
                                for s in data["segments"]]
        return self._cache[key]

    def segments(self, start: float | None = None, end: float | None = None) -> list[Segment]:
        """Committed segments overlapping [start, end] (either open), in time order."""
        lo = float("-inf") if start is None else float(start)
        hi = float("inf") if end is None else float(end)
        out: list[Segment] = []
        for w in self._m["windows"]:
            if not w["segments"] or w["end"] < lo or w["start"] > hi:
                continue
            out += [s for s in self._window_segments(w) if s.end >= lo and s.start <= hi]
        return sorted(out, key=lambda s: (s.start, s.end))

    def verify(self) -> list[str]:
        """Problems found (empty: consistent): missing or altered window files."""
        problems = []
        for w in self._m["windows"]:
            f = self._path / WINDOWS / f"{w['name']}.json"
            if not f.is_file():
                problems.append(f"{w['name']}: missing")
            elif hashlib.sha256(f.read_bytes()).hexdigest() != w["sha256"]:
                problems.append(f"{w['name']}: checksum mismatch")
        return problems


def transcript_state(root: str | Path, video_fp: str, running: bool = False, prefer: str | None = None) -> dict:
    """A video's transcript as a listing shows it: {"state": none | running | incomplete | complete | no_audio |
    failed, ...} (`running`: the caller runs a transcription of it now)."""
    best = TranscriptStore.best(root, video_fp, prefer)
    if best is None:
        return {"state": "running" if running else "none"}
    out = best.summary()
    if running and out["state"] in ("incomplete", "failed"):
        out["state"] = "running"
    return out


def remove_transcripts(root: str | Path, video_fp: str) -> None:
    """Delete every transcript of a video (when its last store is removed)."""
    folder = Path(root) / TRANSCRIPTS / video_fp
    if _SAFE.fullmatch(video_fp) and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)
