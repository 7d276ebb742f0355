"""Moment search on the default model: held-out synthetic videos with known truth, through the real CLI path.

For each generated video (never a training seed): `vidmini ingest`, then for queries whose answer is known
from the per-second truth ("the word MAP", "a red circle", "on a teal background"; each true in at most 40%
of the video, so that finding it is a search), `vidmini search QUERY --video ID -k 5 --json`. A query is found
when one of its five moments overlaps a second where the query is true. Ends with `recall@5: 0.NN`.

  python -m research.bench.eval_search --seed 1 --n 100
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from research.training.train import TRAIN_SEED_BASE
from vidmini.cli.main import main as cli
from vidmini.demo.render import write_video
from vidmini.demo.world import generate_timeline, truth_at

MAX_SHARE = 0.4  # a query true in more of the video than this is not a search


@dataclass
class Query:
    kind: str
    text: str
    seconds: set[int]


@dataclass
class Found:
    query: Query
    video_id: str
    moments: list[dict]

    @property
    def hit(self) -> bool:
        return any(any(m["start"] - 0.5 <= s <= m["end"] + 0.5 for s in self.query.seconds) for m in self.moments)


def queries_for(timeline, duration: int) -> list[Query]:
    """Every query the truth supports: words shown, (colour, kind) pairs, backgrounds."""
    by_text: dict[tuple[str, str], set[int]] = defaultdict(set)
    for t in range(duration):
        truth = truth_at(timeline, t)
        if truth.word:
            by_text[("text", f"the word {truth.word}")].add(t)
        for s in truth.shapes:
            by_text[("shape", f"a {s.colour} {s.kind}")].add(t)
        by_text[("background", f"on a {truth.background} background")].add(t)
    return [Query(kind, text, secs) for (kind, text), secs in sorted(by_text.items())
            if 2 <= len(secs) <= MAX_SHARE * duration]


def run_cli(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = cli(argv)
    if code != 0:
        raise RuntimeError(f"vidmini {' '.join(argv)} exited {code}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def evaluate(seed: int, n: int, workdir: Path, model: str | None = None, min_s: int = 60, max_s: int = 240,
             log=print, fps: int = 24) -> list[Found]:
    """`n` queries over videos of `min_s`..`max_s` s rendered at `fps` (the same worlds at any fps: ingest samples
    whole seconds, so a test renders fewer frames)."""
    os.environ["VIDMINI_HOME"] = str(workdir / "home")
    rng = np.random.default_rng([seed, 11])
    found: list[Found] = []
    per_video = max(3, n // 8)
    model_args = ["--model", model] if model else []
    for i in range(200):
        if len(found) >= n:
            break
        vseed = int(np.random.SeedSequence([seed, 1000 + i]).generate_state(1)[0]) % TRAIN_SEED_BASE
        duration = int(rng.integers(min_s, max_s + 1))
        timeline = generate_timeline(vseed, duration, fps=fps)
        path = write_video(timeline, workdir / f"search-{i}.mp4")
        video_id = run_cli(["ingest", str(path), "--json", *model_args])["id"]
        pool = queries_for(timeline, duration)
        picks = rng.choice(len(pool), size=min(per_video, len(pool), n - len(found)), replace=False)
        for j in picks:
            q = pool[int(j)]
            result = run_cli(["search", q.text, "--video", video_id, "-k", "5", "--json", *model_args])
            found.append(Found(q, video_id, result["moments"]))
        log(f"video {i}: {duration} s, {len(picks)} queries, recall so far {np.mean([f.hit for f in found]):.2f}")
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=100, help="number of queries")
    ap.add_argument("--model", default=None)
    ap.add_argument("--show-missed", type=int, default=10)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vidmini-search-eval-") as tmp:
        found = evaluate(args.seed, args.n, Path(tmp), args.model, log=lambda m: print(m, file=sys.stderr))
    for f in [f for f in found if not f.hit][: args.show_missed]:
        print(f"missed: {f.query.text!r} true at {sorted(f.query.seconds)[:12]} got "
              f"{[(m['start'], m['end']) for m in f.moments]}", file=sys.stderr)
    print("| kind | queries | recall@5 |\n| --- | --- | --- |")
    for kind in ("text", "shape", "background"):
        rows = [f for f in found if f.query.kind == kind]
        print(f"| {kind} | {len(rows)} | {np.mean([f.hit for f in rows]) if rows else float('nan'):.3f} |")
    print(f"recall@5: {np.mean([f.hit for f in found]):.2f}")


if __name__ == "__main__":
    main()
