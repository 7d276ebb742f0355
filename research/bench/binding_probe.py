"""Where "Is there a <colour> <kind>?" can be answered inside pre-fusion: probes on the question's states.

For every frame of N held-out training-distribution videos (12 s) one presence question is drawn (half pairs that
are there, half hard negatives), its tokens are run through each pre-fusion layer against the frame's cached
states, and small probes (linear, and a one-hidden-layer MLP) are fitted on 75% of the videos to say whether the
asked pair is in the frame, read from: the kind word alone, the kind word and the colour word before it together,
the question's last token. Tells whether the facts are there and where (the binding stage, `synth.train`).

  python -m research.bench.binding_probe --videos 120 [--model DIR]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from research.training.qfusion import (
    Ask,
    FrameFacts,
    build_prefix_cache,
    kind_positions,
    question_ids,
    tower_features,
)
from research.training.train import TRAIN_SEED_BASE, load_video, normalize
from vidmini.engine.llama import attention, finish_layer, project_qkv
from vidmini.engine.load import SHIPPED_MODEL_DIR, ModelChoice, open_engine
from vidmini.engine.prompt import build_prompt


def draw(rng: np.random.Generator, here: np.ndarray) -> tuple[Ask, int]:
    if rng.random() < 0.5 and here.any():
        c, k = np.argwhere(here)[rng.integers(here.sum())]
    else:
        absent = np.argwhere(~here)
        hard = [(c, k) for c, k in absent if here[:, k].any() or here[c].any()]
        c, k = hard[rng.integers(len(hard))] if hard else absent[rng.integers(len(absent))]
    return Ask("presence", int(c), int(k)), int(here[c, k])


def fit(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, mlp: bool, steps: int = 1500) -> float:
    torch.manual_seed(0)
    x = x / x.norm(dim=1, keepdim=True) * x.shape[1] ** 0.5
    head = (torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 1)) if mlp
            else torch.nn.Linear(x.shape[1], 1))
    opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=0.01)
    xt, yt = x[train], y[train]
    for _ in range(steps):
        b = torch.randint(len(xt), (256,))
        loss = F.binary_cross_entropy_with_logits(head(xt[b])[:, 0], yt[b])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((head(x[~train])[:, 0] > 0).float() == y[~train]).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--videos", type=int, default=120)
    ap.add_argument("--model", default=str(SHIPPED_MODEL_DIR))
    args = ap.parse_args()
    engine = open_engine(ModelChoice(args.model, args.model))
    model, tok = engine.model, engine.tokenizer
    rng = np.random.default_rng(0)
    size = model.vision.vision_tower.config.image_size
    videos = [load_video(TRAIN_SEED_BASE + 61_000 + i, 12, size) for i in range(args.videos)]
    layers = model.model.prefusion_layers
    cache = build_prefix_cache(model, tower_features(model, [v.pixels for v in videos], normalize),
                               build_prompt(tok, "").prefix, len(layers))
    facts = [FrameFacts.from_probes(v.probes) for v in videos]
    frames = [(v, t) for v, video in enumerate(videos) for t in range(len(video.pixels))]
    asks, ys = zip(*(draw(rng, facts[v].pairs[t]) for v, t in frames), strict=True)
    y = torch.tensor(ys, dtype=torch.float32)
    train = torch.tensor([v < int(0.75 * len(videos)) for v, _ in frames])
    s = cache.next_position
    depths: list[list[torch.Tensor]] = [[] for _ in range(len(layers) + 1)]
    with torch.no_grad():
        for start in range(0, len(frames), 256):
            idx = list(range(start, min(len(frames), start + 256)))
            q = torch.stack([question_ids(tok, asks[i]) for i in idx])
            t = q.shape[1]
            x = model.embed(q)
            cos, sin = model.rope(torch.arange(s, s + t)[None])
            mask = torch.cat([torch.ones(t, s, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], 1)
            rows = torch.tensor(idx)
            depths[0].append(x)
            for i, layer in enumerate(layers):
                qq, k, v = project_qkv(layer, x, cos, sin)
                ks = torch.cat([cache.keys[i][rows].float(), k], 2)
                vs = torch.cat([cache.values[i][rows].float(), v], 2)
                x = finish_layer(layer, x, attention(qq, ks, vs, mask, causal=False))
                depths[i + 1].append(x)
    [(kind_at, _)] = kind_positions(tok, question_ids(tok, asks[0]))  # one template: the same position always
    print(f"{len(frames)} frames, {int(y.sum())} asked pairs there; held-out base rate "
          f"{max(y[~train].mean().item(), 1 - y[~train].mean().item()):.3f}")
    print("| after layer | kind word, linear | kind word, MLP | kind + colour word, MLP | last token, linear | "
          "last token, MLP |")
    print("| --- | --- | --- | --- | --- | --- |")
    for depth, parts in enumerate(depths):
        states = torch.cat(parts)
        kind, colour, last = states[:, kind_at], states[:, kind_at - 1], states[:, -1]
        cells = [fit(kind, y, train, False), fit(kind, y, train, True),
                 fit(torch.cat([kind, colour], 1), y, train, True), fit(last, y, train, False),
                 fit(last, y, train, True)]
        name = "embeddings" if depth == 0 else str(depth)
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
