"""Decode and ingest throughput: sampler strategies against the ffmpeg CLI pipe on the same file, same run.

  python -m research.bench.ingest                       # 10-min 1080p30 and 3-hour 360p30 H.264 (generated once)
  python -m research.bench.ingest --short-min 1 --long-min 10   # quicker

Each strategy runs in its own subprocess so its peak RSS is its own. Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "research" / "bench" / "out"

STRATEGIES = {  # decode only: FrameSampler at 1 fps, frames discarded
    "pyav exact": {"mode": "exact"},
    "pyav fast": {"mode": "fast"},
    "pyav exact, 336² in reformat": {"mode": "exact", "size": [336, 336]},
    "pyav fast, 336² in reformat": {"mode": "fast", "size": [336, 336]},
    "ffmpeg-cli backend (exact)": {"mode": "exact", "backend": "ffmpeg"},
    "decord backend": {"mode": "exact", "backend": "decord", "needs": "decord"},
}

CHILD = """
import json, sys, time, resource
sys.path.insert(0, {repo!r})
from vidmini.ingest.sampler import FrameSampler
args = json.loads(sys.argv[1])
size = tuple(args["size"]) if args.get("size") else None
t0 = time.perf_counter(); n = 0
s = FrameSampler(args["path"], mode=args["mode"], size=size, backend=args.get("backend", "pyav"))
for f in s:
    n += 1
usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
rss = max(u.ru_maxrss for u in usage)
cpu = sum(u.ru_utime + u.ru_stime for u in usage)
print(json.dumps({{"frames": n, "seconds": time.perf_counter() - t0, "rss_mb": rss / 1024, "cpu_s": cpu,
                  "decoded": s.stats.frames_decoded, "plan": s.strategy, "errors": s.decode_errors}}))
"""

INGEST_CHILD = """
import json, sys, time, resource, tempfile
sys.path.insert(0, {repo!r})
from pathlib import Path
from vidmini.engine.load import choose_model, open_engine
from vidmini.ingest.job import IngestOptions, run_ingest
engine = open_engine(choose_model(None))
with tempfile.TemporaryDirectory() as root:
    t0 = time.perf_counter()
    r = run_ingest(sys.argv[1], engine, Path(root), IngestOptions(mode=sys.argv[2]))
    print(json.dumps({{"frames": r.frames, "seconds": time.perf_counter() - t0, "model": engine.name,
                      "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


SEGMENT_MIN = 10.0  # longer files repeat a 10-minute segment (stream copy): 3 hours generate in ~2 minutes


def generate(path: Path, minutes: float, size: str) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    seg_min = min(minutes, SEGMENT_MIN)
    seg = path if seg_min == minutes else path.with_name(path.stem + f".seg{seg_min:g}min.mp4")
    if not seg.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}:rate=30:duration={seg_min * 60}", "-c:v", "libx264", "-preset",
                        "ultrafast", "-x264-params", "bframes=3:b-adapt=0", "-g", "250", "-pix_fmt", "yuv420p",
                        str(seg) + ".tmp.mp4"], check=True)  # B-frames, as in most real footage
        Path(str(seg) + ".tmp.mp4").rename(seg)
    if seg != path:  # -stream_loop keeps timestamps running on across the copies
        loops = round(minutes / seg_min) - 1
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", str(loops), "-i", str(seg), "-c", "copy",
                        str(path) + ".tmp.mp4"], check=True)
        Path(str(path) + ".tmp.mp4").rename(path)
    print(f"generated {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def ffmpeg_pipe(path: Path) -> dict:
    """The baseline: ffmpeg decodes everything, fps=1 picks frames, rgb24 down a pipe (read and discarded)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(["ffmpeg", "-v", "error", "-i", str(path), "-vf", "fps=1", "-f", "rawvideo",
                             "-pix_fmt", "rgb24", "-"], stdout=subprocess.PIPE)
    nbytes = 0
    while chunk := proc.stdout.read(1 << 20):
        nbytes += len(chunk)
    _, _, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
    proc.returncode = 0
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime}


def child(code: str, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short-min", type=float, default=10.0)
    ap.add_argument("--long-min", type=float, default=180.0)
    ap.add_argument("--skip-long", action="store_true")
    ap.add_argument("--skip-short", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only the matching strategies")
    ap.add_argument("--ingest", action="store_true", help="also time the whole ingest with the default model")
    ap.add_argument("--ingest-only", action="store_true", help="skip the sampler-only strategies")
    args = ap.parse_args()
    files = []
    if not args.skip_short:
        files.append((generate(OUT / f"bench-{args.short_min:g}min-1080p-b3.mp4", args.short_min, "1920x1080"),
                      args.short_min))
    if not args.skip_long:
        files.append((generate(OUT / f"bench-{args.long_min:g}min-360p-b3.mp4", args.long_min, "640x360"),
                      args.long_min))
    rows = []
    decode_rows = []
    for path, minutes in files:
        base = ffmpeg_pipe(path)
        print(f"{path.name}: ffmpeg pipe {base['seconds']:.1f} s, {base['rss_mb']:.0f} MB", flush=True)
        for name, opts in ({} if args.ingest_only else STRATEGIES).items():
            if args.only and not any(part and part in name for part in args.only.split(",")):
                continue
            if opts.get("needs") and importlib.util.find_spec(opts["needs"]) is None:
                print(f"{name}: skipped, {opts['needs']} is not installed", flush=True)
                continue
            r = child(CHILD.format(repo=str(REPO)), json.dumps({"path": str(path), **opts}))
            decode_rows.append((path.name, minutes, name, r, base))
            print(path.name, name, r, flush=True)
        if args.ingest or args.ingest_only:
            for mode in ("exact", "fast"):
                r = child(INGEST_CHILD.format(repo=str(REPO)), str(path), mode)
                rows.append((path.name, minutes, f"whole ingest ({mode}), {r['model']}", r, base))
                print(path.name, "ingest", mode, r, flush=True)
    print()
    if decode_rows:
        print_decode_table(decode_rows)
    if not rows:
        return
    print()
    print("| file | strategy | frames | seconds | frames/s | × real time | ffmpeg pipe (s) | vs ffmpeg pipe | "
          "peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fname, minutes, name, r, base in rows:
        print(f"| {fname} | {name} | {r['frames']:,} | {r['seconds']:.1f} | {r['frames'] / r['seconds']:.1f} | "
              f"{minutes * 60 / r['seconds']:.0f}× | {base['seconds']:.1f} | {base['seconds'] / r['seconds']:.2f}× | "
              f"{r['rss_mb']:.0f} MB |")


def print_decode_table(rows: list) -> None:
    """Decode-only rows: the sampler against the ffmpeg pipe measured in the same run on the same file."""
    print("| file | strategy | frames out | frames decoded | seconds (CPU s) | frames/s | × real time | "
          "ffmpeg pipe s (CPU s) | vs ffmpeg pipe: wall (CPU) | peak RSS (pipe's) | plan |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for fname, minutes, name, r, base in rows:
        print(f"| {fname} | {name} | {r['frames']:,} | {r['decoded']:,} | {r['seconds']:.1f} ({r['cpu_s']:.0f}) | "
              f"{r['frames'] / r['seconds']:.1f} | {minutes * 60 / r['seconds']:.0f}× | "
              f"{base['seconds']:.1f} ({base['cpu_s']:.0f}) | {base['seconds'] / r['seconds']:.2f}× "
              f"({base['cpu_s'] / r['cpu_s']:.2f}×) | {r['rss_mb']:.0f} MB ({base['rss_mb']:.0f} MB) | {r['plan']} |")


if __name__ == "__main__":
    main()
