"""Question fusion: a last pre-fusion layer trained so each frame's fused question carries that frame's answer.

Why: LLaVA-Mini gives the LLM one token per frame plus the question fused with every frame and averaged over
frames. In the demo model the first pre-fusion layers drown the question's words in what they gather from the
patches, and end-to-end answer losses never taught the LLM to bind two question words to a frame token. Here a
new last pre-fusion layer (started as the identity: zero output projections, so the model's numbers do not move
at step 0) learns, with the layers before it frozen, to compute per frame what the question asks:
  * per-frame heads read the last fused question token of each frame (is the asked pair there, the kind's
    colour and count, which of two kinds is there, the word, the background);
  * bag heads read the weighted MEAN of that token over several frames — exactly what the LLM is given — with
    the bag's answer (presence: any frame; the weights emulate a needle of 0.3% … 100% of a long range);
  * c' (the frame token) is held to its old value, so perception is kept.
Everything before the new layer is frozen, so each frame's states up to it are computed once and cached; a step
runs only the question's tokens and the new layer's keys/values. The heads are thrown away afterwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, apply_rotary_pos_emb

from vidmini.demo.questions import (
    ATTRIBUTE_Q,
    COLOURS,
    COUNT_Q,
    FAMILIES,
    ORDER_Q,
    PRESENCE_Q,
    SCENE_Q,
    TEXT_Q,
)
from vidmini.demo.world import BACKGROUNDS, KINDS, WORDS
from vidmini.engine.llama import attention, finish_layer, project_qkv
from vidmini.engine.model import LlavaMiniModel
from vidmini.engine.prompt import build_prompt

MAX_COUNT = 6
# per-frame head layout (on one frame's fused last question token)
FRAME_SLICES = {"presence": (0, 1), "attribute": (1, 8), "count": (8, 15), "order": (15, 17), "text": (17, 34),
                "scene": (34, 39)}
# bag head layout (on the weighted mean over frames); order: one logit, "the first-named kind came first"
BAG_SLICES = {"presence": (0, 1), "attribute": (1, 8), "count": (8, 15), "order": (15, 16), "text": (16, 33),
              "scene": (33, 38)}


def add_prefusion_layer(model: LlavaMiniModel) -> LlamaDecoderLayer:
    """Append a pre-fusion layer that starts as the identity (zero attention output and MLP down projections)."""
    llama = model.config.llama
    layer = LlamaDecoderLayer(llama, len(model.model.prefusion_layers))
    src = model.model.prefusion_layers[-1]
    layer.load_state_dict(src.state_dict())
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    layer.to(dtype=src.self_attn.q_proj.weight.dtype)
    model.model.prefusion_layers.append(layer)
    model.config.prefusion_layer_num = len(model.model.prefusion_layers)
    return layer


# ---- per-frame facts ------------------------------------------------------------------------------------------
@dataclass
class FrameFacts:
    """Per frame of one video: which (colour, kind) pairs, kind counts, the kind's single colour, word, bg."""

    pairs: np.ndarray  # (F, colours, kinds) bool
    counts: np.ndarray  # (F, kinds) int, clipped at MAX_COUNT
    kind_colour: np.ndarray  # (F, kinds) int: 0 absent, 1 + colour, -100 two colours at once
    word: np.ndarray  # (F,) 0 none, 1 + word
    background: np.ndarray  # (F,)

    @classmethod
    def from_probes(cls, probes: dict[str, np.ndarray]) -> FrameFacts:
        cells = probes["cells"]  # (F, 2, CELLS): kind + 1, colour + 1
        n = cells.shape[0]
        pairs = np.zeros((n, len(COLOURS), len(KINDS)), bool)
        for f in range(n):
            for k, c in zip(cells[f, 0], cells[f, 1], strict=True):
                if k:
                    pairs[f, c - 1, k - 1] = True
        kind_colour = np.zeros((n, len(KINDS)), np.int64)
        many = pairs.sum(1)
        first = pairs.argmax(1) + 1
        kind_colour[many == 1] = first[many == 1]
        kind_colour[many > 1] = -100
        return cls(pairs, np.minimum(probes["counts"], MAX_COUNT), kind_colour, probes["word"], probes["background"])


