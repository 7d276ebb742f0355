"""Train the shipped demo model on the synthetic world (`make model`): seeded, CPU; about two hours on 2 cores.

Stage 0 (perception, single frames from many short videos, so few frames repeat): vision tower, compressor,
projector and pre-fusion learn to put what a frame shows into its one fused token c'. Side losses only: heads
on each grid cell's patch features (which kind, which colour and which (colour, kind) pair sits there: without
them the tower learned words and backgrounds but not shapes; the pair class binds colour to kind in one linear
feature), probes of c' (which shapes, counts, word, background, and what each of the six cells holds — the
per-cell probe keeps the binding through the compressor's averaging), and CLIP's contrastive loss between frames
and captions (trains the text tower used by search). All heads are thrown away.
Stage 1 (end to end, clips of 1–8 frames): the world's questions, side losses kept.
Question fusion (research.training.qfusion): a third pre-fusion layer is added as the identity and trained, with everything
before it frozen and cached, so each frame's fused question carries that frame's answer (side heads at the
question's kind words and last token, per frame and over weighted bags of frames, which is what the LLM reads).
Stage 2 (LLM only, clips up to 10 minutes): everything before the LLM is frozen, so each frame's states are
computed once by the engine's own `prefuse_prefix`, and each frame's fused question per question text once (the
mean over a clip's frames is what `prefuse_question` gives) — the numbers the product feeds the LLM. Each clip is
asked several questions over one LLM pass of its frames (the mask is causal: the product's KV cache, with
gradients). A side head at the frame positions learns which kinds and which (colour, kind) pairs are there and
were seen earlier in the clip (what "which appears first" and "is there" build on).
Binding (a fourth pre-fusion layer, question fusion again on top of the third, then stage 2 continued as "2c"):
in "Is there a green triangle?" the word "triangle" reads the triangles' colours from the patches, but nothing
before it brings "green" there; one head of the new layer is told to look from the kind word at the word before
it, so "is the asked colour on this kind" becomes a per-frame fact at the kind word (`stage_binding`).
Stage 3 (search): the vision tower's last layer (LLaVA-Mini reads the one before it), the projections and the
text tower, tuned for text → frame retrieval on frames cached up to that layer; no answer changes.

  python -m research.training.train --out models/vidmini-demo            # the shipped weights (~2 h on 2 cores)
  python -m research.training.train --out models/vidmini-demo --search-only   # stage 3 alone on trained weights (~11 min)
  python -m research.training.train --out DIR --binding-only              # binding + 2c alone on a run without it (~26 min)
  python -m research.training.train --out /tmp/m --videos 20 --long-videos 2 --stage0-steps 20 --stage1-steps 20 \
      --qfusion-steps 10 --qfusion-videos 20 --stage2-steps 10 --search-steps 10 --search-videos 4 \
      --binding-steps 10 --binding-videos 10 --binding-stage2-steps 10  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from research.training.qfusion import QFusionConfig, add_prefusion_layer, run_question_fusion
from vidmini.demo.model import (
    STORED_DTYPE,
    DemoSpec,
    build_demo_model,
    build_tokenizer,
    round_to_stored,
    save_demo,
)
from vidmini.demo.questions import (
    ORDER_RE,
    PRESENCE_RE,
    Question,
    make_questions,
    range_questions,
    timeline_facts,
)
from vidmini.demo.render import render_samples
from vidmini.demo.tokenizer import generation_eos_ids
from vidmini.demo.world import (
    BACKGROUNDS,
    CELLS,
    KINDS,
    SHAPE_COLOURS,
    WORDS,
    cell_box,
    generate_timeline,
    truth_at,
)
from vidmini.engine.fusion import (
    FrameStates,
    fused_question_frames,
    mean_over_frames,
    prefuse_prefix,
    question_pass,
)
from vidmini.engine.llama import attention, finish_layer, project_qkv
from vidmini.engine.model import LlavaMiniModel
from vidmini.engine.prompt import build_prompt
from vidmini.engine.vision import resize_nearest

TRAIN_SEED_BASE = 1_000_000_000  # training timelines use seeds >= this; evaluation seeds stay below it
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PAIRS = [(c, k) for k in KINDS for c in SHAPE_COLOURS]
MAX_COUNT = 6


@dataclass
class TrainConfig:
    seed: int = 0
    videos: int = 3000  # stage-0/1 timelines: many short ones, so frames are diverse (few repeat)
    video_s: tuple[int, int] = (10, 16)
    long_videos: int = 36  # stage-2 timelines
    long_video_s: tuple[int, int] = (60, 600)
    stage0_steps: int = 1200  # perception: single frames, probes + contrastive
    stage0_batch: int = 128
    stage1_steps: int = 600
    stage1_batch: int = 24
    stage1_max_frames: int = 8
    stage1_per_family: int = 40  # questions per family per video in stage 1's pool
    qfusion_steps: int = 1200  # question fusion: the added last pre-fusion layer
    qfusion_videos: int = 1500
    qfusion_lr: float = 1e-3
    stage2_steps: int = 1800
    stage2_batch: int = 12  # clips per step
    stage2_questions: int = 4  # questions per clip (one LLM pass over the clip)
    lr: float = 1.5e-3
    stage2_lr: float = 6e-4
    seen_weight: float = 0.5
    search_steps: int = 1150  # stage 3: text → frame search
    search_batch: int = 192
    search_videos: int = 400
    search_lr: float = 2e-3
    probe_weight: float = 1.0
    presence_weight: float = 1.0  # the c' presence probe's weight within the probe loss
    bag_weight: float = 0.0  # presence read from the plain mean of the patch features (additive coding)
    clip_weight: float = 0.5
    onset_head: bool = False  # stage 2's frame head also learns where each kind first appears in the clip
    retrieval_weight: float = 0.0  # stage 2: one LLM head's attention at the answer position finds the evidence
    retrieval_layer: int = 1  # ... in this LLM layer (0-based; reads the frame head's layer-1 features)
    retrieval_head: int = 0
    retrieval_steps: int = 0  # stage 2b: stage 2 continued with that attention loss (0: no stage 2b)
    retrieval_videos: int = 36
    retrieval_lr: float = 3e-4
    retrieval_stage_weight: float = 1.0
    binding_steps: int = 1000  # a second question-fusion layer where a presence question's kind word reads its
    binding_videos: int = 1500  # colour word (0: none), then stage 2 continued for `binding_stage2_steps` ("2c")
    binding_stage2_steps: int = 800
    held_out_s: int = 60  # the held-out videos' length; tests shorten it and `eval_bags` (the scores are only logged)
    eval_bags: int = 96  # held-out bags per family in each question-fusion score
    bf16: bool = False  # bfloat16 autocast for the training passes (weights and optimizer stay float32)
    threads: int = 0

    def __post_init__(self) -> None:
        for name in ("held_out_s", "eval_bags"):  # refused before hours of training, not at the first score
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---- data ---------------------------------------------------------------------------------------------------
@dataclass
class Video:
    timeline: object
    pixels: np.ndarray  # (F, S, S, 3) uint8: the frames at 0, 1, 2 … s, nearest-resized as the engine does
    probes: dict[str, np.ndarray]
    captions: list[list[str]]


def frame_probes(truth) -> tuple[np.ndarray, np.ndarray, int, int, np.ndarray]:
    cells = np.zeros((2, CELLS), np.int64)  # per cell: kind (0 = empty) and colour (0 = none)
    for s in truth.shapes:
        cells[:, s.cell] = KINDS.index(s.kind) + 1, list(SHAPE_COLOURS).index(s.colour) + 1
    present = np.zeros(len(PAIRS), np.float32)
    counts = np.zeros(len(KINDS), np.int64)
    for s in truth.shapes:
        present[PAIRS.index((s.colour, s.kind))] = 1.0
        counts[KINDS.index(s.kind)] += 1
    word = 0 if truth.word is None else 1 + WORDS.index(truth.word)
    return present, np.minimum(counts, MAX_COUNT), word, list(BACKGROUNDS).index(truth.background), cells


def frame_facts(truth) -> list[str]:
    """Caption pieces for one frame (a caption is a random subset, so partial queries match)."""
    facts = []
    for kind in KINDS:
        colours = sorted({s.colour for s in truth.shapes if s.kind == kind})
        n = sum(s.kind == kind for s in truth.shapes)
        for c in colours:
            facts.append(f"a {c} {kind}")
        if n > 1:
            facts.append(f"{n} {kind}s")
    if truth.word:
        facts.append(f"the word {truth.word}")
    facts.append(f"on a {truth.background} background")
    return facts


def caption(facts: list[str], rng: np.random.Generator) -> str:
    picked = rng.choice(len(facts), size=int(rng.integers(1, len(facts) + 1)), replace=False)
    return ", ".join(facts[i] for i in sorted(picked))


def load_video(seed: int, duration: int, size: int) -> Video:
    tl = generate_timeline(seed, duration)
    frames = [resize_nearest(frame, size) for _, frame in render_samples(tl, fps=1.0)]
    truths = [truth_at(tl, t) for t in range(len(frames))]
    parts = [frame_probes(t) for t in truths]
    probes = {
        "present": np.stack([p[0] for p in parts]), "counts": np.stack([p[1] for p in parts]),
        "word": np.array([p[2] for p in parts]), "background": np.array([p[3] for p in parts]),
        "cells": np.stack([p[4] for p in parts]),
    }
    return Video(tl, np.stack(frames), probes, [frame_facts(t) for t in truths])


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (…, S, S, 3) → CLIP-normalized float (…, 3, S, S), the processor's arithmetic."""
    x = torch.from_numpy(pixels).float().div(255.0)
    x = x.movedim(-1, -3)
    shape = x.shape
    x = (x.reshape(-1, *shape[-3:]) - CLIP_MEAN) / CLIP_STD
    return x.reshape(shape)


