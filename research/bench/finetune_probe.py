"""Issue-4 research probe: fine-tune the shipped demo model on short clips and watch per-family accuracy.

The vision tower is frozen and its features cached, so a step runs only projector/compressor, pre-fusion and
the LLM. Evaluation: teacher-forced exact answers on held-out clips of the same length range (seeds never used
for the shipped training). Nothing is saved; the figures in research/bench/RESULTS.md ("Issue 4, session of 2026-11-23
evening") came from the ad hoc script this one was cleaned up from (same arithmetic; its LLM-only run cached
the inputs instead of recomputing them), 1 thread:

  python -m research.bench.finetune_probe --train all --batch 32 --budget 48 --maxf 8 --lr 1e-3
  python -m research.bench.finetune_probe --train all --batch 32 --budget 32 --maxf 1 --lr 1e-3 --embed-scale 46
  python -m research.bench.finetune_probe --train llm --batch 64 --budget 64 --maxf 1 --lr 2e-3
  python -m research.bench.finetune_probe --train prefusion+llm --batch 32 --budget 32 --maxf 1 --lr 5e-4 --aux 1.0
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from research.training.train import (
    TRAIN_SEED_BASE,
    adamw,
    buckets,
    llm_loss,
    load_video,
    lr_at,
    normalize,
    question_pool,
)
from vidmini.engine.llama import attention, finish_layer, project_qkv
from vidmini.engine.load import choose_model, open_engine
from vidmini.engine.prompt import build_prompt

TRAINS = {
    "llm": ("model.layers.", "model.norm.", "lm_head"),
    "prefusion+llm": ("model.layers.", "model.norm.", "lm_head", "model.prefusion_layers.", "model.embed_tokens."),
    "all": ("model.layers.", "model.norm.", "lm_head", "model.prefusion_layers.", "model.embed_tokens.",
            "model.mm_projector.", "model.compressor."),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=300)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=32, help="clips per step at most")
    ap.add_argument("--budget", type=int, default=48, help="frames per step at most")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--maxf", type=int, default=8, help="longest clip, frames")
    ap.add_argument("--train", choices=sorted(TRAINS), default="all")
    ap.add_argument("--embed-scale", type=float, default=1.0)
    ap.add_argument("--aux", type=float, default=0.0, help="weight of the per-frame answer loss on the last Q' token")
    ap.add_argument("--every", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--held-videos", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    engine = open_engine(choose_model(None))
    model, tok = engine.model, engine.tokenizer
    t0 = time.time()
    size = model.vision.vision_tower.config.image_size
    videos = [load_video(TRAIN_SEED_BASE + 7_000_000 + i, int(rng.integers(10, 17)), size) for i in range(args.videos)]
    held = [load_video(TRAIN_SEED_BASE + 8_000_000 + i, 30, size) for i in range(args.held_videos)]

    @torch.no_grad()
    def features(v):
        out = model.vision.vision_tower(pixel_values=normalize(v.pixels), output_hidden_states=True)
        return out.hidden_states[model.vision.select_layer][:, 1:].clone()

    train_feats, held_feats = [features(v) for v in videos], [features(v) for v in held]
    prefix = build_prompt(tok, "").prefix

    def llm_inputs(batch, feats):
        """[mean P', c'…, mean Q'] for clips of equal length, with gradients through what is trained."""
        n = batch[0].end - batch[0].start + 1
        f = torch.cat([feats[s.video][s.start : s.end + 1] for s in batch])
        ids = torch.stack([torch.cat([prefix, s.question_ids]) for s in batch]).repeat_interleave(n, 0)
        patches = model.model.mm_projector(f)
        x = torch.cat([patches, model.model.mm_projector(model.model.compressor(f)), model.embed(ids)], 1)
        cos, sin = model.rope(torch.arange(x.shape[1])[None])
        for layer in model.model.prefusion_layers:
            q, k, v = project_qkv(layer, x, cos, sin)
            x = finish_layer(layer, x, attention(q, k, v, None, causal=True))
        p = patches.shape[1]
        c, text = x[:, p], x[:, p + 1 :]
        text = text.view(len(batch), n, *text.shape[1:]).mean(1)
        return torch.cat([text[:, : len(prefix)], c.view(len(batch), n, -1), text[:, len(prefix) :]], 1)

    pool = question_pool(videos, tok, rng, per_family=30, max_range=args.maxf)
    held_groups = buckets(question_pool(held, tok, np.random.default_rng(5), per_family=3, max_range=args.maxf))
    groups = buckets(pool)
    keys = sorted(groups)
    weights = np.array([len(groups[k]) for k in keys], float)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        right = defaultdict(list)
        for members in held_groups.values():
            for i in range(0, len(members), 64):
                b = members[i : i + 64]
                inputs, ans = llm_inputs(b, held_feats), torch.stack([s.answer_ids for s in b])
                x = torch.cat([inputs, model.embed(ans[:, :-1])], 1) if ans.shape[1] > 1 else inputs
                cos, sin = model.rope(torch.arange(x.shape[1])[None])
                for layer in model.model.layers:
                    q, k, v = project_qkv(layer, x, cos, sin)
                    x = finish_layer(layer, x, attention(q, k, v, None, causal=True))
                first = inputs.shape[1] - 1
                pred = model.logits(x[:, first : first + ans.shape[1]]).argmax(-1)
                for s, ok in zip(b, (pred[:, :-1] == ans[:, :-1]).all(-1).tolist(), strict=True):
                    right[s.family].append(ok)
        model.train()
        out = {f: round(float(np.mean(v)), 3) for f, v in sorted(right.items())}
        out["overall"] = round(float(np.mean([o for v in right.values() for o in v])), 3)
        return out

    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(args.embed_scale)
    print("step 0", evaluate(), flush=True)
    names = TRAINS[args.train]
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(names))
    params = [p for n, p in model.named_parameters() if n.startswith(names)]
    hidden = model.config.llama.hidden_size
    aux_head = torch.nn.Sequential(torch.nn.RMSNorm(hidden), torch.nn.Linear(hidden, model.config.llama.vocab_size))
    if args.aux:
        params += list(aux_head.parameters())
    opt = adamw(params, args.lr)
    model.train()
    losses = []
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, 50)
        key = keys[rng.choice(len(keys), p=weights / weights.sum())]
        members = groups[key]
        size_ = min(max(2, min(args.batch, args.budget // key[0])), len(members))
        b = [members[i] for i in rng.choice(len(members), size=size_, replace=False)]
        inputs, ans = llm_inputs(b, train_feats), torch.stack([s.answer_ids for s in b])
        loss = llm_loss(model, inputs, ans)
        if args.aux:
            loss = loss + args.aux * F.cross_entropy(aux_head(inputs[:, -1].float()), ans[:, 0])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.every == 0:
            print(f"step {step + 1} loss {np.mean(losses[-args.every:]):.3f} t={time.time() - t0:.0f}s", evaluate(),
                  flush=True)


if __name__ == "__main__":
    main()