@dataclass(frozen=True)
class Ask:
    family: str
    a: int = -1  # kind (or colour for presence)
    b: int = -1  # second kind (order) or kind (presence)

    def text(self) -> str:
        """The question in the world's own templates (synth.questions)."""
        if self.family == "presence":
            return PRESENCE_Q.format(colour=COLOURS[self.a], kind=KINDS[self.b])
        if self.family in ("attribute", "count"):
            return (ATTRIBUTE_Q if self.family == "attribute" else COUNT_Q).format(kind=KINDS[self.a])
        if self.family == "order":
            return ORDER_Q.format(kind1=KINDS[self.a], kind2=KINDS[self.b])
        return TEXT_Q if self.family == "text" else SCENE_Q


def frame_target(ask: Ask, facts: FrameFacts, f: int) -> tuple[int, ...]:
    """The per-frame answer: one class index (or bits for presence/order)."""
    if ask.family == "presence":
        return (int(facts.pairs[f, ask.a, ask.b]),)
    if ask.family == "attribute":
        return (int(facts.kind_colour[f, ask.a]),)
    if ask.family == "count":
        return (int(facts.counts[f, ask.a]),)
    if ask.family == "order":
        return int(facts.counts[f, ask.a] > 0), int(facts.counts[f, ask.b] > 0)
    if ask.family == "text":
        return (int(facts.word[f]),)
    return (int(facts.background[f]),)


def bag_target(ask: Ask, facts: FrameFacts, frames: list[int]) -> int:
    """The answer over a bag of frames (in time order), -100 when the question is not well defined for it."""
    per = [frame_target(ask, facts, f) for f in frames]
    if ask.family == "presence":
        return int(any(p[0] for p in per))
    if ask.family == "order":
        firsts = []
        for j in range(2):
            seen = [i for i, p in enumerate(per) if p[j]]
            if not seen or seen[0] == 0:
                return -100
            firsts.append(seen[0])
        return -100 if firsts[0] == firsts[1] else int(firsts[0] < firsts[1])
    if ask.family in ("text", "attribute"):  # the one word / colour shown; frames without one do not count
        values = {p[0] for p in per if p[0]}
        return values.pop() if len(values) == 1 and min(values) > 0 else -100
    values = {p[0] for p in per}
    return values.pop() if len(values) == 1 else -100


def draw_ask(rng: np.random.Generator, family: str, facts: FrameFacts, frames: list[int]) -> Ask:
    """A question for a bag, balanced towards answers that occur (present pairs, present kinds)."""
    here = facts.pairs[frames].any(0)  # (colours, kinds)
    kinds_here = np.flatnonzero(here.any(0))
    if family == "presence":
        if rng.random() < 0.5 and here.any():
            c, k = np.argwhere(here)[int(rng.integers(here.sum()))]
        else:  # hard negatives half the time: the kind in another colour or the colour on another kind
            absent = np.argwhere(~here)
            hard = [(c, k) for c, k in absent if here[:, k].any() or here[c].any()]
            c, k = hard[int(rng.integers(len(hard)))] if hard and rng.random() < 0.6 else absent[
                int(rng.integers(len(absent)))]
        return Ask("presence", int(c), int(k))
    if family in ("attribute", "count"):
        if kinds_here.size and rng.random() < 0.85:
            return Ask(family, int(kinds_here[int(rng.integers(kinds_here.size))]))
        return Ask(family, int(rng.integers(len(KINDS))))
    if family == "order":
        a, b = rng.choice(len(KINDS), size=2, replace=False)
        return Ask("order", int(a), int(b))
    return Ask(family)


