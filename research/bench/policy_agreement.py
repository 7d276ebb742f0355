"""What a fusion subset or an incremental live prefix costs, measured on the default model's evaluation set.

Held-out synthetic videos (evaluation seeds, as `research/bench/eval_default_model.py`) are ingested through the real
path; each question is answered over its range with the exact `all` policy and with `uniform:K` /
`retrieved:K`. Printed per policy: cosine of the fused question Q' with `all`'s, greedy-answer agreement with
`all`, and accuracy against the truth. Then the live case: a session opened on the first half of each video,
the second half appended in `incremental` mode (the fused prefix P' stays the first half's mean), and
whole-video questions compared with the exact rebuild (cosine of P', agreement).

  python -m research.bench.policy_agreement --seed 1 --n 120
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from research.training.train import TRAIN_SEED_BASE
from vidmini.demo.questions import FAMILIES, make_questions
from vidmini.demo.render import write_video
from vidmini.demo.world import generate_timeline
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.load import choose_model, open_engine
from vidmini.engine.session import VideoSession
from vidmini.index.search import MomentSearch, frame_picker
from vidmini.ingest.job import IngestOptions, load_states, run_ingest
from vidmini.store.video_store import VideoStore

POLICIES = ("uniform:4", "uniform:16", "uniform:64", "retrieved:16")


def norm(text: str) -> str:
    return text.strip().strip(".!").strip().lower()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n", type=int, default=120, help="questions (spread over the six families)")
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--model", default=None)
    args = ap.parse_args(argv)
    engine = open_engine(choose_model(args.model))
    sampling = SamplingConfig(max_new_tokens=4, stop_ids=engine.eos_ids)
    rng = np.random.default_rng([args.seed, 13])
    per_video = max(1, args.n // (args.videos * len(FAMILIES)))
    rows: dict[str, list[tuple[float, bool, bool]]] = defaultdict(list)
    live: list[tuple[float, bool]] = []
    with tempfile.TemporaryDirectory(prefix="vidmini-policy-") as tmp:
        for i in range(args.videos):
            vseed = int(np.random.SeedSequence([args.seed, 500 + i]).generate_state(1)[0]) % TRAIN_SEED_BASE
            duration = int(rng.integers(120, 601))
            timeline = generate_timeline(vseed, duration)
            path = write_video(timeline, Path(tmp) / f"p{i}.mp4")
            result = run_ingest(str(path), engine, Path(tmp) / "home", IngestOptions())
            store = VideoStore.load_existing(result.store_path)
            states, times = load_states(store), store.timestamps().tolist()
            picker = frame_picker(MomentSearch(Path(tmp) / "home", engine.retrieval), store.video_id)
            session = VideoSession.from_states(engine, states, times, picker=picker)
            for q in make_questions(timeline, rng, per_family=per_video):
                start, end = max(0.0, q.start_s - 0.25), q.end_s + 0.25
                exact = session.ask(q.question, start, end, "all", sampling).result()
                q_all = session.fused_question(q.question, start, end, "all").flatten().float()
                for policy in POLICIES:
                    got = session.ask(q.question, start, end, policy, sampling).result()
                    q_sub = session.fused_question(q.question, start, end, policy).flatten().float()
                    cos = float(torch.nn.functional.cosine_similarity(q_all, q_sub, dim=0))
                    rows[policy].append((cos, norm(got.text) == norm(exact.text), norm(got.text) == norm(q.answer)))
                rows["all"].append((1.0, True, norm(exact.text) == norm(q.answer)))
            half = len(times) // 2
            grown = VideoSession.from_states(engine, states.select(slice(0, half)), times[:half],
                                             live_mode="incremental")
            grown.ask("What colour is the background?", sampling=sampling).result()  # builds the half's prefix
            grown.append(states.select(slice(half, len(times))), times[half:])
            for q in make_questions(timeline, rng, per_family=2):
                inc = grown.ask(q.question, policy="all", sampling=sampling).result()
                ref = session.ask(q.question, policy="all", sampling=sampling).result()
                live.append((float(inc.prefix_cosine), norm(inc.text) == norm(ref.text)))
            print(f"video {i}: {duration} s, {sum(len(v) for v in rows.values()) // (len(POLICIES) + 1)} questions "
                  f"so far", file=sys.stderr)
    print("| policy | questions | Q' cosine vs all (mean / min) | greedy agreement with all | accuracy |")
    print("| --- | --- | --- | --- | --- |")
    for policy in ("all", *POLICIES):
        r = rows[policy]
        cos = [c for c, _, _ in r]
        print(f"| {policy} | {len(r)} | {np.mean(cos):.4f} / {np.min(cos):.4f} | {np.mean([a for _, a, _ in r]):.3f} "
              f"| {np.mean([c for _, _, c in r]):.3f} |")
    print(f"\nincremental live prefix (first half's P' kept, second half appended), {len(live)} whole-video "
          f"questions: P' cosine vs exact mean {np.mean([c for c, _ in live]):.4f} (min {np.min([c for c, _ in live]):.4f}), "
          f"greedy agreement with the exact rebuild {np.mean([a for _, a in live]):.3f}")


if __name__ == "__main__":
    main()
