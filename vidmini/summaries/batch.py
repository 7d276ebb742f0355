"""Batch summaries (`vidmini summarize`): folders of video → ingest (stores reused) → summaries in md/json/srt/vtt, resumably.

A manifest in the output folder records every input as done or failed with the options it was run with; a
rerun skips inputs that are done with the same options and unchanged since, and retries the failed ones. One
failing input is reported and the rest go on. `process_file` is the unit of work both here and on Ray workers
(vidmini/summaries/ray_runner.py): it returns the rendered outputs, and only the driver writes files and the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vidmini.common.files import atomic_write
from vidmini.summaries.work import BatchOptions, FileResult, LibraryMaker, process_file

VIDEO_EXTENSIONS = {".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".ts", ".mts", ".mpg", ".mpeg", ".flv",
                    ".wmv", ".3gp", ".ogv"}
MANIFEST = "manifest.json"


# ---- inputs --------------------------------------------------------------------------------------------------
def discover(paths: Iterable[str]) -> list[str]:
    """Files as given (whatever they are: a bad one fails on its own) and video files found under folders,
    sorted and without duplicates."""
    found: dict[str, None] = {}
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in VIDEO_EXTENSIONS and not f.name.startswith("."):
                    found.setdefault(str(f.resolve()), None)
        else:
            found.setdefault(str(path.resolve()) if path.exists() else str(p), None)
    return list(found)


def stems(sources: list[str]) -> dict[str, str]:
    """Output names: the file's stem, with a hash of its path when two inputs share a stem."""
    base = {s: Path(s).stem or "video" for s in sources}
    counts: dict[str, int] = {}
    for b in base.values():
        counts[b] = counts.get(b, 0) + 1
    return {s: b if counts[b] == 1 else f"{b}-{hashlib.sha1(s.encode()).hexdigest()[:8]}" for s, b in base.items()}


def _signature(source: str) -> dict:
    try:
        st = os.stat(source)
    except OSError:
        return {}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---- the manifest --------------------------------------------------------------------------------------------
class Manifest:
    """`<out>/manifest.json`: per input its status (done/failed), options key, file signature, outputs, error.
    Rewritten atomically after every input, so a killed run loses at most the input in flight."""

    def __init__(self, out: Path) -> None:
        self.path = out / MANIFEST
        self.out = out
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {"version": 1, "files": {}}

    @property
    def files(self) -> dict[str, dict]:
        return self.data["files"]

    def is_done(self, source: str, key: str) -> bool:
        e = self.files.get(source)
        return bool(e and e["status"] == "done" and e.get("key") == key and e.get("signature") == _signature(source)
                    and all((self.out / o).exists() for o in e.get("outputs", [])))

    def record(self, result: FileResult, key: str, outputs: list[str]) -> None:
        self.files[result.source] = {
            "status": "done" if result.ok else "failed", "key": key, "signature": _signature(result.source),
            "outputs": outputs, "error": result.error, "video_id": result.video_id, "frames": result.frames,
            "duration": result.duration, "seconds": round(result.seconds, 3), "finished": time.time()}
        self.save()

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def write_result(out: Path, result: FileResult) -> list[str]:
    """The outputs and thumbnails into `out` (each by temp file + rename); returns their relative paths."""
    written = []
    items = {f"{result.stem}.{fmt}": text.encode() for fmt, text in result.outputs.items()}
    items.update(result.thumbnails)
    for rel, data in items.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
        written.append(rel)
    return sorted(written)


# ---- one input -----------------------------------------------------------------------------------------------
# ---- the batch -----------------------------------------------------------------------------------------------
@dataclass
class BatchReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    video_seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class _Bars:
    """A bar over files and one over the current file's frames (ingest, then summarizing), on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.files = tqdm(total=total, desc="files", unit="file", file=sys.stderr, disable=not enabled, position=0)
        self.frames = tqdm(desc="frames", unit="frame", file=sys.stderr, disable=not enabled, position=1, leave=False)

    def phase(self, name: str, phase: str, done: int, total: int | None) -> None:
        self.frames.set_description_str(f"{phase} {name}"[:40])
        self.frames.total, self.frames.n = total, done
        self.frames.refresh()

    def close(self) -> None:
        self.frames.close()
        self.files.close()


def run_batch(paths: Iterable[str], out: str | Path, options: BatchOptions, *, make_library: LibraryMaker,
              library=None, ray: bool = False, ray_address: str | None = None, workers: int | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None,
              on_dispatch: Callable[[str, int], None] | None = None) -> BatchReport:
    """Summarize every input not already done into `out`: locally with `library` (the service's Library; made
    by `make_library(options, home, device)` when None), or on Ray (`ray`/`ray_address`: each worker makes its
    own; `on_dispatch(source, worker pid)` as a file is handed out). The service passes its maker in
    (`vidmini.service.summaries`): this layer never reaches up for it."""
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: print(line, file=sys.stderr))
    manifest = Manifest(out)
    key = options.key()
    sources = discover(paths)
    names = stems(sources)
    report = BatchReport()
    todo = []
    for s in sources:
        (report.skipped if manifest.is_done(s, key) else todo).append(s)
    bars = _Bars(len(sources), progress)
    bars.files.update(len(report.skipped))

    def finished(result: FileResult) -> None:
        written = write_result(out, result) if result.ok else []
        manifest.record(result, key, written)
        if result.ok:
            report.done.append(result.source)
            report.video_seconds += result.duration or 0.0
            _library_copy(result)
        else:
            report.failed[result.source] = result.error or "failed"
            error = result.error or "failed"
            say(f"vidmini: failed: {error if result.source in error else f'{result.source}: {error}'}")
        bars.files.update(1)

    try:
        if ray or ray_address:
            from vidmini.summaries.ray_runner import run_on_ray

            run_on_ray(todo, names, options, finished, make_library, address=ray_address, workers=workers,
                       on_dispatch=on_dispatch)
        else:
            if library is None and todo:
                library = make_library(options, None, None)
            for s in todo:
                finished(process_file(library, s, names[s], options,
                                      lambda phase, done, total, s=s: bars.phase(names[s], phase, done, total)))
    finally:
        bars.close()
    report.seconds = time.perf_counter() - t0
    return report


def _library_copy(result: FileResult) -> None:
    """The JSON summary also under `$VIDMINI_HOME/summaries/<video id>.json`, where the app's summary tab reads
    it (best effort: the output folder is the product)."""
    from vidmini.common.paths import data_home

    if "json" not in result.outputs or not result.video_id:
        return
    try:
        folder = data_home() / "summaries"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{result.video_id}.json", result.outputs["json"])
    except OSError:
        pass
