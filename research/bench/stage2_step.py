"""Stage 2's step, clip by clip (`clip_questions_forward` per clip, one backward each: the recipe before
2026-12-03) against one pass over the step's clips (`clips_questions_forward`, one backward), on the same drawn
clips: forward + backward time per step and how far the two passes' losses and gradients are apart.

  python -m research.bench.stage2_step                # shipped demo model, 12 clips a step, 20 steps
  python -m research.bench.stage2_step --steps 40 --model DIR
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from research.training.train import (
    FAMILY_WEIGHTS,
    TRAIN_SEED_BASE,
    FusedQuestionBank,
    QATokens,
    clip_questions_forward,
    clips_questions_forward,
    draw_clip,
    encode_states,
    load_video,
    question_pool,
)
from vidmini.demo.questions import timeline_facts
from vidmini.engine.load import SHIPPED_MODEL_DIR, ModelChoice, open_engine
from vidmini.engine.prompt import build_prompt


def draw_steps(model, tok, steps: int, batch: int, videos: int, rng: np.random.Generator) -> list[list[tuple]]:
    """Stage 2's own draw (pool weighted by family, 3 more questions per clip) on long training-seed videos,
    with every fused question computed up front, so the timed part is the LLM's forward and backward only."""
    long = [load_video(TRAIN_SEED_BASE + 50_000 + i, int(rng.integers(60, 601)), 80) for i in range(videos)]
    prefix = build_prompt(tok, "").prefix
    states = encode_states(model, long, prefix)
    bank, ids = FusedQuestionBank(model, states), QATokens(tok)
    facts = [timeline_facts(v.timeline) for v in long]
    pool = question_pool(long, tok, rng, per_family=60, max_range=None)
    weights = np.array([FAMILY_WEIGHTS[s.family] for s in pool])
    weights /= weights.sum()
    seen_things = [np.concatenate([v.probes["counts"], v.probes["present"]], 1) for v in long]
    out = []
    for _ in range(steps):
        clips = [draw_clip(pool[i], facts, states, bank, ids, 3, rng, seen_things)
                 for i in rng.choice(len(pool), size=batch, replace=False, p=weights)]
        out.append([(c.inputs, c.fused, c.answers) for c in clips])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    engine = open_engine(ModelChoice(args.model, args.model))
    model, tok = engine.model, engine.tokenizer
    model.eval()
    steps = draw_steps(model, tok, args.steps, args.batch, args.videos, np.random.default_rng(args.seed))
    params = list(model.model.layers.parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)

    def per_clip(clips):
        total = 0.0
        for inputs, fused, answers in clips:
            qa, _, _ = clip_questions_forward(model, inputs, fused, answers)
            (qa.mean() / len(clips)).backward()
            total += qa.mean().item() / len(clips)
        return total

    def one_pass(clips):
        qas, _ = clips_questions_forward(model, [c[0] for c in clips], [c[1] for c in clips], [c[2] for c in clips])
        loss = torch.stack([qa.mean() for qa in qas]).sum() / len(clips)
        loss.backward()
        return loss.item()

    rows = {}
    for name, fn in (("clip by clip", per_clip), ("one pass", one_pass)):
        times, losses, grads = [], [], []
        for clips in steps:
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            losses.append(fn(clips))
            times.append(time.perf_counter() - t0)
            grads.append(torch.cat([p.grad.flatten() for p in params]))
        rows[name] = (times, losses, grads)
    frames = [sum(len(c[0]) for c in clips) for clips in steps]
    (t_a, l_a, g_a), (t_b, l_b, g_b) = rows["clip by clip"], rows["one pass"]
    loss_gap = max(abs(a - b) for a, b in zip(l_a, l_b, strict=True))
    grad_gap = max(((a - b).norm() / a.norm()).item() for a, b in zip(g_a, g_b, strict=True))
    print(f"{args.steps} steps of {args.batch} clips (LLM inputs per step: median {int(np.median(frames))} positions), "
          f"torch threads {torch.get_num_threads()}")
    print("| stage-2 step | median s | mean s |")
    print("| --- | --- | --- |")
    for name, (times, _, _) in rows.items():
        print(f"| {name} | {np.median(times):.3f} | {np.mean(times):.3f} |")
    print(f"speed-up (median): {np.median(t_a) / np.median(t_b):.2f}x; max |loss difference| {loss_gap:.2e}; "
          f"max relative gradient difference {grad_gap:.2e}")


if __name__ == "__main__":
    main()
