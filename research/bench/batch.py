"""Batch analysis throughput: hours of video summarized per hour of wall time, locally (one process, one model)
versus on a local Ray instance with N workers (one model per actor), with the default model.

Each run starts from an empty data root (ingest included) and its own output folder; wall time includes the model
load (and for Ray, starting Ray and its actors). Generated synthetic-world videos; the outputs of both paths are
compared byte for byte.

    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 python -m research.bench.batch --videos 4 --seconds 300 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def run(mode: str, videos: Path, work: Path, label: str, events: tuple[str, ...], window: float | None,
        backend: str, **kw) -> dict:
    from vidmini.service.summaries import BatchOptions, run_batch
    from vidmini.summaries.summarize import SummarizeOptions

    home = work / f"home-{label}"
    os.environ["VIDMINI_HOME"] = str(home)  # an empty data root: ingest is part of the work
    opts = BatchOptions(SummarizeOptions(mode, window, events), ("md", "json", "srt", "vtt"), backend=backend)
    t0 = time.perf_counter()
    report = run_batch([str(videos)], work / f"out-{label}", opts, progress=False, **kw)
    wall = time.perf_counter() - t0
    assert not report.failed, report.failed
    hours = report.video_seconds / 3600
    return {"path": label, "files": len(report.done), "video_s": report.video_seconds, "wall_s": round(wall, 2),
            "video_hours_per_hour": round(hours / (wall / 3600), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=4)
    ap.add_argument("--seconds", type=int, default=300)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mode", default="lecture", choices=["lecture", "surveillance", "general"])
    ap.add_argument("--window", type=float, default=None)
    ap.add_argument("--backend", default="pyav", choices=["pyav", "ffmpeg"], help="ingest decoder")
    ap.add_argument("--out", default=None, help="append the results as one JSON line to this file")
    args = ap.parse_args()
    import ray
    import torch

    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    events = ("the word CAT is shown", "the background is teal") if args.mode == "surveillance" else ()
    with tempfile.TemporaryDirectory(prefix="vidmini-batch-bench-") as tmp:
        work = Path(tmp)
        videos = work / "videos"
        for i in range(args.videos):
            write_video(generate_timeline(100 + i, args.seconds), videos / f"video{i}.mp4")
            (videos / f"video{i}.json").unlink()
        local = run(args.mode, videos, work, "local", events, args.window, args.backend)
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        try:
            on_ray = run(args.mode, videos, work, f"ray-{args.workers}", events, args.window, args.backend,
                         ray=True, workers=args.workers)
        finally:
            ray.shutdown()
        same = outputs(work / "out-local") == outputs(work / f"out-ray-{args.workers}")
    result = {"mode": args.mode, "backend": args.backend, "videos": args.videos, "seconds_each": args.seconds, "same_outputs": same,
              "cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()], "machine": platform.node(),
              "runs": [local, on_ray]}
    print(json.dumps(result, indent=1))
    print("\n| path | files | video | wall | video hours / hour |\n| --- | --- | --- | --- | --- |")
    for r in result["runs"]:
        print(f"| {r['path']} | {r['files']} | {r['video_s'] / 60:.0f} min | {r['wall_s']:.1f} s | "
              f"{r['video_hours_per_hour']} |")
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