@dataclass
class Sample:
    video: int
    start: int
    end: int
    question_ids: torch.Tensor
    answer_ids: torch.Tensor
    family: str
    question: str


class QATokens:
    """Question and answer ids, each distinct text tokenized once: a few dozen texts are asked hundreds of
    thousands of times."""

    def __init__(self, tok) -> None:
        self.tok, self.eot = tok, generation_eos_ids(tok)[0]
        self.questions: dict[str, torch.Tensor] = {}
        self.answers: dict[str, torch.Tensor] = {}

    def question(self, text: str) -> torch.Tensor:
        if text not in self.questions:
            self.questions[text] = build_prompt(self.tok, text).question
        return self.questions[text]

    def answer(self, text: str) -> torch.Tensor:
        if text not in self.answers:
            self.answers[text] = torch.tensor(self.tok(text, add_special_tokens=False).input_ids + [self.eot])
        return self.answers[text]

    def sample(self, video: int, q: Question) -> Sample:
        return Sample(video, q.start_s, q.end_s, self.question(q.question), self.answer(q.answer), q.family,
                      q.question)


def question_pool(videos: list[Video], tok, rng: np.random.Generator, per_family: int, max_range: int | None
                  ) -> list[Sample]:
    ids = QATokens(tok)
    return [ids.sample(vi, q) for vi, v in enumerate(videos)
            for q in make_questions(v.timeline, rng, per_family=per_family, max_range_s=max_range)]


# ---- the differentiable forward (stage 1) -------------------------------------------------------------------
def fuse_batch(model: LlavaMiniModel, pixels: torch.Tensor, text_ids: torch.Tensor):
    """Vision → compressor/projector → pre-fusion over [patches, c, P, Q] for (B·N) frames, with gradients.
    Same order, positions and causal mask as `prefuse_prefix` + `prefuse_question`."""
    tower = model.vision
    out = tower.vision_tower(pixel_values=pixels, output_hidden_states=True)
    feats = out.hidden_states[tower.select_layer][:, 1:]
    compressed = model.model.mm_projector(model.model.compressor(feats))
    patches = model.model.mm_projector(feats)
    x = torch.cat([patches, compressed, model.embed(text_ids)], dim=1)
    cos, sin = model.rope(torch.arange(x.shape[1])[None])
    *inner, last = model.model.prefusion_layers
    for layer in inner:
        q, k, v = project_qkv(layer, x, cos, sin)
        x = finish_layer(layer, x, attention(q, k, v, None, causal=True))
    n = patches.shape[1]  # the last layer's patch outputs feed nothing: queries from c on only
    q, k, v = project_qkv(last, x, cos, sin)
    x = finish_layer(last, x[:, n:], attention(q[:, :, n:], k, v, None, causal=True))
    return x[:, 0], x[:, 1:], out.pooler_output, feats