# ---- cached states up to the new layer -------------------------------------------------------------------------
@dataclass
class PrefixCache:
    """Frozen states of every frame up to the new layer: the last frozen layer's output over [patches, c, P]
    and each frozen layer's keys/values (for the question's tokens), fp16 to halve memory."""

    hidden: torch.Tensor  # (N, S, d)
    keys: list[torch.Tensor]  # per frozen layer (N, Hkv, S, D)
    values: list[torch.Tensor]
    positions: torch.Tensor  # (S,) position ids of the prefix sequence
    next_position: int
    c_index: int


@torch.no_grad()
def build_prefix_cache(model: LlavaMiniModel, feats: torch.Tensor, prefix_ids: torch.Tensor, frozen: int,
                       batch: int = 256) -> PrefixCache:
    """`feats`: tower features (N, patches, width) of every frame (layer −2, no CLS)."""
    hidden, keys, values = [], [[] for _ in range(frozen)], [[] for _ in range(frozen)]
    if not bool((prefix_ids > 0).all()):
        raise ValueError("the demo prompt's prefix has no placeholder ids")
    for start in tqdm(range(0, len(feats), batch), desc="question fusion: caching frames", dynamic_ncols=True):
        f = feats[start : start + batch]
        patches = model.model.mm_projector(f)
        c = model.model.mm_projector(model.model.compressor(f))
        x = torch.cat([patches, c, model.embed(prefix_ids).unsqueeze(0).expand(len(f), -1, -1)], 1)
        cos, sin = model.rope(torch.arange(x.shape[1])[None])
        for i in range(frozen):
            layer = model.model.prefusion_layers[i]
            q, k, v = project_qkv(layer, x, cos, sin)
            keys[i].append(k.half())
            values[i].append(v.half())
            x = finish_layer(layer, x, attention(q, k, v, None, causal=True))
        hidden.append(x.half())
    s = hidden[0].shape[1]
    return PrefixCache(torch.cat(hidden), [torch.cat(k) for k in keys], [torch.cat(v) for v in values],
                       torch.arange(s), s, feats.shape[1])


