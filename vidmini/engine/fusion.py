"""Modality pre-fusion, computed whole (the paper's one pass) or split at the image placeholder.

The pre-fusion mask is causal, so for the sequence [patches, compressed, P, <image>, Q] everything a frame
contributes before Q — the fused compressed token, the fused prefix text P' and every pre-fusion layer's
keys/values — is independent of the question. `prefuse_prefix` computes that once per frame;
`prefuse_question` later runs only Q's tokens against it. Both give the numbers `prefuse_full` gives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vidmini.engine.llama import attention, finish_layer, project_qkv
from vidmini.engine.model import LlavaMiniModel


def _positions(valid: torch.Tensor, start: int) -> torch.Tensor:
    """Position ids counting only valid tokens from `start`; invalid ones get 1 (the reference's fill)."""
    pos = valid.long().cumsum(-1) - 1 + start
    return pos.masked_fill(~valid, 1)


def _visual_sequence(
    model: LlavaMiniModel, patches: torch.Tensor, compressed: torch.Tensor, text_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[patches, compressed, embed(text)] for a batch of frames, its key validity and raw text embeddings."""
    b = patches.shape[0]
    text = model.embed(text_ids)
    x = torch.cat([patches, compressed, text.unsqueeze(0).expand(b, -1, -1)], dim=1)
    n_vis = patches.shape[1] + compressed.shape[1]
    valid = torch.cat([torch.ones(n_vis, dtype=torch.bool, device=x.device), text_ids.to(x.device) > 0])
    return x, valid, text


@torch.no_grad()
def prefuse_full(
    model: LlavaMiniModel, patches: torch.Tensor, compressed: torch.Tensor, text_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference computation: all pre-fusion layers over [patches, compressed, text] at once.

    Keys at ids <= 0 (placeholder, padding) are masked; those positions keep their raw embeddings.
    Returns the fused compressed tokens (B, q, d) and the fused text (B, T, d).
    """
    x, valid, text = _visual_sequence(model, patches, compressed, text_ids)
    n = x.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() & valid[None, :]
    cos, sin = model.rope(_positions(valid, 0)[None])
    for layer in model.model.prefusion_layers:
        q, k, v = project_qkv(layer, x, cos, sin)
        x = finish_layer(layer, x, attention(q, k, v, mask, causal=False, impl=model.attn_impl))
    t, nq = text_ids.shape[0], compressed.shape[1]
    fused_text = torch.where((text_ids.to(x.device) > 0)[None, :, None], x[:, n - t :], text)
    return x[:, n - t - nq : n - t], fused_text


@dataclass
class FrameStates:
    """What ingest keeps per frame; nothing here depends on the question.

    compressed: fused compressed tokens c'_f, (F, q, d).
    prefix_text: fused prompt prefix P'_f, (F, |P|, d).
    keys / values: per pre-fusion layer, (F, kv_heads, S, head_dim) over [patches, compressed, P].
    key_valid: (S,) which of those S positions are attendable (P's ids <= 0 are not).
    prefix_ids: the P token ids these states were built for.
    next_position: the position id the first valid question token takes.
    """

    compressed: torch.Tensor
    prefix_text: torch.Tensor
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_valid: torch.Tensor
    prefix_ids: torch.Tensor
    next_position: int

    @property
    def num_frames(self) -> int:
        return self.compressed.shape[0]

    def select(self, index: torch.Tensor | slice | list[int]) -> FrameStates:
        """The states of a subset of frames, in the given order."""
        return FrameStates(
            compressed=self.compressed[index],
            prefix_text=self.prefix_text[index],
            keys=[k[index] for k in self.keys],
            values=[v[index] for v in self.values],
            key_valid=self.key_valid,
            prefix_ids=self.prefix_ids,
            next_position=self.next_position,
        )

    def to(self, device: torch.device | str) -> FrameStates:
        return FrameStates(
            self.compressed.to(device), self.prefix_text.to(device), [k.to(device) for k in self.keys],
            [v.to(device) for v in self.values], self.key_valid.to(device), self.prefix_ids, self.next_position,
        )

    @staticmethod
    def concat(parts: list[FrameStates]) -> FrameStates:
        first = parts[0]
        for p in parts[1:]:
            if not torch.equal(p.prefix_ids, first.prefix_ids):
                raise ValueError("frame states built for different prompt prefixes cannot be joined")
        return FrameStates(
            compressed=torch.cat([p.compressed for p in parts]),
            prefix_text=torch.cat([p.prefix_text for p in parts]),
            keys=[torch.cat([p.keys[i] for p in parts]) for i in range(len(first.keys))],
            values=[torch.cat([p.values[i] for p in parts]) for i in range(len(first.values))],
            key_valid=first.key_valid,
            prefix_ids=first.prefix_ids,
            next_position=first.next_position,
        )

    @staticmethod
    def empty_like_batch(batch: FrameStates, num_frames: int, device: torch.device | str) -> FrameStates:
        """Room for `num_frames` frames shaped like `batch`, to be filled in place (no concat copies)."""

        def room(t: torch.Tensor) -> torch.Tensor:
            return torch.empty((num_frames, *t.shape[1:]), dtype=t.dtype, device=device)

        return FrameStates(room(batch.compressed), room(batch.prefix_text), [room(k) for k in batch.keys],
                           [room(v) for v in batch.values], batch.key_valid, batch.prefix_ids, batch.next_position)

    def write(self, start: int, batch: FrameStates) -> None:
        stop = start + batch.num_frames
        self.compressed[start:stop] = batch.compressed
        self.prefix_text[start:stop] = batch.prefix_text
        for mine, theirs in zip(self.keys + self.values, batch.keys + batch.values, strict=True):
            mine[start:stop] = theirs

    def nbytes(self) -> int:
        tensors = [self.compressed, self.prefix_text, *self.keys, *self.values]
        return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def prefuse_prefix(
    model: LlavaMiniModel, patches: torch.Tensor, compressed: torch.Tensor, prefix_ids: torch.Tensor
) -> FrameStates:
    """The question-independent part of pre-fusion for a batch of frames."""
    x, valid, text = _visual_sequence(model, patches, compressed, prefix_ids)
    n = x.shape[1]
    mask = torch.ones(n, n, dtype=torch.bool, device=x.device).tril() & valid[None, :]
    cos, sin = model.rope(_positions(valid, 0)[None])
    keys, values = [], []
    for layer in model.model.prefusion_layers:
        q, k, v = project_qkv(layer, x, cos, sin)
        keys.append(k)
        values.append(v)
        x = finish_layer(layer, x, attention(q, k, v, mask, causal=False, impl=model.attn_impl))
    t, nq = prefix_ids.shape[0], compressed.shape[1]
    fused_prefix = torch.where((prefix_ids.to(x.device) > 0)[None, :, None], x[:, n - t :], text)
    return FrameStates(
        compressed=x[:, n - t - nq : n - t],
        prefix_text=fused_prefix,
        keys=keys,
        values=values,
        key_valid=valid,
        prefix_ids=prefix_ids.cpu(),
        next_position=int(valid.sum().item()),
    )


@dataclass
class QuestionPass:
    """Q's embeddings, rotary tables and mask, built once per question and reused for every batch of frames
    (a session fuses Q chunk by chunk as the pre-fusion states stream through its working set)."""

    ids: torch.Tensor
    valid: torch.Tensor
    text: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor


def question_pass(model: LlavaMiniModel, key_valid: torch.Tensor, next_position: int, question_ids: torch.Tensor
                  ) -> QuestionPass:
    q_valid = question_ids.to(model.device) > 0
    text = model.embed(question_ids)
    t = question_ids.shape[0]
    cos, sin = model.rope(_positions(q_valid, next_position)[None])
    causal = torch.ones(t, t, dtype=torch.bool, device=model.device).tril() & q_valid[None, :]
    mask = torch.cat([key_valid.to(model.device)[None, :].expand(t, -1), causal], dim=1)
    return QuestionPass(question_ids, q_valid, text, cos, sin, mask)


def attention_after_cached(q: torch.Tensor, cached_k: torch.Tensor, cached_v: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`attention(q, cat(cached_k, k), cat(cached_v, v), mask)` without the concatenation: one softmax over the
    scores against both parts. (B, H, T, D) queries; (B, Hkv, S, D) cached and (B, Hkv, T, D) own keys/values;
    `mask` (T, S + T), True = attend. Copying every frame's cached keys/values once per layer and question was
    a fifth of a question's fusion time on the CPU."""
    b, h, t, d = q.shape
    groups = h // cached_k.shape[1]
    s = cached_k.shape[2]
    folded = q.reshape(b, h // groups, groups * t, d)  # head h reads kv head h // groups: its rows, in order
    rows_mask = mask.repeat(groups, 1)
    scores = torch.cat([folded @ cached_k.transpose(-1, -2), folded @ k.transpose(-1, -2)], dim=-1) * d**-0.5
    probs = torch.softmax(scores.masked_fill(~rows_mask, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    out = probs[..., :s] @ cached_v + probs[..., s:] @ v
    return out.reshape(b, h, t, d)


@torch.no_grad()
def fused_question_frames(model: LlavaMiniModel, qp: QuestionPass, keys: list[torch.Tensor],
                          values: list[torch.Tensor]) -> torch.Tensor:
    """Q through the pre-fusion layers of a batch of frames (their cached keys/values, (B, Hkv, S, D) per layer):
    each frame's fused question, (B, |Q|, d); positions at ids <= 0 keep their raw embeddings.

    The first layer's input is Q's embeddings for every frame, so its projections run once and are shared. On
    the CPU attention reads the cached keys/values in place (`attention_after_cached`); elsewhere they are
    concatenated with Q's own for the configured kernel (SDPA, flash)."""
    b = keys[0].shape[0]
    x = qp.text.unsqueeze(0)
    in_place = model.device.type == "cpu" and model.attn_impl != "eager"
    for i, layer in enumerate(model.model.prefusion_layers):
        q, k, v = project_qkv(layer, x, qp.cos, qp.sin)
        if i == 0:
            q, k, v = (t.expand(b, -1, -1, -1) for t in (q, k, v))
        cached_k = keys[i].to(model.device, non_blocking=True)
        cached_v = values[i].to(model.device, non_blocking=True)
        if in_place:
            out = attention_after_cached(q, cached_k, cached_v, k, v, qp.mask)
        else:
            ks, vs = torch.cat([cached_k, k], dim=2), torch.cat([cached_v, v], dim=2)
            out = attention(q, ks, vs, qp.mask, causal=False, impl=model.attn_impl)
        x = finish_layer(layer, x, out)
    return torch.where(qp.valid[None, :, None], x, qp.text)


@torch.no_grad()
def fused_question_sum(model: LlavaMiniModel, qp: QuestionPass, keys: list[torch.Tensor],
                       values: list[torch.Tensor]) -> torch.Tensor:
    """The float32 SUM over a batch of frames of the fused question, (|Q|, d), so batches can be added up
    exactly as the reference's running sum does."""
    return fused_question_frames(model, qp, keys, values).float().sum(0)


@dataclass
class GatheredStates:
    """The pre-fusion keys/values of one fixed frame subset, gathered once into a buffer per layer, (B, Hkv, S +
    room, D), with room after the frames' S positions for a question's own keys/values. Questions over the same
    subset (a `uniform:K` or `retrieved:K` pick) then neither gather from chunks nor concatenate per layer."""

    frames: tuple[int, ...]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int

    @classmethod
    def build(cls, frames: Sequence[int], keys: list[torch.Tensor], values: list[torch.Tensor], room: int = 32
              ) -> GatheredStates:
        s = keys[0].shape[2]

        def buffer(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(t.shape[0], t.shape[1], s + room, t.shape[3])
            out[:, :, :s] = t
            return out

        return cls(tuple(frames), [buffer(k) for k in keys], [buffer(v) for v in values], s)

    def ensure_room(self, t: int) -> None:
        if self.keys[0].shape[2] < self.length + t:
            s = self.length
            grown = GatheredStates.build(self.frames, [k[:, :, :s] for k in self.keys],
                                         [v[:, :, :s] for v in self.values], room=t + 8)
            self.keys, self.values = grown.keys, grown.values

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


@torch.no_grad()
def fused_question_sum_gathered(model: LlavaMiniModel, qp: QuestionPass, gathered: GatheredStates) -> torch.Tensor:
    """`fused_question_sum` over a `GatheredStates`: the question's keys/values are written into the buffers' room
    (scratch: the caller holds the session's lock), attention reads the buffers up to the question's end."""
    t = qp.ids.shape[0]
    gathered.ensure_room(t)
    s, b = gathered.length, gathered.keys[0].shape[0]
    x = qp.text.unsqueeze(0).expand(b, -1, -1)
    for i, layer in enumerate(model.model.prefusion_layers):
        q, k, v = project_qkv(layer, x, qp.cos, qp.sin)
        gathered.keys[i][:, :, s : s + t] = k
        gathered.values[i][:, :, s : s + t] = v
        ks, vs = gathered.keys[i][:, :, : s + t], gathered.values[i][:, :, : s + t]
        x = finish_layer(layer, x, attention(q, ks, vs, qp.mask, causal=False, impl=model.attn_impl))
    return torch.where(qp.valid[None, :, None], x, qp.text).float().sum(0)


@torch.no_grad()
def prefuse_question(
    model: LlavaMiniModel, states: FrameStates, question_ids: torch.Tensor, chunk_frames: int = 128
) -> torch.Tensor:
    """Q's tokens through the pre-fusion layers of every frame, against that frame's cached states, then the
    float32 mean over frames (the video's fused question), (|Q|, d). Positions at ids <= 0 keep their raw
    embeddings. Frames go in chunks so memory stays bounded; states may live on another device."""
    qp = question_pass(model, states.key_valid, states.next_position, question_ids)
    total = torch.zeros(qp.text.shape, dtype=torch.float32, device=model.device)
    for start in range(0, states.num_frames, chunk_frames):
        stop = min(start + chunk_frames, states.num_frames)
        total += fused_question_sum(model, qp, [k[start:stop] for k in states.keys],
                                    [v[start:stop] for v in states.values])
    return (total / states.num_frames).to(qp.text.dtype)


def mean_over_frames(fused: torch.Tensor, device: torch.device | str | None = None, chunk: int = 256
                     ) -> torch.Tensor:
    """The reference's video text: the float32 mean over frames (dim 0), cast back; summed in chunks so a long
    video needs no float32 copy of the whole tensor."""
    device = device or fused.device
    total = torch.zeros(fused.shape[1:], dtype=torch.float32, device=device)
    for start in range(0, fused.shape[0], chunk):
        total += fused[start : start + chunk].to(device).float().sum(0)
    return (total / fused.shape[0]).to(fused.dtype)
