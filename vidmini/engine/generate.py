"""Token generation over an explicit KV cache: greedy or sampled, streamed, with optional log-probs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from vidmini.engine.llama import KVCache, run_stack
from vidmini.engine.model import LlavaMiniModel


@dataclass
class SamplingConfig:
    """temperature 0 = greedy. `stop_ids` end the answer (the stop token is not part of it).

    `grammar`, when set, holds the answer to a grammar: an object with `mask(logits) -> logits` (tokens that may
    not come next at -inf), `advance(token)` and `done` (no further token possible), e.g.
    `vidmini.engine.constrained.JsonConstraint`. It is stateful: one per answer."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    logprobs: int = 0
    seed: int | None = None
    grammar: object | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")


@dataclass
class TokenEvent:
    """One generated token; `top` holds (id, logprob) of the K most likely candidates when asked for."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    elapsed_s: float = 0.0


def allocate_cache(model: LlavaMiniModel, capacity: int, batch: int = 1) -> KVCache:
    llama = model.config.llama
    head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads
    return KVCache.allocate(
        llama.num_hidden_layers, batch, llama.num_key_value_heads, capacity, head_dim, model.dtype, model.device
    )


@torch.no_grad()
def prefill(model: LlavaMiniModel, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run (1, T, d) input embeddings after the cached positions; returns the last position's logits (V,)."""
    start = cache.length
    positions = torch.arange(start, start + embeds.shape[1], device=model.device)[None]
    cos, sin = model.rope(positions)
    hidden = run_stack(model.model.layers, embeds.to(model.dtype), cos, sin, cache, impl=model.attn_impl)
    return model.logits(hidden[:, -1])[0]


def _choose(logits: torch.Tensor, cfg: SamplingConfig, gen: torch.Generator | None) -> int:
    if cfg.temperature == 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < cfg.top_p  # smallest prefix whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen).item())


@torch.no_grad()
def decode(
    model: LlavaMiniModel,
    first_logits: torch.Tensor,
    cache: KVCache,
    cfg: SamplingConfig,
    cancel: threading.Event | None = None,
) -> Iterator[TokenEvent]:
    """Yield tokens until a stop id, `max_new_tokens`, or `cancel` is set, or `cfg.grammar` is done.

    With a grammar the token is chosen (greedy, sampled, top-p) among the tokens it allows, and the answer ends
    when it can take no more. Log-probs (and `top`) are always of the raw logits, before any grammar mask: a
    forced token may have a low log-prob."""
    gen = None
    if cfg.temperature > 0 and cfg.seed is not None:
        gen = torch.Generator().manual_seed(cfg.seed)
    grammar = cfg.grammar
    logits = first_logits
    t0 = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        if cancel is not None and cancel.is_set():
            return
        if grammar is None:
            token = _choose(logits, cfg, gen)
        else:
            if grammar.done:
                return
            token = _choose(grammar.mask(logits), cfg, gen)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top: list[tuple[int, float]] = []
        if cfg.logprobs:
            values, ids = logp.topk(cfg.logprobs)
            top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        if token in cfg.stop_ids:
            return
        if grammar is not None:
            grammar.advance(token)
        yield TokenEvent(token, float(logp[token]), top, time.perf_counter() - t0)
        if step + 1 == cfg.max_new_tokens or (grammar is not None and grammar.done):
            return
        logits = prefill(model, model.embed(torch.tensor([[token]], device=model.device)), cache)
