"""`vidmini summarize`: folders of video → ingest (stores reused) → summaries in md/json/srt/vtt, resumably.

A manifest in the output folder records every input as done or failed with the options it was run with; a
rerun skips inputs that are done with the same options and unchanged since, and retries the failed ones. One
failing input is reported and the rest go on. `process_file` is the unit of work both here and on Ray workers
(vidmini/summaries/ray_runner.py): it returns the rendered outputs, and only the driver writes files and the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vidmini.common.files import atomic_write
from vidmini.summaries.formats import FORMATS
from vidmini.summaries.summarize import MODES, SummarizeOptions
from vidmini.summaries.work import BatchOptions, FileResult, process_file

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


def run_batch(paths: Iterable[str], out: str | Path, options: BatchOptions, *, library=None,
              ray: bool = False, ray_address: str | None = None, workers: int | None = None,
              progress: bool = True, log: Callable[[str], None] | None = None,
              on_dispatch: Callable[[str, int], None] | None = None) -> BatchReport:
    """Summarize every input not already done into `out`; locally with `library` (an app.library.Library, made
    here when None) or on Ray (`ray`/`ray_address`; `on_dispatch(source, worker pid)` as a file is handed out)."""
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

            run_on_ray(todo, names, options, finished, address=ray_address, workers=workers, on_dispatch=on_dispatch)
        else:
            if library is None:
                from vidmini.service.library import Library

                library = Library(model=options.model, device=options.device, dtype=options.dtype)
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


# ---- the command ---------------------------------------------------------------------------------------------
def add_parser(sub) -> None:
    p = sub.add_parser("summarize", help="summarize files and folders of video: chapters, event logs, timelines")
    p.add_argument("paths", nargs="+", metavar="PATH", help="video files or folders (searched recursively)")
    p.add_argument("--mode", choices=MODES, default="general")
    p.add_argument("--format", dest="formats", action="append", choices=FORMATS,
                   help="output format; repeat for several (default: md and json)")
    p.add_argument("--out", default="summaries", help="output folder (default: ./summaries); holds manifest.json")
    p.add_argument("--window", type=float, default=None,
                   help="seconds per window (default 60; surveillance: 10, the coarse scan before per-frame refining)")
    p.add_argument("--events", nargs="+", default=[], metavar="EVENT", help='surveillance: e.g. "a person enters"')
    p.add_argument("--fps", type=float, default=1.0, help="ingest sampling rate")
    p.add_argument("--backend", choices=["pyav", "ffmpeg", "decord"], default="pyav", help="ingest decoder")
    p.add_argument("--model", help="checkpoint directory or Hugging Face id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--ray", action="store_true", help="run on a local Ray instance")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="run on an existing Ray cluster (host:port)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")
    p.add_argument("--json", action="store_true", help="print the batch report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_summarize(args: argparse.Namespace) -> int:
    from vidmini.common.errors import UsageError

    if not 0.05 <= args.fps <= 30:
        raise UsageError("--fps must be between 0.05 and 30")
    try:
        summarize = SummarizeOptions(args.mode, args.window, tuple(args.events))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.events and args.mode != "surveillance":
        raise UsageError("--events apply to --mode surveillance")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be >= 1")
    options = BatchOptions(summarize, tuple(dict.fromkeys(args.formats or ["md", "json"])), args.model,
                           args.device, args.dtype, args.fps, args.backend)
    report = run_batch(args.paths, args.out, options, ray=args.ray, ray_address=args.ray_address,
                       workers=args.workers, progress=not args.quiet)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"{len(report.done)} summarized, {len(report.skipped)} already done, {len(report.failed)} failed "
              f"→ {args.out}")
    return 2 if report.failed else 0
