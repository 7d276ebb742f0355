"""Held-out accuracy of the shipped demo model on the synthetic world, through the real product path.

Videos of 1–10 minutes are generated from `--seed` (never a training seed), written as H.264 files, ingested
(decode at 1 fps → encode → store on disk), and every question is answered from the stored states restricted
to its time range. Prints accuracy per family and ends with `overall accuracy: 0.NN`.

  python -m research.bench.eval_default_model --seed 1 --n 600
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from research.training.train import TRAIN_SEED_BASE
from vidmini.demo.questions import FAMILIES, make_questions
from vidmini.demo.render import write_video
from vidmini.demo.world import generate_timeline
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.load import choose_model, open_engine
from vidmini.ingest.job import IngestOptions, load_states, run_ingest
from vidmini.store.video_store import VideoStore


@dataclass
class Result:
    family: str
    question: str
    start_s: int
    end_s: int
    expected: str
    got: str

    @property
    def correct(self) -> bool:
        return normalize(self.got) == normalize(self.expected)


def normalize(text: str) -> str:
    return text.strip().strip(".!").strip().lower()


def video_seeds(seed: int, count: int) -> list[int]:
    """Evaluation timelines: derived from (seed, i), always below the training seeds' range."""
    return [int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) % TRAIN_SEED_BASE for i in range(count)]


def evaluate(seed: int, n: int, model: str | None, workdir: Path, min_s: int = 60, max_s: int = 600,
             log=print, fps: int = 24) -> list[Result]:
    """`n` questions over videos rendered at `fps` (the same worlds at any fps: ingest reads whole seconds)."""
    engine = open_engine(choose_model(model))
    rng = np.random.default_rng([seed, 7])
    want = -(-n // len(FAMILIES))  # questions per family
    per_video = max(1, -(-want // 6))  # spread each family over at least ~6 videos
    sampling = SamplingConfig(max_new_tokens=8, stop_ids=engine.eos_ids)
    by_family: dict[str, list[Result]] = defaultdict(list)
    for i, vseed in enumerate(video_seeds(seed, 10 * (6 + want // per_video))):
        if all(len(by_family[f]) >= want for f in FAMILIES):
            break
        duration = int(rng.integers(min_s, max_s + 1))
        timeline = generate_timeline(vseed, duration, fps=fps)
        path = write_video(timeline, workdir / f"eval-{i}.mp4")
        t0 = time.perf_counter()
        ingested = run_ingest(str(path), engine, workdir / "store", IngestOptions(fps=1.0, mode="exact"))
        store = VideoStore.load_existing(ingested.store_path)
        states = load_states(store)
        seconds = np.rint(store.timestamps()).astype(int)
        questions = [q for q in make_questions(timeline, rng, per_family=per_video)
                     if len(by_family[q.family]) < want]
        for q in questions:
            index = np.flatnonzero((seconds >= q.start_s) & (seconds <= q.end_s))
            ans = engine.collect(engine.answer(q.question, states.select(index.tolist()), sampling), len(index))
            by_family[q.family].append(Result(q.family, q.question, q.start_s, q.end_s, q.answer, ans.text))
        path.unlink()
        log(f"video {i} (seed {vseed}): {duration} s, {ingested.frames} frames, {len(questions)} questions "
            f"({time.perf_counter() - t0:.1f} s)")
    return [r for f in FAMILIES for r in by_family[f]]


def report(results: list[Result]) -> float:
    by_family: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_family[r.family].append(r)
    print("| family | questions | accuracy |\n| --- | --- | --- |")
    for family in FAMILIES:
        rows = by_family.get(family, [])
        acc = sum(r.correct for r in rows) / len(rows) if rows else float("nan")
        print(f"| {family} | {len(rows)} | {acc:.3f} |")
    overall = sum(r.correct for r in results) / max(1, len(results))
    print(f"overall accuracy: {overall:.2f}")
    return overall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=600, help="number of questions (spread over the six families)")
    ap.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    ap.add_argument("--min-s", type=int, default=60)
    ap.add_argument("--max-s", type=int, default=600)
    ap.add_argument("--show-wrong", type=int, default=10)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="vidmini-eval-") as tmp:
        results = evaluate(args.seed, args.n, args.model, Path(tmp), args.min_s, args.max_s,
                           log=lambda m: print(m, file=sys.stderr))
    for r in [r for r in results if not r.correct][: args.show_wrong]:
        print(f"wrong: [{r.family}] {r.question} ({r.start_s}-{r.end_s} s) expected {r.expected!r} got {r.got!r}",
              file=sys.stderr)
    report(results)


if __name__ == "__main__":
    main()
