"""Token generation over an explicit KV cache: greedy or sampled, streamed, with optional log-probs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from vidmini.engine.llama import DecodePool, KVCache, run_stack, run_step, run_step_pooled
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


class DecodeState:
    """The token-choosing half of `decode` for one answer: from each step's logits, the next token (greedy,
    sampled with the answer's own seeded generator, held to its grammar) as a `TokenEvent`, or None when the
    answer ends before it (a stop id, `max_new_tokens`, `cancel`, the grammar done). `decode` and the engine's
    `DecodeBatcher` both choose through it, so an answer is the same whichever runs its steps."""

    def __init__(self, cfg: SamplingConfig, cancel: threading.Event | None = None) -> None:
        self.cfg, self.cancel = cfg, cancel
        self.gen = torch.Generator().manual_seed(cfg.seed) if cfg.temperature > 0 and cfg.seed is not None else None
        self.step = 0
        self.finished = False  # no token will follow: the last event was given or the answer ended without it
        self.t0 = time.perf_counter()

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def ends_here(self) -> bool:
        """True (and `finished` set) when the answer ends before another token: it is finished, has
        `max_new_tokens`, was cancelled, or its grammar can take no more."""
        cfg, grammar = self.cfg, self.cfg.grammar
        if self.finished or self.step >= cfg.max_new_tokens or self.cancelled or (grammar is not None and grammar.done):
            self.finished = True
        return self.finished

    def next_event(self, logits: torch.Tensor, logp: torch.Tensor | None = None,
                   argmax: int | None = None) -> TokenEvent | None:
        """The token chosen from (V,) `logits`, or None when the answer ends here. After an event, `finished`
        says whether it was the last one (no forward step for it is needed). A caller that has them may pass
        `logp`, the row's log-softmax, and `argmax`, its best id (used only by a greedy answer without a
        grammar); `choose_events` does the same for a whole batch."""
        if self.ends_here():
            return None
        cfg, grammar = self.cfg, self.cfg.grammar
        if argmax is not None and grammar is None and cfg.temperature == 0:
            token = int(argmax)
        else:
            token = _choose(logits if grammar is None else grammar.mask(logits), cfg, self.gen)
        if logp is None:
            logp = torch.log_softmax(logits.float(), dim=-1)
        top: list[tuple[int, float]] = []
        if cfg.logprobs:
            values, ids = logp.topk(cfg.logprobs)
            top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
        return self.take(token, float(logp[token]), top)

    def take(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenEvent | None:
        """The chosen `token` as the answer's next event (None: it is a stop id, and the answer ends)."""
        cfg, grammar = self.cfg, self.cfg.grammar
        if token in cfg.stop_ids:
            self.finished = True
            return None
        if grammar is not None:
            grammar.advance(token)
        self.step += 1
        self.finished = self.step == cfg.max_new_tokens or (grammar is not None and grammar.done)
        return TokenEvent(token, logprob, top, time.perf_counter() - self.t0)


def choose_events(states: Sequence[DecodeState], logits: torch.Tensor) -> list[TokenEvent | BaseException | None]:
    """For a batch: what `states[b].next_event(logits[b])` gives, for every b, with the tensor work done once
    for the whole (B, V) batch rather than once per answer: one log-softmax, the greedy answers' grammar masks
    stacked and applied in one call, one argmax, one gather of the chosen tokens' log-probs, one top-k. A
    sampled answer chooses alone (its own seeded generator). An answer whose grammar fails gets the error in
    its place; the others are not affected."""
    out: list[TokenEvent | BaseException | None] = [None] * len(states)
    live = [b for b, st in enumerate(states) if not st.ends_here()]
    if not live:
        return out
    logp = torch.log_softmax(logits.float(), dim=-1)
    tokens = logits.argmax(dim=-1)
    masked = [b for b in live if states[b].cfg.temperature == 0 and states[b].cfg.grammar is not None]
    if masked:
        try:
            allowed = torch.stack([states[b].cfg.grammar.allowed(logits.shape[-1]) for b in masked]).to(logits.device)
        except Exception:  # noqa: BLE001 - a grammar that fails: each of these answers chooses (and fails) alone
            masked = []
        else:
            rows = torch.tensor(masked, device=logits.device)
            tokens[rows] = logits[rows].masked_fill(~allowed, float("-inf")).argmax(dim=-1)
    chosen: dict[int, int] = {}
    for b in live:
        st = states[b]
        if st.cfg.temperature == 0 and (st.cfg.grammar is None or b in masked):
            continue
        try:
            chosen[b] = _choose(logits[b] if st.cfg.grammar is None else st.cfg.grammar.mask(logits[b]), st.cfg,
                                st.gen)
        except Exception as e:  # noqa: BLE001 - this answer fails, not the batch
            out[b] = e
    live = [b for b in live if out[b] is None]
    picked = tokens.tolist()
    for b, token in chosen.items():
        picked[b] = token
    index = torch.tensor(live, device=logits.device)
    logprobs = logp[index, torch.tensor([picked[b] for b in live], device=logits.device)].tolist()
    top_k = max((states[b].cfg.logprobs for b in live), default=0)
    tops: dict[int, list[tuple[int, float]]] = {}
    if top_k:
        values, ids = logp[index].topk(top_k, dim=-1)
        values, ids = values.tolist(), ids.tolist()
        for j, b in enumerate(live):
            k = states[b].cfg.logprobs
            tops[b] = [(int(i), float(v)) for i, v in zip(ids[j][:k], values[j][:k], strict=True)] if k else []
    for j, b in enumerate(live):
        try:
            out[b] = states[b].take(int(picked[b]), float(logprobs[j]), tops.get(b, []))
        except Exception as e:  # noqa: BLE001 - e.g. a grammar refusing the token: this answer fails
            out[b] = e
    return out


@torch.no_grad()
def decode_step(model: LlavaMiniModel, tokens: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
    """One decode step for B answers at once: token b runs after `caches[b]`'s own filled positions (its own
    length and positions); returns (B, V) logits. Dense parts run batched over the B rows, attention per answer
    over its own cache (`run_step`). Batched matrix products may differ from one answer's alone (`prefill`) in
    the last bits of a float."""
    ids = torch.tensor([[int(t)] for t in tokens], device=model.device)
    positions = torch.tensor([[c.length] for c in caches], device=model.device)
    cos, sin = model.rope(positions)
    hidden = run_step(model.model.layers, model.embed(ids).to(model.dtype), cos, sin, caches, impl=model.attn_impl)
    return model.logits(hidden[:, -1])


@torch.no_grad()
def decode_step_pooled(model: LlavaMiniModel, tokens: Sequence[int], pool: DecodePool) -> torch.Tensor:
    """`decode_step` over a `DecodePool`: token b runs after row b's `pool.lengths[b]` positions; (B, V) logits.
    The same dense parts; attention is one masked call per layer for the whole batch."""
    ids = torch.tensor([[int(t)] for t in tokens], device=model.device)
    positions = torch.tensor([[n] for n in pool.lengths], device=model.device)
    cos, sin = model.rope(positions)
    hidden = run_step_pooled(model.model.layers, model.embed(ids).to(model.dtype), cos, sin, pool)
    return model.logits(hidden[:, -1])


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
    state = DecodeState(cfg, cancel)
    logits = first_logits
    while True:
        event = state.next_event(logits)
        if event is None:
            return
        yield event
        if state.finished:
            return
        logits = prefill(model, model.embed(torch.tensor([[event.token_id]], device=model.device)), cache)
