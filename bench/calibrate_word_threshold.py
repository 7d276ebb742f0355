"""Where the demo model's word-shown threshold (`app.describe.DEMO_WORD_THRESHOLD`) can sit for a set of weights.

Each frame of a few synthetic videos (seeds that no test or evaluation uses) is asked "What word is shown?" on its
own; the top first-token probability is split by whether the truth shows a word. A threshold between the blank
frames' highest and the word frames' lowest probability separates them on these videos.

  python bench/calibrate_word_threshold.py [--model DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.models import choose_model, open_engine  # noqa: E402
from synth.questions import TEXT_Q  # noqa: E402
from synth.render import render_samples  # noqa: E402
from synth.world import generate_timeline, truth_at  # noqa: E402

VIDEOS = ((424242, 80), (535353, 150), (646464, 200))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    args = ap.parse_args(argv)
    engine = open_engine(choose_model(args.model))
    word_p, blank_p = [], []
    for seed, duration in VIDEOS:
        timeline = generate_timeline(seed, duration)
        frames = [f for _, f in render_samples(timeline, 1.0)]
        states = engine.encode_frames(engine.frame_pixels(frames))
        for t in range(duration):
            probs = torch.softmax(engine.first_logits(TEXT_Q, states.select([t])).reshape(-1).float(), -1)
            (word_p if truth_at(timeline, t).word else blank_p).append(float(probs.max()))
    word_p, blank_p = np.array(word_p), np.array(blank_p)
    print("| frames | count | min | median | max |\n| --- | --- | --- | --- | --- |")
    for name, p in (("word shown", word_p), ("blank band", blank_p)):
        print(f"| {name} | {len(p)} | {p.min():.3f} | {np.median(p):.3f} | {p.max():.3f} |")
    if blank_p.max() < word_p.min():
        print(f"separable: any threshold in ({blank_p.max():.3f}, {word_p.min():.3f}]")
    else:
        print(f"not separable: {int((blank_p >= word_p.min()).sum())} blank frames at or above the lowest word frame")


if __name__ == "__main__":
    main()
