"""The engine's public face: encode frames once, answer many questions against the cached states.

`Engine.encode_frames` → `FrameStates` (question-independent), `Engine.answer` (only the question's tokens
through pre-fusion, then the LLM), `Engine.forward_full` (the paper's one pass, the baseline).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from vidmini.engine.batcher import DecodeBatcher
from vidmini.engine.fusion import (
    FrameStates,
    mean_over_frames,
    prefuse_full,
    prefuse_prefix,
    prefuse_question,
)
from vidmini.engine.generate import SamplingConfig, TokenEvent, allocate_cache, decode, prefill
from vidmini.engine.llama import KVCache
from vidmini.engine.model import LlavaMiniModel
from vidmini.engine.prompt import PromptIds, build_prompt
from vidmini.engine.retrieval import RetrievalSpace
from vidmini.engine.vision import preprocess_frames, preprocess_image, processor_size

_BATCHER_LOCK = threading.Lock()


@dataclass
class PrefixCache:
    """The LLM's keys/values for [mean P', c'_1 … c'_N]: exact for exactly the frames it was built from."""

    cache: KVCache
    length: int
    num_frames: int


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    frames: int
    prompt_tokens: int
    ttft_ms: float
    tokens_per_s: float
    logprobs: list[list[dict]] = field(default_factory=list)


@dataclass
class Engine:
    """A loaded model with its tokenizer, image processor and prompt conventions."""

    model: LlavaMiniModel
    tokenizer: object
    processor: object
    eos_ids: tuple[int, ...]
    name: str = "model"
    prompt_style: str = "reference"
    encode_batch: int = 16
    is_demo: bool = False
    retrieval: RetrievalSpace | None = None  # text–frame search space; None when the model has no text tower
    weights: str = ""  # a content key of the weight files (app.models.weights_fingerprint); "" when unknown
    _prompts: dict = field(default_factory=dict, repr=False, compare=False)  # (style, question) → PromptIds
    _batcher: DecodeBatcher | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def batcher(self) -> DecodeBatcher:
        """The engine's one decode thread: the decode steps of every session's answers in flight run in it,
        batched (`vidmini.engine.batcher`)."""
        with _BATCHER_LOCK:
            if self._batcher is None or self._batcher.model is not self.model:
                self._batcher = DecodeBatcher(self.model)
            return self._batcher

    # ---- prompt -------------------------------------------------------------------------------------------
    def prompt(self, question: str) -> PromptIds:
        """The question's prompt ids. Rendering the chat template and tokenizing costs about as much as a warm
        question's whole pre-fusion on a small model, so recent prompts are kept (copies are handed out)."""
        key = (self.prompt_style, question)
        ids = self._prompts.get(key)
        if ids is None:
            ids = build_prompt(self.tokenizer, question, self.prompt_style)
            if len(self._prompts) >= 256:
                self._prompts.pop(next(iter(self._prompts)))
            self._prompts[key] = ids
        return PromptIds(ids.prefix.clone(), ids.question.clone())

    @property
    def prefix_ids(self) -> torch.Tensor:
        return self.prompt("").prefix

    # ---- pixels -------------------------------------------------------------------------------------------
    def image_pixels(self, image: Image.Image) -> torch.Tensor:
        """One image → (1, parts, 3, S, S)."""
        cfg = self.model.config
        return preprocess_image(image, self.processor, cfg.resolution_ratio, cfg.image_aspect_ratio)[None]

    @property
    def frame_side(self) -> int:
        """The side video frames are squared to (nearest) before the processor: `frame_pixels` of frames already
        that size is the same as of the full frames."""
        return processor_size(self.processor)

    def frame_pixels(self, frames: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Video frames (H, W, 3 uint8) → (F, parts, 3, S, S)."""
        return preprocess_frames(frames, self.processor, self.model.config.resolution_ratio)

    # ---- the split ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_frames(
        self, pixels: torch.Tensor, batch_size: int | None = None, out_device: torch.device | str | None = None
    ) -> FrameStates:
        """Vision tower, compressor, projector and the question-independent pre-fusion, in batches, written
        into one preallocated set of tensors (on `out_device`, default the model's)."""
        return self.encode_frames_and_embeddings(pixels, batch_size, out_device, embeddings=False)[0]

    def encode_frames_and_embeddings(
        self, pixels: torch.Tensor, batch_size: int | None = None, out_device: torch.device | str | None = None,
        embeddings: bool = True,
    ) -> tuple[FrameStates, torch.Tensor | None]:
        """`encode_frames` plus each frame's retrieval embedding (F, dim) float32 on the CPU, from the same
        vision pass; None when the model has no retrieval space (or `embeddings` is False)."""
        batch = batch_size or self.encode_batch
        prefix = self.prefix_ids
        space = self.retrieval if embeddings else None
        out: FrameStates | None = None
        vectors = []
        for start in range(0, pixels.shape[0], batch):
            patches, compressed, pooled = self.model.encode_visual_pooled(pixels[start : start + batch])
            part = prefuse_prefix(self.model, patches, compressed, prefix)
            if out is None:
                out = FrameStates.empty_like_batch(part, pixels.shape[0], out_device or self.model.device)
            out.write(start, part)
            if space is not None:
                vectors.append(space.embed_pooled(pooled))
        if out is None:
            raise ValueError("no frames to encode")
        return out, (torch.cat(vectors) if vectors else None)

    def _check_states(self, states: FrameStates, prompt: PromptIds) -> None:
        if states.num_frames == 0:
            raise ValueError("no frames to answer about")
        if not torch.equal(states.prefix_ids, prompt.prefix):
            raise ValueError("these frame states were encoded for another prompt prefix (model or prompt style)")

    def _llm_inputs(self, prefix_mean: torch.Tensor, compressed: torch.Tensor, question_mean: torch.Tensor
                    ) -> torch.Tensor:
        """[mean P', c'_1 … c'_N, mean Q'], cut to `tokenizer_model_max_length` as the reference cuts it."""
        seq = torch.cat([prefix_mean, compressed.flatten(0, 1).to(prefix_mean.device), question_mean])
        limit = self.model.config.tokenizer_model_max_length
        return (seq[:limit] if limit else seq)[None]

    @torch.no_grad()
    def build_prefix_cache(self, states: FrameStates, extra_capacity: int = 1024) -> PrefixCache:
        """LLM keys/values of the question-independent prefix, reused by every question on these frames."""
        prefix_mean = mean_over_frames(states.prefix_text, self.model.device)
        prefix = torch.cat([prefix_mean, states.compressed.flatten(0, 1).to(self.model.device)])[None]
        cache = allocate_cache(self.model, prefix.shape[1] + extra_capacity)
        prefill(self.model, prefix.to(self.model.device), cache)
        return PrefixCache(cache, cache.length, states.num_frames)

    def _prefill_question(
        self, question: str, states: FrameStates, prefix_cache: PrefixCache | None, capacity: int
    ) -> tuple[torch.Tensor, KVCache, int]:
        """Fuse the question against the states and prefill the LLM; returns first logits, the cache, and
        the length to roll the cache back to afterwards."""
        prompt = self.prompt(question)
        self._check_states(states, prompt)
        fused_q = prefuse_question(self.model, states, prompt.question)
        limit = self.model.config.tokenizer_model_max_length
        if prefix_cache is not None and not (limit and prefix_cache.length + fused_q.shape[0] > limit):
            if prefix_cache.num_frames != states.num_frames:
                raise ValueError("the prefix cache was built for another frame set")
            cache = prefix_cache.cache
            cache.length = prefix_cache.length
            return prefill(self.model, fused_q[None], cache), cache, prefix_cache.length
        embeds = self._llm_inputs(mean_over_frames(states.prefix_text, self.model.device), states.compressed,
                                  fused_q)
        cache = allocate_cache(self.model, embeds.shape[1] + capacity + 1)
        return prefill(self.model, embeds, cache), cache, 0

    @torch.no_grad()
    def first_logits(self, question: str, states: FrameStates, prefix_cache: PrefixCache | None = None
                     ) -> torch.Tensor:
        """Logits of the first answer token from cached states (for tests and comparisons)."""
        logits, cache, rollback = self._prefill_question(question, states, prefix_cache, 0)
        cache.length = rollback
        return logits

    @torch.no_grad()
    def answer(
        self,
        question: str,
        states: FrameStates,
        sampling: SamplingConfig | None = None,
        prefix_cache: PrefixCache | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[TokenEvent]:
        """Stream the answer: Q through pre-fusion against the cached states, mean over frames, the LLM.

        With a `prefix_cache` only Q' is prefilled; the cache is rolled back afterwards (not thread-safe:
        one question at a time per prefix cache).
        """
        sampling = sampling or SamplingConfig(stop_ids=self.eos_ids)
        first, cache, rollback = self._prefill_question(question, states, prefix_cache, sampling.max_new_tokens)
        try:
            yield from decode(self.model, first, cache, sampling, cancel)
        finally:
            cache.length = rollback

    @torch.no_grad()
    def full_inputs(self, pixels: torch.Tensor, question: str) -> torch.Tensor:
        """The paper's computation in one pass per frame over [patches, compressed, P, <image>, Q]: the LLM's
        input embeddings (1, L, d). No caches kept."""
        prompt = self.prompt(question)
        full_ids = prompt.full()
        compressed, text_sum = [], None
        for start in range(0, pixels.shape[0], self.encode_batch):  # frames are independent; batch them
            patches, comp = self.model.encode_visual(pixels[start : start + self.encode_batch])
            c, text = prefuse_full(self.model, patches, comp, full_ids)
            compressed.append(c)
            part = text.float().sum(0)  # the reference's float32 running sum over frames
            text_sum = part if text_sum is None else text_sum + part
        text_mean = (text_sum / pixels.shape[0]).to(self.model.dtype)
        cut = prompt.prefix.shape[0]
        return self._llm_inputs(text_mean[:cut], torch.cat(compressed), text_mean[cut + 1 :])

    @torch.no_grad()
    def first_logits_full(self, pixels: torch.Tensor, question: str) -> torch.Tensor:
        embeds = self.full_inputs(pixels, question)
        return prefill(self.model, embeds, allocate_cache(self.model, embeds.shape[1]))

    @torch.no_grad()
    def forward_full(
        self,
        pixels: torch.Tensor,
        question: str,
        sampling: SamplingConfig | None = None,
        cancel: threading.Event | None = None,
    ) -> Iterator[TokenEvent]:
        """Answer with the plain one-pass computation (the baseline for tests and benchmarks)."""
        sampling = sampling or SamplingConfig(stop_ids=self.eos_ids)
        embeds = self.full_inputs(pixels, question)
        cache = allocate_cache(self.model, embeds.shape[1] + sampling.max_new_tokens + 1)
        first = prefill(self.model, embeds, cache)
        yield from decode(self.model, first, cache, sampling, cancel)

    # ---- convenience --------------------------------------------------------------------------------------
    def collect(self, events: Iterator[TokenEvent], frames: int, prompt_tokens: int = 0) -> Answer:
        """Drain a token stream into an `Answer` with timing (TTFT counted from this call)."""
        t0 = time.perf_counter()
        ids, logprobs, first_at = [], [], None
        for ev in events:
            if first_at is None:
                first_at = time.perf_counter()
            ids.append(ev.token_id)
            if ev.top:
                logprobs.append([
                    {"id": i, "token": self.tokenizer.decode([i]), "logprob": lp} for i, lp in ev.top
                ])
        end = time.perf_counter()
        ttft = ((first_at or end) - t0) * 1000
        rate = (len(ids) - 1) / (end - first_at) if first_at and len(ids) > 1 and end > first_at else 0.0
        text = self.tokenizer.decode(ids, skip_special_tokens=True).strip()
        return Answer(text, ids, frames, prompt_tokens, ttft, rate, logprobs)