def fuse_questions(model: LlavaMiniModel, cache: PrefixCache, frames: torch.Tensor, qids: torch.Tensor,
                   tap: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Question tokens (one row of `qids` per frame, equal lengths) through every pre-fusion layer against the
    frames' states (the same positions and masks as `prefuse_question`), with gradients into the new last layer
    and the embeddings. Returns the fused question (B, T, d), the new c' (B, d) and, with `tap`, that head's
    attention probabilities in the new layer from each question token (B, T, prefix + T)."""
    layers = model.model.prefusion_layers
    frozen = len(layers) - 1
    b, t = qids.shape
    s = cache.next_position
    x = model.embed(qids)
    cos, sin = model.rope(torch.arange(s, s + t)[None])
    mask = torch.cat([torch.ones(t, s, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], 1)
    for i in range(frozen):
        q, k, v = project_qkv(layers[i], x, cos, sin)
        ks = torch.cat([cache.keys[i][frames].float(), k], 2)
        vs = torch.cat([cache.values[i][frames].float(), v], 2)
        x = finish_layer(layers[i], x, attention(q, ks, vs, mask, causal=False))
    last = layers[-1]
    attn = last.self_attn
    pre = cache.hidden[frames].float()
    ci, d = cache.c_index, attn.head_dim
    pcos, psin = model.rope(cache.positions[None])
    h = last.input_layernorm(pre)
    pk = attn.k_proj(h).view(b, s, -1, d).transpose(1, 2)
    pv = attn.v_proj(h).view(b, s, -1, d).transpose(1, 2)
    _, pk = apply_rotary_pos_emb(pk, pk, pcos, psin)
    q, k, v = project_qkv(last, x, cos, sin)
    keys = torch.cat([pk, k], 2)
    out = finish_layer(last, x, attention(q, keys, torch.cat([pv, v], 2), mask, causal=False))
    probs = None
    if tap is not None:
        kv = tap // (q.shape[1] // keys.shape[1])
        scores = q[:, tap] @ keys[:, kv].transpose(-1, -2) / math.sqrt(d)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    qc = attn.q_proj(h[:, ci : ci + 1]).view(b, 1, -1, d).transpose(1, 2)
    qc, _ = apply_rotary_pos_emb(qc, qc, pcos[:, ci : ci + 1], psin[:, ci : ci + 1])
    c_att = attention(qc, pk[:, :, : ci + 1], pv[:, :, : ci + 1], None, causal=False)
    c_new = finish_layer(last, pre[:, ci : ci + 1], c_att)[:, 0]
    return out, c_new, probs


class Heads(torch.nn.Module):
    def __init__(self, hidden: int, route: bool = False) -> None:
        super().__init__()
        self.frame = torch.nn.Sequential(torch.nn.RMSNorm(hidden), torch.nn.Linear(hidden, 39))
        self.bag = torch.nn.Sequential(torch.nn.RMSNorm(hidden), torch.nn.Linear(hidden, 38))
        # at each kind word of the question: that kind's colours (6 bits) and count (7 classes) in the frame,
        # and over a bag, the colours the kind has in any of its frames
        self.kind_frame = torch.nn.Sequential(torch.nn.RMSNorm(hidden), torch.nn.Linear(hidden, 6 + 7 + 1))
        self.kind_bag = torch.nn.Sequential(torch.nn.RMSNorm(hidden), torch.nn.Linear(hidden, 6 + 1))
        # at the kind word of a presence question: the ASKED colour, which only the colour word before it holds —
        # the kind word must look there to compute "is the asked colour on this kind" (built only when used, so
        # the recipes without it draw the same random numbers)
        self.route = torch.nn.Sequential(torch.nn.RMSNorm(hidden), torch.nn.Linear(hidden, len(COLOURS))) if route \
            else None


def family_loss(logits: torch.Tensor, family: str, target: torch.Tensor, slices: dict) -> torch.Tensor:
    """BCE for presence/order bits, cross-entropy otherwise; targets < 0 are ignored. target: (B, 2)."""
    lo, hi = slices[family]
    part = logits[:, lo:hi]
    if family in ("presence", "order"):
        t = target[:, : hi - lo]
        keep = (t >= 0).all(1)
        return F.binary_cross_entropy_with_logits(part[keep], t[keep].float()) if keep.any() else part.sum() * 0
    keep = target[:, 0] >= 0
    return F.cross_entropy(part[keep], target[keep, 0]) if keep.any() else part.sum() * 0


@torch.no_grad()
def family_correct(logits: torch.Tensor, family: str, target: torch.Tensor, slices: dict) -> tuple[int, int]:
    lo, hi = slices[family]
    part = logits[:, lo:hi]
    if family in ("presence", "order"):
        t = target[:, : hi - lo]
        keep = (t >= 0).all(1)
        ok = ((part > 0).long() == t).all(1)
    else:
        keep = target[:, 0] >= 0
        ok = part.argmax(1) == target[:, 0]
    return int(ok[keep].sum()), int(keep.sum())


def question_ids(tok, ask: Ask) -> torch.Tensor:
    return build_prompt(tok, ask.text()).question


def kind_positions(tok, ids: torch.Tensor) -> list[tuple[int, int]]:
    """(position, kind) of every kind word (singular or plural) among a question's tokens."""
    out = []
    for i, t in enumerate(ids.tolist()):
        word = tok.decode([t]).strip()
        word = word[:-1] if word.endswith("s") and word[:-1] in KINDS else word
        if word in KINDS:
            out.append((i, KINDS.index(word)))
    return out


def trainable_rows(tok) -> torch.Tensor:
    """Embedding rows the stage may move: tokens of the world's questions that no prompt prefix or answer uses
    (the prefix's states are cached frozen; answer tokens are the LLM's inputs when it writes)."""
    prefix = set(build_prompt(tok, "").prefix.tolist())
    answers = ["yes", "no", *[str(i) for i in range(10)], *KINDS, *COLOURS, *BACKGROUNDS, *WORDS]
    used = {i for a in answers for i in tok(a, add_special_tokens=False).input_ids}
    rows = set()
    asks = [Ask("presence", c, k) for c in range(len(COLOURS)) for k in range(len(KINDS))]
    asks += [Ask(f, k) for f in ("attribute", "count") for k in range(len(KINDS))]
    asks += [Ask("order", a, b) for a in range(len(KINDS)) for b in range(len(KINDS)) if a != b]
    asks += [Ask("text"), Ask("scene")]
    for a in asks:
        rows |= set(question_ids(tok, a).tolist())
    return torch.tensor(sorted(rows - prefix - used))


def bag_weights(rng: np.random.Generator, yes: np.ndarray) -> np.ndarray:
    """Frame weights of a bag. A presence bag mixing yes and no frames gives its yes frames together a share
    drawn log-uniform in [0.003, 1] — the needle of a long range, at the price of a few frames; other bags get
    random weights half the time (no bag answer depends on them; "any frame" answers must survive dilution)."""
    n = len(yes)
    if yes.any() and not yes.all():
        share = math.exp(rng.uniform(math.log(0.003), 0.0))
        return np.where(yes, share / yes.sum(), (1 - share) / (~yes).sum())
    if n > 1 and rng.random() < 0.5:
        w = np.exp(rng.uniform(math.log(0.003), 0.0, size=n))
        return w / w.sum()
    return np.full(n, 1.0 / n)


def sample_bag(rng: np.random.Generator, family: str, n_frames: int, max_bag: int) -> list[int]:
    """Frames of one video for a bag: contiguous (time order matters for order, and ranges are contiguous)
    or, for presence, any frames (the bag weights stand in for the range's length)."""
    size = int(rng.integers(1, min(max_bag, n_frames) + 1))
    if family == "order":
        size = min(n_frames, max(size, 4))
    if family == "presence" and rng.random() < 0.5:
        return sorted(rng.choice(n_frames, size=size, replace=False).tolist())
    start = int(rng.integers(0, n_frames - size + 1))
    return list(range(start, start + size))


# ---- the stage --------------------------------------------------------------------------------------------------
@dataclass
class QFusionConfig:
    steps: int = 600
    bags_per_family: int = 8
    max_bag: int = 8
    lr: float = 1e-3
    keep_weight: float = 1.0  # c' held to its value before the stage
    bag_weight: float = 1.0
    every: int = 100
    eval_bags: int = 96  # held-out bags per family in each score
    embed_scale: float = 40.0  # question-only embedding rows start this much larger (pre-fusion drowns them)
    embed_lr_mult: float = 10.0
    route_weight: float = 0.0  # the asked-colour head at a presence question's kind word (0: no such head)
    route_attention_weight: float = 0.0  # head `route_head` of the new layer looks from that kind word at the colour
    route_head: int = 0


@torch.no_grad()
def tower_features(model: LlavaMiniModel, pixels: list[np.ndarray], normalize, batch: int = 256) -> torch.Tensor:
    tower = model.vision
    out = []
    allpix = np.concatenate(pixels)
    for i in range(0, len(allpix), batch):
        hs = tower.vision_tower(pixel_values=normalize(allpix[i : i + batch]), output_hidden_states=True)
        out.append(hs.hidden_states[tower.select_layer][:, 1:].clone())
    return torch.cat(out)


class QuestionFusion:
    """Data, cache and heads for the stage; `step` trains, `evaluate` reports held-out head accuracy."""

    def __init__(self, model: LlavaMiniModel, tok, videos: list, held: list, normalize, cfg: QFusionConfig,
                 rng: np.random.Generator) -> None:
        self.model, self.tok, self.cfg, self.rng = model, tok, cfg, rng
        prefix = build_prompt(tok, "").prefix
        frozen = len(model.model.prefusion_layers) - 1
        self.sets = {}
        for name, vids in (("train", videos), ("held", held)):
            feats = tower_features(model, [v.pixels for v in vids], normalize)
            cache = build_prefix_cache(model, feats, prefix, frozen)
            offsets = np.cumsum([0] + [len(v.pixels) for v in vids])
            self.sets[name] = (cache, offsets, [FrameFacts.from_probes(v.probes) for v in vids])
        self.heads = Heads(model.config.llama.hidden_size, route=cfg.route_weight > 0)
        self.qids: dict[Ask, torch.Tensor] = {}
        self.kind_pos: dict[Ask, list[tuple[int, int]]] = {}
        last = model.model.prefusion_layers[-1]
        for p in model.parameters():
            p.requires_grad_(False)
        for p in last.parameters():
            p.requires_grad_(True)
        emb = model.model.embed_tokens.weight
        rows = torch.zeros(emb.shape[0], 1)
        rows[trainable_rows(tok)] = 1.0
        with torch.no_grad():
            emb.mul_(1 + (cfg.embed_scale - 1) * rows)
        emb.requires_grad_(True)
        self._hook = emb.register_hook(lambda g: g * rows.to(g.dtype))
        self.opt = torch.optim.AdamW([
            {"params": list(last.parameters()) + list(self.heads.parameters()), "weight_decay": 0.01},
            {"params": [emb], "weight_decay": 0.0},
        ], lr=cfg.lr, betas=(0.9, 0.98))

    def close(self) -> None:
        self._hook.remove()
        for p in self.model.parameters():
            p.requires_grad_(True)

    def ids(self, ask: Ask) -> torch.Tensor:
        if ask not in self.qids:
            self.qids[ask] = question_ids(self.tok, ask)
            self.kind_pos[ask] = kind_positions(self.tok, self.qids[ask])
        return self.qids[ask]

    def batch(self, which: str, family: str, bags: int, rng: np.random.Generator) -> dict:
        cache, offsets, facts = self.sets[which]
        rows, qids, ftargets, bag_of, weights, btargets = [], [], [], [], [], []
        kinds = []  # (frame row in batch, position, kind, bag, colour bits of the kind in the frame, count)
        kind_bags = {}  # (bag, position) -> (kind, any-frame colour bits)
        for j in range(bags):
            v = int(rng.integers(len(facts)))
            n = offsets[v + 1] - offsets[v]
            frames = sample_bag(rng, family, n, self.cfg.max_bag)
            ask = draw_ask(rng, family, facts[v], frames)
            ids = self.ids(ask)
            positions = self.kind_pos[ask]
            per = [frame_target(ask, facts[v], f) for f in frames]
            yes = np.array([p[0] for p in per], bool) if family == "presence" else np.zeros(len(frames), bool)
            w = bag_weights(rng, yes)
            for f, p, wi in zip(frames, per, w, strict=True):
                for pos, k in positions:
                    asked = int(facts[v].pairs[f, ask.a, k]) if family == "presence" else -1
                    kinds.append((len(rows), pos, k, j, facts[v].pairs[f, :, k].astype(np.float32),
                                  int(facts[v].counts[f, k]), asked, ask.a if family == "presence" else -100))
                rows.append(offsets[v] + f)
                qids.append(ids)
                ftargets.append(p + (-1,) * (2 - len(p)))
                bag_of.append(j)
                weights.append(wi)
            for pos, k in positions:
                bits = facts[v].pairs[frames, :, k].any(0).astype(np.float32)
                asked = float(bits[ask.a]) if family == "presence" else -1.0
                kind_bags[(j, pos)] = np.append(bits, asked)
            btargets.append((bag_target(ask, facts[v], frames), -1))
        by_len: dict[int, list[int]] = {}
        for i, q in enumerate(qids):
            by_len.setdefault(len(q), []).append(i)
        return dict(cache=cache, rows=torch.tensor(rows), qids=qids, ft=torch.tensor(ftargets),
                    bag_of=torch.tensor(bag_of), w=torch.tensor(weights, dtype=torch.float32),
                    bt=torch.tensor(btargets), by_len=by_len, kinds=kinds, kind_bags=kind_bags, bags=bags)

    def forward(self, cache, rows, qids, by_len):
        """Fused question tokens per frame (list of (T, d)), the new c' (B, d) and, when the route head's
        attention is trained, its attention per frame (list of (T, prefix + T)), in the order of `rows`."""
        out = [None] * len(rows)
        cs = [None] * len(rows)
        attn = [None] * len(rows)
        tap = self.cfg.route_head if self.cfg.route_attention_weight else None
        for _, idx in by_len.items():
            q = torch.stack([qids[i] for i in idx])
            fused, c_new, probs = fuse_questions(self.model, cache, rows[idx], q, tap=tap)
            for j, i in enumerate(idx):
                out[i], cs[i] = fused[j], c_new[j]
                attn[i] = None if probs is None else probs[j]
        return out, torch.stack(cs), attn

    def losses(self, which: str, family: str, bags: int, rng: np.random.Generator) -> dict:
        b = self.batch(which, family, bags, rng)
        fused, c_new, attn = self.forward(b["cache"], b["rows"], b["qids"], b["by_len"])
        last = torch.stack([t[-1] for t in fused])
        w = b["w"]
        mean = torch.zeros(bags, last.shape[1]).index_add(0, b["bag_of"], last * w[:, None])
        cache = b["cache"]
        c_old = cache.hidden[b["rows"], cache.c_index].float()
        out = {"frame": (self.heads.frame(last), b["ft"]), "bag": (self.heads.bag(mean), b["bt"]),
               "keep": (c_new - c_old).pow(2).mean() / c_old.pow(2).mean()}
        if b["kinds"]:
            states = torch.stack([fused[r][pos] for r, pos, *_ in b["kinds"]])
            keys = sorted(b["kind_bags"])
            slot = {key: i for i, key in enumerate(keys)}
            index = torch.tensor([slot[(bag, pos)] for _, pos, _, bag, *_ in b["kinds"]])
            kw = torch.tensor([float(w[r]) for r, *_ in b["kinds"]])
            kmean = torch.zeros(len(keys), states.shape[1]).index_add(0, index, states * kw[:, None])
            out["kind_frame"] = (self.heads.kind_frame(states), torch.tensor(np.stack([k[4] for k in b["kinds"]])),
                                 torch.tensor([k[5] for k in b["kinds"]]),
                                 torch.tensor([k[6] for k in b["kinds"]], dtype=torch.float32))
            out["kind_bag"] = (self.heads.kind_bag(kmean), torch.tensor(np.stack([b["kind_bags"][k] for k in keys])))
            if self.heads.route is not None:
                out["route"] = (self.heads.route(states), torch.tensor([k[7] for k in b["kinds"]]))
            if family == "presence" and attn[0] is not None:  # the colour word is the token before the kind word
                s = b["cache"].next_position
                out["route_attention"] = torch.stack([attn[r][pos, s + pos - 1] for r, pos, *_ in b["kinds"]])
        return out

    def loss(self, family: str, parts: dict) -> torch.Tensor:
        total = family_loss(parts["frame"][0], family, parts["frame"][1], FRAME_SLICES)
        total = total + self.cfg.bag_weight * family_loss(parts["bag"][0], family, parts["bag"][1], BAG_SLICES)
        total = total + self.cfg.keep_weight * parts["keep"]
        if "kind_frame" in parts:
            logits, bits, count, asked = parts["kind_frame"]
            total = total + F.binary_cross_entropy_with_logits(logits[:, :6], bits) + F.cross_entropy(logits[:, 6:13],
                                                                                                       count)
            if family == "presence":
                total = total + F.binary_cross_entropy_with_logits(logits[:, 13], asked)
            logits, bits = parts["kind_bag"]
            total = total + self.cfg.bag_weight * F.binary_cross_entropy_with_logits(logits[:, :6], bits[:, :6])
            if family == "presence":
                total = total + self.cfg.bag_weight * F.binary_cross_entropy_with_logits(logits[:, 6], bits[:, 6])
            if family == "presence" and "route" in parts:
                total = total + self.cfg.route_weight * F.cross_entropy(*parts["route"])
            if "route_attention" in parts:
                total = total - self.cfg.route_attention_weight * parts["route_attention"].clamp(min=1e-6).log().mean()
        return total

    def step(self, step: int) -> dict:
        cfg = self.cfg
        for g, base in zip(self.opt.param_groups, (cfg.lr, cfg.lr * cfg.embed_lr_mult), strict=True):
            g["lr"] = base * min(1.0, (step + 1) / 30) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        row = {}
        total = 0.0
        self.opt.zero_grad(set_to_none=True)
        for family in FAMILIES:
            loss = self.loss(family, self.losses("train", family, cfg.bags_per_family, self.rng)) / len(FAMILIES)
            loss.backward()
            total += loss.item()
            row[family] = round(loss.item() * len(FAMILIES), 4)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        self.opt.step()
        row["loss"] = round(total, 4)
        return row

    @torch.no_grad()
    def evaluate(self, bags: int = 96) -> dict:
        """Held-out accuracy per family: (frame head, bag head, kind-colour bits per frame, per bag)."""
        rng = np.random.default_rng(12345)
        out = {}
        for family in FAMILIES:
            parts = self.losses("held", family, bags, rng)
            a, n = family_correct(parts["frame"][0], family, parts["frame"][1], FRAME_SLICES)
            b, m = family_correct(parts["bag"][0], family, parts["bag"][1], BAG_SLICES)
            res = [round(a / max(n, 1), 3), round(b / max(m, 1), 3)]
            if "kind_frame" in parts:
                logits, bits, count, asked = parts["kind_frame"]
                res.append(round(((logits[:, :6] > 0).float() == bits).all(1).float().mean().item(), 3))
                res.append(round((logits[:, 6:13].argmax(1) == count).float().mean().item(), 3))
                logits, bits = parts["kind_bag"]
                res.append(round(((logits[:, :6] > 0).float() == bits[:, :6]).all(1).float().mean().item(), 3))
                if family == "presence":
                    res.append(round(((parts["kind_frame"][0][:, 13] > 0).float() == asked).float().mean().item(), 3))
                    res.append(round(((logits[:, 6] > 0).float() == bits[:, 6]).float().mean().item(), 3))
                    if "route" in parts:
                        logits, colour = parts["route"]
                        res.append(round((logits.argmax(1) == colour).float().mean().item(), 3))
                    if "route_attention" in parts:
                        res.append(round(parts["route_attention"].mean().item(), 3))
            out[family] = tuple(res)
            out["keep"] = round(parts["keep"].item(), 4)
        return out


def run_question_fusion(model: LlavaMiniModel, tok, videos: list, held: list, normalize, cfg: QFusionConfig,
                        rng: np.random.Generator, log=lambda row: None, name: str = "qfusion") -> None:
    stage = QuestionFusion(model, tok, videos, held, normalize, cfg, rng)
    tqdm.write(f"question fusion step 0: held-out (frame, bag) accuracy {stage.evaluate(cfg.eval_bags)}")
    bar = tqdm(range(cfg.steps), desc="question fusion", dynamic_ncols=True)
    for step in bar:
        row = stage.step(step)
        if (step + 1) % cfg.every == 0 or step + 1 == cfg.steps:
            row["held_out"] = stage.evaluate(cfg.eval_bags)
            tqdm.write(f"question fusion step {step + 1}: held-out (frame, bag) accuracy {row['held_out']}")
        log({"stage": name, "step": step, **row})
        bar.set_postfix(loss=row["loss"])
    stage.close()
