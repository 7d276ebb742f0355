"""Start-up and whole-command times of the `vidmini` CLI, against ffmpeg merely decoding the same clip.

  python -m research.bench.startup                # 3 repeats of each, a 60 s 1080p30 H.264 clip (made once)
  python -m research.bench.startup --repeats 5

Each row is the median wall time of fresh processes (so imports are counted, as a user pays them):
`vidmini --help`; `vidmini list` over a library holding one stored video; `ffmpeg -vf fps=1` decoding the clip to
nothing; `vidmini ingest` of the clip into an empty library (the shipped model; a new `$VIDMINI_HOME` each time, so
nothing is reused). Prints a table; the ingest/decode ratio is the figure the issue sets a bound on.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[2] / "research" / "bench" / "out"


def make_clip(seconds: int = 60) -> Path:
    path = OUT / f"startup_{seconds}s_1080p30.mp4"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc2=size=1920x1080:rate=30:d={seconds}",
                        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)], check=True)
    return path


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {res.stderr.strip()[-400:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=60)
    args = parser.parse_args()
    clip = make_clip(args.seconds)
    vidmini = [sys.executable, "-m", "vidmini.cli.main"]
    rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="vidmini-startup-") as tmp:
        listed_home = Path(tmp, "listed")
        env = {**os.environ, "VIDMINI_HOME": str(listed_home)}
        timed([*vidmini, "ingest", str(clip)], env)  # one stored video for `list`
        for _ in range(args.repeats):
            rows.setdefault("vidmini --help", []).append(timed([*vidmini, "--help"], env))
            rows.setdefault("vidmini list (1 stored video)", []).append(timed([*vidmini, "list"], env))
            rows.setdefault(f"ffmpeg -vf fps=1 decode ({args.seconds} s 1080p)", []).append(timed(
                ["ffmpeg", "-v", "error", "-threads", "0", "-i", str(clip), "-vf", "fps=1", "-f", "null", "-"], env))
            home = Path(tmp, "fresh")
            shutil.rmtree(home, ignore_errors=True)
            rows.setdefault(f"vidmini ingest ({args.seconds} s 1080p, empty library)", []).append(
                timed([*vidmini, "ingest", str(clip)], {**env, "VIDMINI_HOME": str(home)}))
    medians = {k: statistics.median(v) for k, v in rows.items()}
    print(f"| command | median s ({args.repeats} runs) | runs |")
    print("| --- | --- | --- |")
    for k, v in rows.items():
        print(f"| {k} | {medians[k]:.2f} | {', '.join(f'{x:.2f}' for x in v)} |")
    decode = next(v for k, v in medians.items() if k.startswith("ffmpeg"))
    ingest = next(v for k, v in medians.items() if k.startswith("vidmini ingest"))
    print(f"\ningest / decode = {ingest / decode:.2f}x (the issue's bound: 1.2x)")


if __name__ == "__main__":
    main()