def perceive(model: LlavaMiniModel, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c' alone: the pre-fusion mask is causal, so [patches, c] through pre-fusion gives the same fused
    compressed token as the whole sequence does, and the last layer needs only c's query, output projection and
    MLP (the patches' last outputs feed nothing): about half the pre-fusion cost of the full sequence."""
    tower = model.vision
    out = tower.vision_tower(pixel_values=pixels, output_hidden_states=True)
    feats = out.hidden_states[tower.select_layer][:, 1:]
    x = torch.cat([model.model.mm_projector(feats), model.model.mm_projector(model.model.compressor(feats))], 1)
    cos, sin = model.rope(torch.arange(x.shape[1])[None])
    *inner, last = model.model.prefusion_layers
    for layer in inner:
        q, k, v = project_qkv(layer, x, cos, sin)
        x = finish_layer(layer, x, attention(q, k, v, None, causal=True))
    q, k, v = project_qkv(last, x, cos, sin)
    c = finish_layer(last, x[:, -1:], attention(q[:, :, -1:], k, v, None, causal=False))
    return c[:, 0], out.pooler_output, feats


def llm_loss(model: LlavaMiniModel, inputs: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """inputs (B, L, d) = [mean P', c'…, mean Q']; teacher-forced answer tokens after them."""
    return llm_forward(model, inputs, answer_ids)[0]


def text_embedding(clip, tok, texts: list[str]) -> torch.Tensor:
    eot = generation_eos_ids(tok)[0]
    ids = [tok(c, add_special_tokens=False).input_ids[:30] + [eot] for c in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([i + [eot] * (width - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    pooled = clip.text_model(input_ids=input_ids, attention_mask=mask).pooler_output
    return F.normalize(clip.text_projection(pooled), dim=-1)


def clip_loss(clip, image_pooled: torch.Tensor, captions: list[str], tok) -> torch.Tensor:
    text = text_embedding(clip, tok, captions)
    image = F.normalize(clip.visual_projection(image_pooled), dim=-1)
    logits = clip.logit_scale.exp().clamp(max=100) * image @ text.T
    target = torch.arange(len(captions))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def cell_pooling(image_size: int, patch: int, width: int = 320, height: int = 240) -> torch.Tensor:
    """(CELLS, patches) averaging weights: each patch belongs to the grid cell its centre falls in (in the
    video's coordinates; the engine resizes the frame to a square without keeping its aspect)."""
    grid = image_size // patch
    weights = torch.zeros(CELLS, grid * grid)
    for i in range(grid * grid):
        r, c = divmod(i, grid)
        x, y = (c + 0.5) * patch * width / image_size, (r + 0.5) * patch * height / image_size
        for cell in range(CELLS):
            x0, y0, x1, y1 = cell_box(width, height, cell)
            if x0 <= x < x1 and y0 <= y < y1:
                weights[cell, i] = 1.0
    return weights / weights.sum(1, keepdim=True)


class CellHeads(torch.nn.Module):
    """Dense supervision for the vision tower: what shape (kind, colour) sits in each grid cell, read from the
    mean of that cell's patch features. Teaches the tower shapes far faster than the frame-level probes."""

    def __init__(self, width: int, pooling: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("pooling", pooling)
        self.kind = torch.nn.Linear(width, len(KINDS) + 1)
        self.colour = torch.nn.Linear(width, len(SHAPE_COLOURS) + 1)
        self.pair = torch.nn.Linear(width, len(PAIRS) + 1)  # kind and colour bound in one linear feature

    def loss(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        pooled = torch.einsum("cp,bpw->bcw", self.pooling, feats)
        return (F.cross_entropy(self.kind(pooled).flatten(0, 1), cells[:, 0].flatten())
                + F.cross_entropy(self.colour(pooled).flatten(0, 1), cells[:, 1].flatten())
                + F.cross_entropy(self.pair(pooled).flatten(0, 1), cell_pairs(cells).flatten()))


def cell_pairs(cells: torch.Tensor) -> torch.Tensor:
    """(…, 2, CELLS) kind + 1 / colour + 1 → (…, CELLS) 0 for an empty cell, else 1 + index into PAIRS."""
    kind, colour = cells[..., 0, :], cells[..., 1, :]
    return torch.where(kind > 0, (kind - 1) * len(SHAPE_COLOURS) + colour, torch.zeros_like(kind))


class ProbeHeads(torch.nn.Module):
    def __init__(self, hidden: int, cells: CellHeads, presence_weight: float = 1.0, bag_weight: float = 0.0
                 ) -> None:
        super().__init__()
        self.cells = cells
        self.presence_weight, self.bag_weight = presence_weight, bag_weight
        self.present = torch.nn.Linear(hidden, len(PAIRS))
        self.counts = torch.nn.Linear(hidden, len(KINDS) * (MAX_COUNT + 1))
        self.word = torch.nn.Linear(hidden, len(WORDS) + 1)
        self.background = torch.nn.Linear(hidden, len(BACKGROUNDS))
        self.grid = torch.nn.Linear(hidden, CELLS * (len(PAIRS) + 1))  # what sits in each cell, from c' alone
        if bag_weight:  # made last, so the other heads start as they do without it
            self.bag = torch.nn.Linear(cells.kind.in_features, len(PAIRS))

    @torch.no_grad()
    def accuracy(self, c: torch.Tensor, targets: dict[str, torch.Tensor]) -> dict[str, float]:
        """Held-out per-frame accuracy of each probe: presence per (colour, kind) label and as a whole set,
        counts per kind and all four at once, word, background."""
        present = (self.present(c) > 0).float() == targets["present"]
        counts = self.counts(c).view(len(c), -1, MAX_COUNT + 1).argmax(-1) == targets["counts"]
        return {
            "present_label": present.float().mean().item(), "present_set": present.all(-1).float().mean().item(),
            "count_kind": counts.float().mean().item(), "count_all": counts.all(-1).float().mean().item(),
            "word": (self.word(c).argmax(-1) == targets["word"]).float().mean().item(),
            "background": (self.background(c).argmax(-1) == targets["background"]).float().mean().item(),
            "grid_all": (self.grid(c).view(len(c), CELLS, -1).argmax(-1) == cell_pairs(targets["cells"]))
            .all(-1).float().mean().item(),
        }

    def bag_loss(self, feats: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Which (colour, kind) pairs the frame holds, from the plain mean of its patch features: any average of
        the patches then keeps them (a compressor's attention is one), where cell-specific codes cancel out."""
        if not self.bag_weight:
            return feats.new_zeros(())
        return self.bag_weight * F.binary_cross_entropy_with_logits(self.bag(feats.mean(1)), present)

    def loss(self, c: torch.Tensor, targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.presence_weight * F.binary_cross_entropy_with_logits(self.present(c), targets["present"])
                + F.cross_entropy(self.counts(c).view(-1, MAX_COUNT + 1), targets["counts"].flatten())
                + F.cross_entropy(self.word(c), targets["word"])
                + F.cross_entropy(self.background(c), targets["background"])
                + F.cross_entropy(self.grid(c).view(-1, len(PAIRS) + 1), cell_pairs(targets["cells"]).flatten()))


def buckets(pool: list[Sample]) -> dict[tuple[int, int, int], list[Sample]]:
    out: dict[tuple[int, int, int], list[Sample]] = defaultdict(list)
    for s in pool:
        out[(s.end - s.start + 1, len(s.question_ids), len(s.answer_ids))].append(s)
    return out


def train_only(module: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
    """Freeze every parameter of `module` but `params` (a stage undoes it with `requires_grad_(True)`)."""
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


def mixed(cfg: TrainConfig) -> torch.autocast:
    """bfloat16 autocast for a training pass on the CPU (`--bf16`): stage-0 steps about 25% faster on AVX-512 BF16
    cores (about 19x slower where bfloat16 is emulated: `cpu_has_native_bf16`), with float32 weights, optimizer,
    softmax and losses; the states the product feeds the LLM (stage 2's encoded frames and fused questions) are
    still computed in float32, outside it. Off: the exact float32 recipe of the shipped weights."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool | None:
    """Whether the CPU computes bfloat16 natively (AVX-512 BF16 or AMX), from /proc/cpuinfo's flags; None where
    that cannot be read. Without it `--bf16` is emulated: a stage-0 step took 23.9 s instead of 1.25 s in float32
    on a 2-core AMD EPYC with AVX2 only (2026-12-02)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    if not flags:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def adamw(params: list[torch.nn.Parameter], lr: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))


def set_lr(opt: torch.optim.Optimizer, step: int, total: int, base: float, warmup: int = 60) -> None:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, total, base, warmup)


def lr_at(step: int, total: int, base: float, warmup: int = 60) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


PROBE_KEYS = ("present", "counts", "word", "background", "cells")


def frame_targets(videos: list[Video], picks: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.stack([videos[v].probes[k][t] for v, t in picks])) for k in PROBE_KEYS}


def stage0(model, clip, probes: ProbeHeads, tok, videos: list[Video], held_out: list[Video], cfg: TrainConfig,
           log, rng: np.random.Generator) -> None:
    """Perception first: which shapes, how many, which word, which background, readable from c' alone."""
    frames = [(v, t) for v, video in enumerate(videos) for t in range(len(video.pixels))]
    params = [p for n, p in model.named_parameters() if not n.startswith(("model.layers.", "model.norm.", "lm_head"))]
    params += list(probes.parameters()) + [p for n, p in clip.named_parameters() if not n.startswith("vision_model.")]
    opt = adamw(params, cfg.lr)
    model.train()
    bar = tqdm(range(cfg.stage0_steps), desc="stage 0 (perception)", dynamic_ncols=True)
    for step in bar:
        set_lr(opt, step, cfg.stage0_steps, cfg.lr)
        picks = [frames[i] for i in rng.choice(len(frames), size=cfg.stage0_batch, replace=False)]
        targets = frame_targets(videos, picks)
        captions = [caption(videos[v].captions[t], rng) for v, t in picks]
        with mixed(cfg):
            c, pooled, feats = perceive(model, normalize(np.stack([videos[v].pixels[t] for v, t in picks])))
            probe = (probes.loss(c, targets) + probes.cells.loss(feats, targets["cells"])
                     + probes.bag_loss(feats, targets["present"]))
            contrast = clip_loss(clip, pooled, captions, tok)
            loss = probe + cfg.clip_weight * contrast
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        row = {"stage": 0, "step": step, "probe": probe.item(), "clip": contrast.item(), "lr": opt.param_groups[0]["lr"]}
        if (step + 1) % 250 == 0 or step + 1 == cfg.stage0_steps:
            row["held_out"] = probe_accuracy(model, probes, held_out)
            tqdm.write(f"stage 0 step {step + 1}: held-out probe accuracy {row['held_out']}")
        log(row)
        bar.set_postfix(probe=f"{probe.item():.3f}", clip=f"{contrast.item():.2f}")


@torch.no_grad()
def probe_accuracy(model, probes: ProbeHeads, videos: list[Video]) -> dict[str, float]:
    was = model.training
    model.eval()
    picks = [(v, t) for v, video in enumerate(videos) for t in range(len(video.pixels))]
    c = torch.cat([perceive(model, normalize(np.stack([videos[v].pixels[t] for v, t in picks[i : i + 256]])))[0]
                   for i in range(0, len(picks), 256)])
    model.train(was)
    return {k: round(v, 4) for k, v in probes.accuracy(c, frame_targets(videos, picks)).items()}


def stage1(model, clip, probes: ProbeHeads, tok, videos: list[Video], cfg: TrainConfig, log,
           rng: np.random.Generator) -> None:
    prefix = build_prompt(tok, "").prefix
    pool = question_pool(videos, tok, rng, per_family=cfg.stage1_per_family, max_range=cfg.stage1_max_frames)
    groups = buckets(pool)
    keys = sorted(groups)
    weights = np.array([len(groups[k]) for k in keys], dtype=np.float64)
    params = [p for p in model.parameters() if p.requires_grad] + list(probes.parameters())
    params += [p for n, p in clip.named_parameters() if not n.startswith("vision_model.")]
    opt = adamw(params, cfg.lr)
    model.train()
    bar = tqdm(range(cfg.stage1_steps), desc="stage 1 (end to end)", dynamic_ncols=True)
    for step in bar:
        set_lr(opt, step, cfg.stage1_steps, cfg.lr)
        key = keys[rng.choice(len(keys), p=weights / weights.sum())]
        n_frames = key[0]
        batch_n = max(2, min(cfg.stage1_batch, 96 // n_frames))
        members = groups[key]
        batch = [members[i] for i in rng.choice(len(members), size=min(batch_n, len(members)), replace=False)]
        pix = np.stack([videos[s.video].pixels[s.start : s.end + 1] for s in batch])  # (B, N, S, S, 3)
        text_ids = torch.stack([torch.cat([prefix, s.question_ids]) for s in batch])
        targets = {k: torch.from_numpy(np.concatenate([videos[s.video].probes[k][s.start : s.end + 1]
                                                        for s in batch])) for k in PROBE_KEYS}
        captions = [caption(f, rng) for s in batch for f in videos[s.video].captions[s.start : s.end + 1]]
        keep = rng.choice(len(captions), size=min(48, len(captions)), replace=False)
        with mixed(cfg):
            c, text, pooled, feats = fuse_batch(model, normalize(pix).flatten(0, 1),
                                                text_ids.repeat_interleave(n_frames, 0))
            b, d = len(batch), c.shape[-1]
            text = text.view(b, n_frames, *text.shape[1:]).float().mean(1)
            inputs = torch.cat([text[:, : len(prefix)], c.view(b, n_frames, d).float(), text[:, len(prefix) :]], dim=1)
            qa = llm_loss(model, inputs, torch.stack([s.answer_ids for s in batch]))
            probe = (probes.loss(c, targets) + probes.cells.loss(feats, targets["cells"])
                     + probes.bag_loss(feats, targets["present"]))
            contrast = clip_loss(clip, pooled[keep], [captions[i] for i in keep], tok)
            loss = qa + cfg.probe_weight * probe + cfg.clip_weight * contrast
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        row = {"stage": 1, "step": step, "frames": n_frames, "qa": qa.item(), "probe": probe.item(),
               "clip": contrast.item(), "lr": opt.param_groups[0]["lr"]}
        log(row)
        bar.set_postfix(qa=f"{qa.item():.3f}", probe=f"{probe.item():.3f}", clip=f"{contrast.item():.2f}")


@torch.no_grad()
def encode_states(model, videos: list[Video], prefix: torch.Tensor, batch: int = 64) -> list[FrameStates]:
    out = []
    for v in tqdm(videos, desc="stage 2: encoding frames", dynamic_ncols=True):
        parts = []
        for start in range(0, len(v.pixels), batch):
            pix = normalize(v.pixels[start : start + batch])[:, None]
            patches, compressed = model.encode_visual(pix)
            parts.append(prefuse_prefix(model, patches, compressed, prefix))
        out.append(FrameStates.concat(parts))
    return out


class FusedQuestionBank:
    """Each frame's fused question per (video, question text), computed on first use and kept in float16: a
    clip's fused question is then the float32 mean over its frames (what `prefuse_question` computes) without
    running pre-fusion again for every question about every clip, which otherwise costs most of stage 2."""

    def __init__(self, model: LlavaMiniModel, states: list[FrameStates], chunk: int = 256) -> None:
        self.model, self.states, self.chunk = model, states, chunk
        self.frames: dict[tuple[int, str], torch.Tensor] = {}

    @torch.no_grad()
    def fused(self, video: int, text: str, question_ids: torch.Tensor, start: int, end: int) -> torch.Tensor:
        key = (video, text)
        if key not in self.frames:
            st = self.states[video]
            qp = question_pass(self.model, st.key_valid, st.next_position, question_ids)
            parts = [fused_question_frames(self.model, qp, [k[i : i + self.chunk] for k in st.keys],
                                           [v[i : i + self.chunk] for v in st.values]).half()
                     for i in range(0, st.num_frames, self.chunk)]
            self.frames[key] = torch.cat(parts)
            assert torch.isfinite(self.frames[key]).all(), "fused question out of float16 range"
        return self.frames[key][start : end + 1].float().mean(0).to(self.model.dtype)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.frames.values())


def llm_forward(model: LlavaMiniModel, inputs: torch.Tensor, answer_ids: torch.Tensor, tap: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher-forced answer loss (see `llm_loss`) and the hidden states after LLM layer `tap` (for the
    frame-position heads)."""
    x = torch.cat([inputs, model.embed(answer_ids[:, :-1])], dim=1) if answer_ids.shape[1] > 1 else inputs
    cos, sin = model.rope(torch.arange(x.shape[1])[None])
    tapped = x
    for i, layer in enumerate(model.model.layers):
        q, k, v = project_qkv(layer, x, cos, sin)
        x = finish_layer(layer, x, attention(q, k, v, None, causal=True))
        if i + 1 == tap:
            tapped = x
    first = inputs.shape[1] - 1
    logits = model.logits(x[:, first : first + answer_ids.shape[1]])
    return F.cross_entropy(logits.flatten(0, 1), answer_ids.flatten()), tapped


@dataclass
class RetrievalProbe:
    """Where one attention head's probabilities are read (`clip_questions_forward`): `layer`, `head`, and the
    clip's frame positions [first, first + frames) within its part of the sequence."""

    layer: int
    head: int
    first: int
    frames: int


def clip_questions_forward(model: LlavaMiniModel, prefix: torch.Tensor, questions: list[torch.Tensor],
                           answers: list[torch.Tensor], tap: int = 1, probe: RetrievalProbe | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Several questions about one clip for the price of one clip. The LLM mask is causal, so the clip's part
    [mean P', c'…] (L, d) goes through once, and each [fused Q, answer tokens] row reads its keys and values
    (the product's per-video KV cache, with gradients). Per question the same loss `llm_forward` gives on
    [prefix, Q] alone; returns those losses (K,), the clip's hidden states after LLM layer `tap`, and with
    `probe` the (K, frames + 1) attention probabilities of that head at each question's answer position (its
    last token): on each frame, then the rest (prompt and question tokens) summed."""
    rows = [torch.cat([q, model.embed(a[:-1])]) for q, a in zip(questions, answers, strict=True)]
    width = max(len(r) for r in rows)
    y = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])  # right padding: no real row reads it
    x = prefix[None]
    n, length = len(rows), prefix.shape[0]
    cos_p, sin_p = model.rope(torch.arange(length)[None])
    cos_s, sin_s = model.rope(torch.arange(length, length + width)[None])
    tapped, probs = x, None
    layers = model.model.layers
    for i, layer in enumerate(layers):
        qp, kp, vp = project_qkv(layer, x, cos_p, sin_p)
        qs, ks, vs = project_qkv(layer, y, cos_s, sin_s)
        keys = torch.cat([kp.expand(n, -1, -1, -1), ks], 2)
        values = torch.cat([vp.expand(n, -1, -1, -1), vs], 2)
        if probe is not None and i == probe.layer:
            probs = answer_attention(qs, keys, [len(q) - 1 for q in questions], length, probe)
        y = finish_layer(layer, y, attention(qs, keys, values, None, causal=True))
        if i + 1 < len(layers) or tap == len(layers):  # the clip's last outputs feed nothing else
            x = finish_layer(layer, x, attention(qp, kp, vp, None, causal=True))
        if i + 1 == tap:
            tapped = x
    losses = []
    for row, (q, a) in enumerate(zip(questions, answers, strict=True)):
        first = len(q) - 1
        losses.append(F.cross_entropy(model.logits(y[row, first : first + len(a)]), a))
    return torch.stack(losses), tapped[0], probs


def clips_questions_forward(model: LlavaMiniModel, prefixes: list[torch.Tensor], questions: list[list[torch.Tensor]],
                            answers: list[list[torch.Tensor]], tap: int = 1
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """`clip_questions_forward` for a whole step's clips at once: what it computes per clip, with every clip's
    tokens (and every question row) stacked into one matrix for each projection and MLP, and only attention run
    clip by clip. A stage-2 step is a dozen clips of ~60 frames: one at a time, their matmuls are too small to
    keep the cores busy and the per-op overhead (forward and backward) was most of the step. Returns each clip's
    (K,) losses and its hidden states after LLM layer `tap`."""
    lengths = [len(p) for p in prefixes]
    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    x = torch.cat(prefixes)[None]  # (1, Σ L, d)
    cos_x, sin_x = model.rope(torch.cat([torch.arange(n) for n in lengths])[None])
    rows = [torch.cat([q, model.embed(a[:-1])]) for qs, ans in zip(questions, answers, strict=True)
            for q, a in zip(qs, ans, strict=True)]
    clip_of_row = [c for c, qs in enumerate(questions) for _ in qs]
    width = max(len(r) for r in rows)
    y = torch.stack([F.pad(r, (0, 0, 0, width - len(r))) for r in rows])  # right padding: no real row reads it
    positions = torch.tensor([lengths[c] for c in clip_of_row])[:, None] + torch.arange(width)[None]
    cos_y, sin_y = model.rope(positions)
    first_row = np.concatenate([[0], np.cumsum([len(qs) for qs in questions])]).tolist()
    tapped = x
    layers = model.model.layers
    for i, layer in enumerate(layers):
        qx, kx, vx = project_qkv(layer, x, cos_x, sin_x)
        qy, ky, vy = project_qkv(layer, y, cos_y, sin_y)
        out_y, out_x = [], []
        for c in range(len(prefixes)):
            seg, rs = slice(starts[c], starts[c + 1]), slice(first_row[c], first_row[c + 1])
            n = first_row[c + 1] - first_row[c]
            keys = torch.cat([kx[:, :, seg].expand(n, -1, -1, -1), ky[rs]], 2)
            values = torch.cat([vx[:, :, seg].expand(n, -1, -1, -1), vy[rs]], 2)
            out_y.append(attention(qy[rs], keys, values, None, causal=True))
            out_x.append(attention(qx[:, :, seg], kx[:, :, seg], vx[:, :, seg], None, causal=True))
        y = finish_layer(layer, y, torch.cat(out_y))
        if i + 1 < len(layers) or tap == len(layers):  # the clips' last outputs feed nothing else
            x = finish_layer(layer, x, torch.cat(out_x, 2))
        if i + 1 == tap:
            tapped = x
    picks_row, picks_pos, targets, owner = [], [], [], []
    for r, (q, a) in enumerate(zip((q for qs in questions for q in qs), (a for ans in answers for a in ans),
                                   strict=True)):
        picks_row += [r] * len(a)
        picks_pos += range(len(q) - 1, len(q) - 1 + len(a))
        targets.append(a)
        owner += [r] * len(a)
    token_loss = F.cross_entropy(model.logits(y[torch.tensor(picks_row), torch.tensor(picks_pos)]),
                                 torch.cat(targets), reduction="none")
    row_loss = torch.zeros(len(rows), dtype=token_loss.dtype).index_add(0, torch.tensor(owner), token_loss)
    row_loss = row_loss / torch.tensor([len(a) for a in targets], dtype=token_loss.dtype)
    losses = [row_loss[first_row[c] : first_row[c + 1]] for c in range(len(prefixes))]
    return losses, [tapped[0, starts[c] : starts[c + 1]] for c in range(len(prefixes))]


def answer_attention(queries: torch.Tensor, keys: torch.Tensor, last: list[int], length: int,
                     probe: RetrievalProbe) -> torch.Tensor:
    """The probabilities `attention` computes for one head, at one query row per question: row r's position
    `last[r]` sees the clip's `length` positions and its own first last[r] + 1 positions (float32 softmax)."""
    groups = queries.shape[1] // keys.shape[1]
    out = []
    for r, p in enumerate(last):
        q = queries[r, probe.head, p].float()
        k = keys[r, probe.head // groups, : length + p + 1].float()
        w = torch.softmax(k @ q * q.shape[-1] ** -0.5, dim=-1)
        on_frames = w[probe.first : probe.first + probe.frames]
        out.append(torch.cat([on_frames, (1 - on_frames.sum()).clamp(min=0)[None]]))
    return torch.stack(out)


def retrieval_target(question: str, family: str, present: np.ndarray, counts: np.ndarray) -> np.ndarray | None:
    """The clip's frames that answer "yes" or "the first-named kind" (F,) bool, for the two families whose answer
    is whether such a frame exists: presence (the asked (colour, kind) pair is there) and order (the first-named
    kind is there while the other has not yet been seen, now or before; the range's first frame shows neither).
    None for the other families. `present` (F, pairs) and `counts` (F, kinds) are the clip's per-frame truth."""
    if family == "presence":
        colour, kind = PRESENCE_RE.fullmatch(question).groups()
        return present[:, PAIRS.index((colour, kind))] > 0
    if family == "order":
        first, second = (KINDS.index(k) for k in ORDER_RE.fullmatch(question).groups())
        return (counts[:, first] > 0) & ~np.logical_or.accumulate(counts[:, second] > 0)
    return None


def retrieval_loss(probs: torch.Tensor, targets: list[np.ndarray | None]) -> torch.Tensor | None:
    """-log of the attention mass on the evidence: on the target frames when there are any, else on the rest
    (prompt and question: nothing in the clip answers yes). Mean over the questions that have a target."""
    rows = []
    for p, t in zip(probs, targets, strict=True):
        if t is None:
            continue
        mass = p[:-1][torch.from_numpy(t)].sum() if t.any() else p[-1]
        rows.append(-torch.log(mass.clamp(min=1e-6)))
    return torch.stack(rows).mean() if rows else None


def seen_targets(counts: np.ndarray) -> torch.Tensor:
    """Per frame of a clip, (F, X) counts → 2X bits: which things are there now and which were there in an
    earlier frame of the clip. Over kinds, what "which appears first" needs at each frame position; over (colour,
    kind) pairs, "now or before" at the clip's last frame is every presence answer."""
    now = counts > 0
    before = np.zeros_like(now)
    before[1:] = np.logical_or.accumulate(now, axis=0)[:-1]
    return torch.from_numpy(np.concatenate([now, before], 1).astype(np.float32))


def onset_targets(counts: np.ndarray) -> torch.Tensor:
    """Per frame of a clip, (F, X) counts → X bits: which things first appear in the clip at this frame (there
    now, in no earlier frame). At the onset of one kind, whether the other was seen before answers "which
    appears first"."""
    bits = seen_targets(counts)
    now, before = bits[:, : counts.shape[1]], bits[:, counts.shape[1] :]
    return now * (1 - before)


FAMILY_WEIGHTS = {"presence": 1.5, "attribute": 0.5, "count": 1.0, "order": 2.5, "text": 0.25, "scene": 0.25}
ANSWER_SHARES = {("presence", "yes"): 0.5, ("count", "0"): 0.15, ("count", ""): 0.85}  # as `make_questions` asks
NO_SHARES = {"hard no": 0.6, "no": 0.4}  # of presence's "no" half, when the clip has both kinds of negative


def answer_tag(q: Question, seen: set[tuple[str, str]]) -> str:
    """The balancing group within a family: presence yes / hard no (the kind is there in another colour, or the
    colour on another kind: it tests binding) / no; count "0" or not."""
    if q.family == "presence":
        if q.answer == "yes":
            return "yes"
        colour, kind = PRESENCE_RE.fullmatch(q.question).groups()
        return "hard no" if any(c == colour or k == kind for c, k in seen) else "no"
    return "0" if q.family == "count" and q.answer == "0" else ""


def more_questions(candidates: list[Question], skip: str, n: int, rng: np.random.Generator) -> list[Question]:
    """Up to n of a clip's well-defined questions besides `skip`, without repeats: family by FAMILY_WEIGHTS;
    presence half yes, half no (mostly hard negatives); count "0" at most 15%."""
    seen = {PRESENCE_RE.fullmatch(q.question).groups() for q in candidates
            if q.family == "presence" and q.answer == "yes"}
    groups: dict[tuple[str, str], list[Question]] = defaultdict(list)
    for q in candidates:
        if q.question != skip:
            groups[(q.family, answer_tag(q, seen))].append(q)
    keys = sorted(groups)
    nos = sum(NO_SHARES[t] for f, t in keys if f == "presence" and t != "yes")
    weights = np.array([FAMILY_WEIGHTS[f] * (0.5 * NO_SHARES[t] / nos if f == "presence" and t != "yes"
                                             else ANSWER_SHARES.get((f, t), 1.0)) for f, t in keys])
    picked = []
    while len(picked) < n and keys:
        g = int(rng.choice(len(keys), p=weights / weights.sum()))
        members = groups[keys[g]]
        picked.append(members.pop(int(rng.integers(len(members)))))
        if not members:
            keys.pop(g)
            weights = np.delete(weights, g)
    return picked


@dataclass
class ClipItem:
    """One drawn stage-2 clip: its questions, their fused rows and answers, the LLM input before them
    ([mean P', c'…]: `prompt` positions, then `frames`), and the frame head's targets."""

    sample: Sample
    extra: list[Question]
    texts: list[str]
    answers: list[torch.Tensor]
    fused: list[torch.Tensor]
    inputs: torch.Tensor
    prompt: int
    frames: int
    things: np.ndarray
    targets: torch.Tensor


def draw_clip(s: Sample, facts: list, states: list[FrameStates], bank: FusedQuestionBank, ids: QATokens,
              extra_questions: int, rng: np.random.Generator, seen_things: list[np.ndarray],
              onset_head: bool = False) -> ClipItem:
    """A stage-2 clip for the drawn question `s`: `extra_questions` more about the same range (drawn from
    `rng`), their fused rows from the bank, the LLM input before them and the frame head's targets."""
    extra = more_questions(range_questions(facts[s.video], s.start, s.end), s.question, extra_questions, rng)
    texts = [s.question] + [q.question for q in extra]
    answers = [s.answer_ids] + [ids.answer(q.answer) for q in extra]
    fused = [bank.fused(s.video, t, ids.question(t), s.start, s.end) for t in texts]
    sel = states[s.video].select(slice(s.start, s.end + 1))
    with torch.no_grad():
        p = mean_over_frames(sel.prefix_text)
    things = seen_things[s.video][s.start : s.end + 1]
    targets = seen_targets(things)
    if onset_head:
        targets = torch.cat([targets, onset_targets(things[:, : len(KINDS)])], 1)
    return ClipItem(s, extra, texts, answers, fused, torch.cat([p, sel.compressed.flatten(0, 1)]), len(p),
                    s.end - s.start + 1, things, targets)


def stage2(model, tok, videos: list[Video], cfg: TrainConfig, log, rng: np.random.Generator) -> None:
    """The LLM over long clips, on the exact states the product feeds it. Each drawn clip is asked
    `stage2_questions` questions over one shared LLM pass of its frames; a step's clips go through the LLM
    together (`clips_questions_forward`; clip by clip when the retrieval loss is on). A side head on LLM layer
    1's output at every frame position learns which kinds are there and which were seen earlier in the clip
    (the step an order question builds on); the families the fused question cannot answer alone are drawn more
    often."""
    heads, layers = model.config.llama.num_attention_heads, len(model.model.layers)
    if cfg.retrieval_weight and not (0 <= cfg.retrieval_layer < layers and 0 <= cfg.retrieval_head < heads):
        raise ValueError(f"retrieval head {cfg.retrieval_head} of layer {cfg.retrieval_layer} does not exist "
                         f"(the LLM has {layers} layers of {heads} heads)")
    prefix = build_prompt(tok, "").prefix
    model.eval()
    states = encode_states(model, videos, prefix)
    ids = QATokens(tok)
    facts = [timeline_facts(v.timeline) for v in videos]
    bank = FusedQuestionBank(model, states)
    seen_things = [np.concatenate([v.probes["counts"], v.probes["present"]], 1) for v in videos]
    pool = question_pool(videos, tok, rng, per_family=60, max_range=None)
    weights = np.array([FAMILY_WEIGHTS[s.family] for s in pool])
    weights /= weights.sum()
    hidden = model.config.llama.hidden_size
    outputs = 2 * (len(KINDS) + len(PAIRS)) + (len(KINDS) if cfg.onset_head else 0)
    head = torch.nn.Sequential(torch.nn.RMSNorm(hidden), torch.nn.Linear(hidden, outputs))
    trainable = [*model.model.layers.parameters(), *model.model.norm.parameters(), *model.lm_head.parameters()]
    train_only(model, trainable)
    opt = adamw(trainable + list(head.parameters()), cfg.stage2_lr)
    bar = tqdm(range(cfg.stage2_steps), desc="stage 2 (LLM over long clips)", dynamic_ncols=True)
    for step in bar:
        set_lr(opt, step, cfg.stage2_steps, cfg.stage2_lr, warmup=20)
        opt.zero_grad(set_to_none=True)
        total, side, retrieval, frames, asked = 0.0, 0.0, 0.0, 0, 0
        clips = []  # drawn first, in the order the random stream gives them, then run in one pass
        for i in rng.choice(len(pool), size=cfg.stage2_batch, replace=False, p=weights):
            clips.append(draw_clip(pool[i], facts, states, bank, ids, cfg.stage2_questions - 1, rng,
                                   seen_things, cfg.onset_head))
        if cfg.retrieval_weight:  # the attention probe reads one clip's probabilities: clip by clip
            for c in clips:
                probe = RetrievalProbe(cfg.retrieval_layer, cfg.retrieval_head, c.prompt, c.frames)
                with mixed(cfg):
                    qa, tapped, probs = clip_questions_forward(model, c.inputs, c.fused, c.answers, probe=probe)
                    seen = F.binary_cross_entropy_with_logits(
                        head(tapped[c.prompt : c.prompt + c.frames]).float(), c.targets)
                loss = qa.mean() + cfg.seen_weight * seen
                families = [c.sample.family] + [q.family for q in c.extra]
                wanted = [retrieval_target(t, f, c.things[:, len(KINDS) :], c.things[:, : len(KINDS)])
                          for t, f in zip(c.texts, families, strict=True)]
                found = retrieval_loss(probs, wanted)
                if found is not None:
                    loss = loss + cfg.retrieval_weight * found
                    retrieval += found.item() / cfg.stage2_batch
                (loss / cfg.stage2_batch).backward()
                total += qa.mean().item() / cfg.stage2_batch
                side += seen.item() / cfg.stage2_batch
        else:
            with mixed(cfg):
                qas, tapped = clips_questions_forward(model, [c.inputs for c in clips], [c.fused for c in clips],
                                                      [c.answers for c in clips])
                at_frames = torch.cat([t[c.prompt : c.prompt + c.frames] for t, c in zip(tapped, clips, strict=True)])
                bits = F.binary_cross_entropy_with_logits(head(at_frames).float(), torch.cat([c.targets for c in clips]),
                                                          reduction="none").mean(1)
            bounds = np.concatenate([[0], np.cumsum([c.frames for c in clips])]).tolist()
            seens = [bits[bounds[j] : bounds[j + 1]].mean() for j in range(len(clips))]
            qa_means = torch.stack([qa.mean() for qa in qas])
            loss = (qa_means.sum() + cfg.seen_weight * torch.stack(seens).sum()) / cfg.stage2_batch
            loss.backward()
            total = qa_means.sum().item() / cfg.stage2_batch
            side = torch.stack(seens).sum().item() / cfg.stage2_batch
        frames = sum(c.frames for c in clips)
        asked = sum(len(c.texts) for c in clips)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        row = {"stage": 2, "step": step, "frames": frames, "questions": asked, "qa": total, "seen": side,
               "lr": opt.param_groups[0]["lr"], "bank_mb": round(bank.nbytes() / 2**20)}
        if cfg.retrieval_weight:
            row["retrieval"] = retrieval
        log(row)
        bar.set_postfix(qa=f"{total:.3f}", seen=f"{side:.3f}", frames=frames)
    for p in model.parameters():
        p.requires_grad_(True)


def stage2_retrieval(model, tok, cfg: TrainConfig, spec: DemoSpec, log) -> None:
    """Stage 2b: stage 2 continued on its own long videos, with the retrieval loss: for presence and order the
    answer is whether some frame of the clip is evidence (`retrieval_target`), so one head of LLM layer
    `retrieval_layer` learns to put its attention at the answer position on those frames, or on the prompt
    when there are none; the rest of the model reads the answer from where it looked. Its own seed and videos,
    like stage 3, so it runs the same at the end of a full run or alone on trained weights
    (`--retrieval-only`)."""
    round_to_stored(model)
    rng = np.random.default_rng(cfg.seed + 2_500)
    torch.manual_seed(cfg.seed + 2_500)
    seeds = [TRAIN_SEED_BASE + cfg.seed * 100_000 + 80_000 + i for i in range(cfg.retrieval_videos)]
    lo, hi = cfg.long_video_s
    videos = [load_video(s, int(rng.integers(lo, hi + 1)), spec.image_size)
              for s in tqdm(seeds, desc="rendering stage-2b videos", dynamic_ncols=True)]
    inner = TrainConfig(**{**asdict(cfg), "stage2_steps": cfg.retrieval_steps, "stage2_lr": cfg.retrieval_lr,
                           "retrieval_weight": cfg.retrieval_stage_weight})
    stage2(model, tok, videos, inner, lambda row: log({**row, "stage": "2b"}), rng)


def held_out_videos(cfg: TrainConfig, spec: DemoSpec) -> list[Video]:
    """The three videos (60 s by default) every stage's held-out heads are scored on (never trained on)."""
    return [load_video(TRAIN_SEED_BASE + cfg.seed * 100_000 + 90_000 + i, cfg.held_out_s, spec.image_size)
            for i in range(3)]


def stage_binding(model, tok, cfg: TrainConfig, spec: DemoSpec, log) -> None:
    """Binding: "Is there a green triangle?" needs "green" at the word "triangle", which reads the triangles'
    colours from the patches — and no frozen layer carries it there (linear probes: the asked colour is readable
    at the colour word, barely at the kind word). So a further pre-fusion layer is added as the identity and
    trained like question fusion, everything before it frozen and cached, with one head of it told to look
    from the kind word at the word before it and a head on the kind word that must name the asked colour; the
    kind word's "is the asked colour on this kind" heads (per frame, over bags) then have both facts in one
    place. Then stage 2 continues on the new fused questions ("2c"). Its own seed and videos, so
    `--binding-only` on trained weights gives what a full run ends with."""
    round_to_stored(model)
    rng = np.random.default_rng(cfg.seed + 2_700)
    torch.manual_seed(cfg.seed + 2_700)
    base = TRAIN_SEED_BASE + cfg.seed * 100_000
    lo, hi = cfg.video_s
    short = [load_video(base + 60_000 + i, int(rng.integers(lo, hi + 1)), spec.image_size)
             for i in tqdm(range(cfg.binding_videos), desc="rendering binding videos", dynamic_ncols=True)]
    held = held_out_videos(cfg, spec)
    add_prefusion_layer(model)
    run_question_fusion(model, tok, short, held, normalize,
                        QFusionConfig(steps=cfg.binding_steps, lr=cfg.qfusion_lr, every=200, eval_bags=cfg.eval_bags,
                                      embed_scale=1.0, embed_lr_mult=1.0, route_weight=1.0,
                                      route_attention_weight=1.0),
                        rng, log, name="binding")
    del short
    lo, hi = cfg.long_video_s
    long = [load_video(base + 85_000 + i, int(rng.integers(lo, hi + 1)), spec.image_size)
            for i in tqdm(range(cfg.long_videos), desc="rendering stage-2c videos", dynamic_ncols=True)]
    inner = TrainConfig(**{**asdict(cfg), "stage2_steps": cfg.binding_stage2_steps})
    stage2(model, tok, long, inner, lambda row: log({**row, "stage": "2c"}), rng)


def retune_llm(model_dir: Path, cfg: TrainConfig, stage) -> Path:
    """One of the late stages (2b or binding) alone on a trained model directory, rewritten in place."""
    from vidmini.engine.checkpoint import save_checkpoint
    from vidmini.engine.load import ModelChoice, open_engine

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    record = json.loads((model_dir / "training_config.json").read_text())
    spec = DemoSpec(**record["spec"])
    engine = open_engine(ModelChoice(str(model_dir), str(model_dir)))
    model, tok = engine.model, engine.tokenizer
    t0 = time.perf_counter()
    with (model_dir / "training_log.jsonl").open("a") as log_file:
        def log(row: dict) -> None:
            row["elapsed_s"] = round(time.perf_counter() - t0, 2)
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()

        stage(model, tok, cfg, spec, log)
    model.eval()
    save_checkpoint(model, tok, model_dir, eos_ids=tuple(generation_eos_ids(tok)), dtype=STORED_DTYPE)
    # the recipe the weights now come from (a full run with these settings gives them) and what each run took
    record["continued"] = [*record.get("continued", []), {"stage": stage.__name__, "seconds": round(
        time.perf_counter() - t0, 1), "torch": torch.__version__}]
    record["train"] = {**record["train"], **asdict(cfg)}
    (model_dir / "training_config.json").write_text(json.dumps(record, indent=2))
    return model_dir


# ---- stage 3: search ------------------------------------------------------------------------------------------
def penultimate_states(clip, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's hidden states before its last layer: what LLaVA-Mini reads (layer -2) ends here."""
    return clip.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


def image_embedding(clip, penultimate: torch.Tensor) -> torch.Tensor:
    vis = clip.vision_model
    last = vis.encoder.layers[-1](penultimate, None)
    last = last[0] if isinstance(last, tuple) else last
    return F.normalize(clip.visual_projection(vis.post_layernorm(last[:, 0])), dim=-1)


def stage3_search(clip, tok, videos: list[Video], cfg: TrainConfig, log) -> None:
    """Text → frame search. The vision tower's last layer feeds only the pooled image embedding (LLaVA-Mini reads
    the layer before it), so that layer, both projections and the text tower are tuned for retrieval here without
    changing a single answer. Frames are cached up to that layer; a caption is a positive for every frame in the
    batch whose facts include all of the caption's (soft targets), so two frames showing the same word are not
    pushed apart. Its own seed: its data and their order do not depend on the stages before it."""
    rng = np.random.default_rng(cfg.seed + 3_000)
    torch.manual_seed(cfg.seed + 3_000)
    clip.eval()
    with torch.no_grad():
        cached = torch.cat([penultimate_states(clip, normalize(v.pixels)) for v in videos])
    facts = [f for v in videos for f in v.captions]
    vis = clip.vision_model
    params = [*vis.encoder.layers[-1].parameters(), *vis.post_layernorm.parameters(),
              *clip.visual_projection.parameters(), *clip.text_model.parameters(),
              *clip.text_projection.parameters(), clip.logit_scale]
    train_only(clip, params)
    opt = adamw(params, cfg.search_lr)
    bar = tqdm(range(cfg.search_steps), desc="stage 3 (search)", dynamic_ncols=True)
    for step in bar:
        set_lr(opt, step, cfg.search_steps, cfg.search_lr, warmup=20)
        picks = rng.choice(len(cached), size=min(cfg.search_batch, len(cached)), replace=False)
        chosen = []
        for i in picks:
            f = facts[i]
            words = [x for x in f if x.startswith("the word ")]
            r = rng.random()
            if words and r < 0.25:  # the shown word: the smallest thing in a frame, the hardest to retrieve
                chosen.append(words)
            elif r < 0.5:  # single facts, the shape of most search queries
                chosen.append([f[int(rng.integers(len(f)))]])
            else:
                chosen.append([f[j] for j in sorted(rng.choice(len(f), size=int(rng.integers(1, len(f) + 1)),
                                                               replace=False))])
        match = torch.tensor([[set(c) <= set(facts[i]) for i in picks] for c in chosen], dtype=torch.float32)
        with mixed(cfg):
            image = image_embedding(clip, cached[torch.from_numpy(picks)])
            text = text_embedding(clip, tok, [", ".join(c) for c in chosen])
        logits = clip.logit_scale.exp().clamp(max=100) * text.float() @ image.float().T  # (captions, frames)
        loss = -(F.log_softmax(logits, -1) * match / match.sum(-1, keepdim=True)).sum(-1).mean()
        loss = loss - (F.log_softmax(logits.T, -1) * match.T / match.T.sum(-1, keepdim=True).clamp(min=1)).sum(-1)[
            match.T.sum(-1) > 0].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log({"stage": 3, "step": step, "search": loss.item(), "lr": opt.param_groups[0]["lr"]})
        bar.set_postfix(search=f"{loss.item():.3f}")
    for p in clip.parameters():
        p.requires_grad_(True)


def search_videos(cfg: TrainConfig, spec: DemoSpec) -> list[Video]:
    """Stage 3's short videos: their own seeds, so the stage does not depend on what ran before it."""
    seeds = [TRAIN_SEED_BASE + cfg.seed * 100_000 + 70_000 + i for i in range(cfg.search_videos)]
    return [load_video(s, 12, spec.image_size) for s in tqdm(seeds, desc="rendering search videos",
                                                             dynamic_ncols=True)]


def retune_search(model_dir: Path, cfg: TrainConfig) -> Path:
    """Stage 3 alone on a trained model directory (its CLIP pair is rewritten in place; answers cannot change)."""
    from transformers import CLIPModel

    from vidmini.engine.hf_files import load_tokenizer

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    spec = DemoSpec(**json.loads((model_dir / "training_config.json").read_text())["spec"])
    vision_dir = model_dir / "vision_tower"
    clip = CLIPModel.from_pretrained(str(vision_dir))
    tok = load_tokenizer(model_dir)
    t0 = time.perf_counter()
    with (model_dir / "training_log.jsonl").open("a") as log_file:
        def log(row: dict) -> None:
            row["elapsed_s"] = round(time.perf_counter() - t0, 2)
            log_file.write(json.dumps(row) + "\n")

        stage3_search(clip, tok, search_videos(cfg, spec), cfg, log)
    clip.save_pretrained(str(vision_dir))
    return model_dir


def train(out: Path, cfg: TrainConfig, spec: DemoSpec | None = None) -> Path:
    spec = spec or DemoSpec()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.bf16 and cpu_has_native_bf16() is False:
        warnings.warn("--bf16 on a CPU without native bfloat16 (no avx512_bf16 / amx_bf16 flag): autocast is "
                      "emulated and about 19x slower than float32 here; drop --bf16", stacklevel=2)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, spec)
    model, clip = build_demo_model(spec, tok, cfg.seed)
    log_path = out / "training_log.jsonl"
    log_file = log_path.open("w")
    t0 = time.perf_counter()

    def log(row: dict) -> None:
        row["elapsed_s"] = round(time.perf_counter() - t0, 2)
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()

    def seeds(n: int, offset: int) -> list[int]:
        return [TRAIN_SEED_BASE + cfg.seed * 100_000 + offset + i for i in range(n)]

    lo, hi = cfg.video_s
    short = [load_video(s, int(rng.integers(lo, hi + 1)), spec.image_size)
             for s in tqdm(seeds(cfg.videos, 0), desc="rendering training videos", dynamic_ncols=True)]
    held_out = held_out_videos(cfg, spec)
    pooling = cell_pooling(spec.image_size, spec.patch_size)
    probes = ProbeHeads(model.config.hidden_size, CellHeads(spec.vision_width, pooling), cfg.presence_weight,
                        cfg.bag_weight)
    stage0(model, clip, probes, tok, short, held_out, cfg, log, rng)
    stage1(model, clip, probes, tok, short, cfg, log, rng)
    add_prefusion_layer(model)
    run_question_fusion(model, tok, short[: cfg.qfusion_videos], held_out, normalize,
                        QFusionConfig(steps=cfg.qfusion_steps, lr=cfg.qfusion_lr, every=300, eval_bags=cfg.eval_bags),
                        rng, log)
    del short
    lo, hi = cfg.long_video_s
    long = [load_video(s, int(rng.integers(lo, hi + 1)), spec.image_size)
            for s in tqdm(seeds(cfg.long_videos, 50_000), desc="rendering long videos", dynamic_ncols=True)]
    stage2(model, tok, long, cfg, log, rng)
    del long
    if cfg.retrieval_steps:
        stage2_retrieval(model, tok, cfg, spec, log)
    if cfg.binding_steps:
        stage_binding(model, tok, cfg, spec, log)
    stage3_search(clip, tok, search_videos(cfg, spec), cfg, log)
    model.eval()
    save_demo(model, clip, tok, out)
    (out / "training_config.json").write_text(json.dumps(
        {"train": asdict(cfg), "spec": asdict(spec), "seconds": round(time.perf_counter() - t0, 1),
         "torch": torch.__version__}, indent=2))
    log_file.close()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("models/vidmini-demo"))
    ap.add_argument("--search-only", action="store_true",
                    help="run only stage 3 (search) on the trained model in --out, rewriting its CLIP pair")
    ap.add_argument("--retrieval-only", action="store_true",
                    help="run only stage 2b (retrieval) on the trained model in --out, rewriting its LLM weights")
    ap.add_argument("--binding-only", action="store_true",
                    help="run only the binding stage (+ stage 2c) on the trained model in --out, rewriting it")
    defaults = TrainConfig()
    for name in ("seed", "videos", "long_videos", "binding_steps", "binding_videos", "binding_stage2_steps",
                 "retrieval_layer", "retrieval_head", "retrieval_steps",
                 "retrieval_videos", "stage1_per_family", "stage0_steps", "stage0_batch", "stage1_steps", "qfusion_steps",
                 "stage2_questions",
                 "qfusion_videos", "stage2_steps",
                 "stage1_batch", "stage2_batch", "search_steps", "search_batch", "search_videos", "held_out_s",
                 "eval_bags", "threads"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "qfusion_lr", "stage2_lr", "seen_weight", "search_lr", "presence_weight", "bag_weight",
                 "retrieval_weight", "retrieval_lr", "retrieval_stage_weight"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the training passes")
    ap.add_argument("--onset-head", action="store_true", help="stage 2's frame head also learns kind onsets")
    args = ap.parse_args(argv)
    for name in ("presence_weight", "bag_weight", "seen_weight", "retrieval_weight", "retrieval_stage_weight"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    cfg = TrainConfig(**{k: v for k, v in vars(args).items()
                         if k not in ("out", "search_only", "retrieval_only", "binding_only")})
    if args.search_only or args.retrieval_only or args.binding_only:
        missing = [n for n in ("training_config.json", "config.json") if not (args.out / n).is_file()]
        if missing:
            ap.error(f"{args.out} is not a trained demo model directory (no {' or '.join(missing)}); "
                     f"train one first: python -m research.training.train --out {args.out}")
    if args.search_only:
        path = retune_search(args.out, cfg)
    elif args.retrieval_only:
        path = retune_llm(args.out, cfg, stage2_retrieval)
    elif args.binding_only:
        if not cfg.binding_steps:
            ap.error("--binding-only needs --binding-steps N (N > 0)")
        record = json.loads((args.out / "training_config.json").read_text())
        layers = json.loads((args.out / "config.json").read_text())["prefusion_layer_num"]
        if layers != record["spec"]["prefusion_layers"] + 1:
            ap.error(f"{args.out} has {layers} pre-fusion layers: it already went through binding (a run without "
                     f"it has {record['spec']['prefusion_layers'] + 1})")
        path = retune_llm(args.out, cfg, stage_binding)
    else:
        path = train(args.out, cfg)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
