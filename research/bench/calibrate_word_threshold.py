"""Where the demo model's word-shown threshold (`vidmini.summaries.describe.DEMO_WORD_THRESHOLD`) can sit for a set of weights.

Each frame of a few synthetic videos (seeds that no test or evaluation uses), written as H.264 and ingested as the
app ingests (1 fps exact decode → encode → store), is asked "What word is shown?" on its own. The highest
first-token probability among the world's words is split by whether the truth shows a word (over the whole
vocabulary a blank band's top token is often no word at all, e.g. "0" or end-of-turn). A threshold between the
blank frames' highest and the word frames' lowest probability separates them on these videos.

  python -m research.bench.calibrate_word_threshold [--model DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from vidmini.demo.questions import TEXT_Q
from vidmini.demo.render import write_video
from vidmini.demo.world import generate_timeline, truth_at
from vidmini.engine.load import choose_model, open_engine
from vidmini.ingest.job import IngestOptions, load_states, run_ingest
from vidmini.store.video_store import VideoStore
from vidmini.summaries.describe import word_token_ids

VIDEOS = ((424242, 80), (535353, 150), (646464, 200))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    args = ap.parse_args(argv)
    engine = open_engine(choose_model(args.model))
    word_ids = word_token_ids(engine.tokenizer)
    word_p, blank_p = [], []
    with tempfile.TemporaryDirectory(prefix="vidmini-calibrate-") as tmp:
        for seed, duration in VIDEOS:
            timeline = generate_timeline(seed, duration)
            path = write_video(timeline, Path(tmp) / f"calibrate-{seed}.mp4")
            ingested = run_ingest(str(path), engine, Path(tmp) / "store", IngestOptions(fps=1.0, mode="exact"))
            store = VideoStore.load_existing(ingested.store_path)
            states = load_states(store)
            seconds = np.rint(store.timestamps()).astype(int)
            for i, t in enumerate(seconds.tolist()):
                probs = torch.softmax(engine.first_logits(TEXT_Q, states.select([i])).reshape(-1).float(), -1)
                (word_p if truth_at(timeline, t).word else blank_p).append(float(probs[word_ids].max()))
    word_p, blank_p = np.array(word_p), np.array(blank_p)
    print("| frames | count | min | median | max |\n| --- | --- | --- | --- | --- |")
    for name, p in (("word shown", word_p), ("blank band", blank_p)):
        print(f"| {name} | {len(p)} | {p.min():.3f} | {np.median(p):.3f} | {p.max():.3f} |")
    if blank_p.max() < word_p.min():
        print(f"separable: any threshold in ({blank_p.max():.3f}, {word_p.min():.3f}]")
    else:
        print(f"not separable: {int((blank_p >= word_p.min()).sum())} blank frames at or above the lowest word frame")
    print("highest blank frames:", " ".join(f"{p:.3f}" for p in np.sort(blank_p)[::-1][:5]),
          "| lowest word frames:", " ".join(f"{p:.3f}" for p in np.sort(word_p)[:5]))


if __name__ == "__main__":
    main()
