"""A video opened for questions: tier A caches on the device, tier C pre-fusion working set, fusion policies,
time ranges, streaming answers (docs/architecture.md, "The caching split").

Tier A: every frame's fused compressed token c'_f on the device, and LLM key/value caches of the
question-independent prefix [mean P', c'_f for f in the frame set]. mean P' is a mean over the frames IN USE and
sits first, so a prefix cache is exact for exactly one frame set: the session keeps one per frame set (the whole
video, a time range), least-recently-used, up to `max_prefix_caches`.

Question-time fusion (the `policy`): Q runs through the pre-fusion layers against some frames' cached states
and is averaged over them.
  all          every frame of the frame set: the reference's computation, exact.
  uniform:K    K frames spread evenly over the frame set (all of them when K >= its size).
  retrieved:K  K frames chosen by `picker(question, frames, K)` (e.g. the video's index); uniform without one.
  auto         `all` when the frame set's pre-fusion states fit `prefusion_budget_bytes` at once, else
               uniform:AUTO_K. Streaming states through the working set keeps `all` possible at any size, but
               its cost grows with the video; AUTO_K bounds a question's cost.
Only Q's fusion is subsampled: the LLM still sees every frame token of the frame set.

Context packing: when the frame set plus prompt and answer would not fit the LLM's position window
(`max_position_embeddings`, 128k for Llama-3.1), the frame set is subsampled with a uniform stride and the
answer reports it (`packed_from`). The reference instead cuts the sequence at `tokenizer_model_max_length`;
that cut is kept as it is (exact) when a checkpoint sets it.

Live sources (`append`): in mode "exact" a grown video gets a new prefix cache built over all its frames;
in mode "incremental" the whole-video cache keeps its (now stale) mean P' and only the new frames' tokens are
prefilled after it — approximate, and every answer from it reports the cosine of the stale fused prefix
against the exact one (`prefix_cosine`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from vidmini.engine.batcher import DecodeSequence
from vidmini.engine.fusion import (
    FrameStates,
    GatheredStates,
    fused_question_sum,
    fused_question_sum_gathered,
    question_pass,
)
from vidmini.engine.generate import SamplingConfig, TokenEvent, allocate_cache, prefill
from vidmini.engine.inference import Engine
from vidmini.engine.llama import KVCache
from vidmini.engine.speech_prompt import HeardLine, SpeechContext, lines_for, with_speech
from vidmini.engine.tiers import ChunkedStates, PrefusionWorkingSet
from vidmini.engine.timerange import TimeRange, choose_range

AUTO_K = 64  # frames Q is fused against when `auto` cannot use all: ~2 per minute of a 30-minute range
DEFAULT_PREFUSION_BUDGET = 1 << 30
PREFIX_CACHE_SLACK = 512  # room after a prefix cache for the question and the answer before it must grow
POLICY_KINDS = ("all", "uniform", "retrieved", "auto")

FramePicker = Callable[[str, Sequence[int], int], Sequence[int]]


@dataclass(frozen=True)
class Policy:
    """A question-time fusion policy: "all", "auto", "uniform:K" or "retrieved:K"."""

    kind: str
    k: int | None = None

    @classmethod
    def parse(cls, text: str | Policy) -> Policy:
        if isinstance(text, Policy):
            return text
        kind, _, k = str(text).strip().partition(":")
        if kind not in POLICY_KINDS:
            raise ValueError(f"unknown policy {text!r}: use all, auto, uniform:K or retrieved:K")
        if kind in ("all", "auto"):
            if k:
                raise ValueError(f"policy {kind!r} takes no K")
            return cls(kind)
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"policy {kind!r} needs K >= 1, as in {kind}:32")
        return cls(kind, int(k))

    def __str__(self) -> str:
        return self.kind if self.k is None else f"{self.kind}:{self.k}"


def uniform_pick(frames: Sequence[int], k: int) -> list[int]:
    """k of `frames` spread evenly, first and last included (all of them when k >= len)."""
    n = len(frames)
    if k >= n:
        return list(frames)
    if k == 1:
        return [frames[n // 2]]
    picks = np.unique(np.round(np.linspace(0, n - 1, k)).astype(int))
    return [frames[i] for i in picks]


@dataclass
class PrefixEntry:
    """An LLM prefix cache for one frame set. `prefix_sum`/`prefix_count`: the float32 sum of P'_f over the frames
    whose mean the cache holds (for the exact mean after a live source grows); `exact` False when the cache holds
    a stale mean (incremental mode), `prefix_cosine` then says how far it is from the exact one."""

    frames: range
    cache: KVCache
    length: int
    prefix_mean: torch.Tensor
    prefix_sum: torch.Tensor
    prefix_count: int
    exact: bool = True
    prefix_cosine: float = 1.0
    busy: bool = False  # a question in flight writes after `length` in `cache`; others copy the prefix

    def nbytes(self) -> int:
        return self.cache.nbytes() + self.prefix_sum.numel() * 4 + self.prefix_mean.numel() * \
            self.prefix_mean.element_size()


@dataclass
class SessionAnswer:
    """One answer and how it was made: the frames (indices into the video) and their timestamps, the fusion policy
    as resolved, whether the prefix cache was reused, exactness, timing."""

    text: str
    token_ids: list[int]
    policy: str
    policy_requested: str
    range: TimeRange | None
    frames: list[int]
    timestamps: list[float]
    fused_frames: list[int]
    ttft_ms: float
    tokens_per_s: float
    queued_ms: float
    prefix_cache_hit: bool
    exact_prefix: bool
    prefix_cosine: float
    packed_from: int | None = None
    cancelled: bool = False
    logprobs: list[list[dict]] = field(default_factory=list)
    speech: list[HeardLine] = field(default_factory=list)  # the transcript lines the prompt carried
    speech_tokens: int = 0  # the tokens they added to the prompt

    def to_json(self) -> dict:
        out = asdict(self)
        out["range"] = None if self.range is None else {"start": self.range.start, "end": self.range.end,
                                                         "source": self.range.source}
        return out


@dataclass
class _Plan:
    """What a question will use, resolved before any compute (so bad input fails at `ask`, not mid-stream)."""

    question: str
    frames: range
    fuse: list[int]
    policy: Policy
    requested: Policy
    time_range: TimeRange | None
    packed_from: int | None
    sampling: SamplingConfig
    question_ids: torch.Tensor  # the prompt's ids after the image placeholder, tokenized once per question
    speech: list[HeardLine] = field(default_factory=list)  # heard speech written before the question
    speech_tokens: int = 0


class AnswerStream:
    """Iterate for `TokenEvent`s as they are generated; `result()` drains the rest and returns the
    `SessionAnswer`; `cancel()` stops generation at the next token.

    Iterating runs the question's fusion and prefill on the iterating thread under the session's lock, chooses the
    first token there, and hands the decode steps to the engine's `DecodeBatcher`, batched with every other
    answer in flight. Leaving the iteration early (closing the iterator) stops the answer as `cancel()` does."""

    def __init__(self, session: VideoSession, plan: _Plan, cancel: threading.Event | None) -> None:
        self._session, self._plan = session, plan
        self._cancel = cancel or threading.Event()
        self._created = time.perf_counter()
        self._events: list[TokenEvent] = []
        self._info: dict = {}
        self._iter: Iterator[TokenEvent] | None = None
        self._done = False
        self.on_done: list[Callable[[], None]] = []

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._iter is None:
            self._iter = self._run()
        return self._iter

    def _run(self) -> Iterator[TokenEvent]:
        seq, handed = None, False
        batcher = self._session.engine.batcher
        try:
            with batcher.prefilling():  # until its first step is queued: decoding waits for it to join
                with self._session.lock, batcher.compute:  # compute: never beside a decode step
                    started = time.perf_counter()
                    self._info["queued_ms"] = (started - self._created) * 1000
                    seq, first = self._session._start(self._plan, self._cancel, self._info)
                batcher.start(seq, first)
            handed = True
            for ev in seq.events():
                if not self._events:
                    self._info["first_at"] = time.perf_counter()
                self._events.append(ev)
                yield ev
            self._info["started"], self._info["end"] = started, time.perf_counter()
        finally:
            if seq is not None and not handed:
                seq.end()  # never reached the batcher: give its cache back here
            elif seq is not None and not seq.ended:
                seq.abandoned = True  # the reader went away: the batcher drops it at its next step
            self._done = True
            for hook in self.on_done:
                hook()

    def result(self) -> SessionAnswer:
        for _ in self:
            pass
        if not self._done:
            raise RuntimeError("the stream was not run to its end")
        plan, info, ids = self._plan, self._info, [e.token_id for e in self._events]
        start, end = info["started"], info["end"]
        first = info.get("first_at", end)
        rate = (len(ids) - 1) / (end - first) if len(ids) > 1 and end > first else 0.0
        tok = self._session.engine.tokenizer
        logprobs = [[{"id": i, "token": tok.decode([i]), "logprob": lp} for i, lp in e.top]
                    for e in self._events if e.top]
        ts = self._session.timestamps
        return SessionAnswer(
            text=tok.decode(ids, skip_special_tokens=True).strip(), token_ids=ids, policy=str(plan.policy),
            policy_requested=str(plan.requested), range=plan.time_range, frames=list(plan.frames),
            timestamps=[float(ts[i]) for i in plan.frames], fused_frames=plan.fuse,
            ttft_ms=(first - start) * 1000, tokens_per_s=rate, queued_ms=info["queued_ms"],
            prefix_cache_hit=info["hit"], exact_prefix=info["exact"], prefix_cosine=info["cosine"],
            packed_from=plan.packed_from, cancelled=self._cancel.is_set(), logprobs=logprobs,
            speech=list(plan.speech), speech_tokens=plan.speech_tokens,
        )


class VideoSession:
    """Questions about one video, from any number of threads. A question holds `lock` (a `SessionManager` gives
    all its sessions one) for its fusion and LLM prefill only; its decode steps then run in the engine's
    `DecodeBatcher`, batched with every other answer in flight, over a KV cache of its own: the frame set's prefix
    cache itself when no other question is using it (marked busy, rolled back when the answer ends), else a copy
    of its prefix."""

    def __init__(
        self,
        engine: Engine,
        source: ChunkedStates,
        compressed: torch.Tensor,
        timestamps: Sequence[float],
        *,
        prefusion_budget_bytes: int = DEFAULT_PREFUSION_BUDGET,
        max_prefix_caches: int = 4,
        picker: FramePicker | None = None,
        auto_k: int = AUTO_K,
        live_mode: str = "exact",
        lock: threading.RLock | None = None,
    ) -> None:
        if live_mode not in ("exact", "incremental"):
            raise ValueError("live_mode must be 'exact' or 'incremental'")
        if source.num_frames == 0 or len(timestamps) != source.num_frames or compressed.shape[0] != source.num_frames:
            raise ValueError(f"a session needs > 0 frames and one timestamp and compressed token per frame "
                             f"({source.num_frames} states, {len(timestamps)} timestamps, {compressed.shape[0]} tokens)")
        if not torch.equal(source.prefix_ids.cpu(), engine.prefix_ids):
            raise ValueError("these frame states were encoded for another prompt prefix (model or prompt style)")
        self.engine = engine
        self.device = engine.model.device
        self.compressed = compressed.to(self.device)  # tier A
        self.timestamps = np.asarray(timestamps, dtype=np.float64)
        self.working_set = PrefusionWorkingSet(source, prefusion_budget_bytes, self.device)  # tier C
        self.max_prefix_caches = max_prefix_caches
        self.picker, self.auto_k, self.live_mode = picker, auto_k, live_mode
        self.lock = lock or threading.RLock()
        self.fuse_batch_frames = 64  # frames per pre-fusion pass of Q (bounds the activations' memory)
        self._prefixes: OrderedDict[range, PrefixEntry] = OrderedDict()
        self._copy_bytes = 0  # prefix copies held by questions in flight
        self._copy_lock = threading.Lock()
        self.closed = False

    @classmethod
    def from_states(cls, engine: Engine, states: FrameStates, timestamps: Sequence[float], chunk_frames: int = 32,
                    **options) -> VideoSession:
        """A session over states in memory (e.g. `ingest.job.load_states(store)`)."""
        return cls(engine, ChunkedStates.from_states(states, chunk_frames), states.compressed, timestamps, **options)

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def source(self) -> ChunkedStates:
        return self.working_set.source

    @property
    def num_frames(self) -> int:
        return self.source.num_frames

    def device_bytes(self) -> int:
        """Bytes this session holds on the device: tier A (tokens, prefix caches), the tier C working set, and the
        prefix copies of questions in flight."""
        if self.closed:
            return 0
        return (self.compressed.numel() * self.compressed.element_size()
                + sum(e.nbytes() for e in list(self._prefixes.values())) + self.working_set.resident_bytes
                + self._copy_bytes)

    def tier_a_bytes_per_frame(self) -> float:
        """c'_f plus its LLM keys/values (one token per compressed query), per frame."""
        c = self.compressed[0].numel() * self.compressed.element_size()
        llama = self.engine.model.config.llama
        head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads
        kv = 2 * llama.num_hidden_layers * llama.num_key_value_heads * head_dim * self.compressed.element_size()
        return c + kv * self.compressed.shape[1]

    @property
    def cached_frame_sets(self) -> list[range]:
        """Frame sets with a prefix cache, least recently used first."""
        return list(self._prefixes)

    def close(self) -> None:
        """Drop every device tensor this session holds (the model is not the session's)."""
        with self.lock:
            self._prefixes.clear()
            self.working_set.clear()
            self.compressed = torch.empty(0)
            self.closed = True

    # ---- planning ---------------------------------------------------------------------------------------------
    def frames_for(self, question: str = "", start: str | float | None = None, end: str | float | None = None,
                   question_times: bool = True) -> tuple[range, TimeRange | None]:
        """The frame set for a question: an explicit [start, end], else (with `question_times`) a time named in
        the question (see `engine.timerange.range_from_question`), else the whole video."""
        time_range = choose_range(question if question_times else "", start, end, float(self.timestamps[-1]))
        if time_range is None:
            return range(self.num_frames), None
        return time_range.frame_span(self.timestamps), time_range

    def _pack(self, frames: range, question_len: int, max_new: int) -> tuple[range, int | None]:
        window = self.engine.model.config.llama.max_position_embeddings
        if self.engine.model.config.tokenizer_model_max_length:
            return frames, None  # the reference's cut applies instead
        room = window - len(self.engine.prefix_ids) - question_len - max_new - 1
        per_frame = self.compressed.shape[1]
        if len(frames) * per_frame <= room:
            return frames, None
        step = math.ceil(len(frames) * per_frame / max(room, per_frame))
        return frames[::step], len(frames)

    def heard_lines(self, question: str, time_range: TimeRange | None, speech: SpeechContext,
                    question_times: bool = True) -> list[HeardLine]:
        """The transcript lines a question's prompt carries (`engine.speech_prompt`): those of its range (the whole
        video without one), nearest the times it names first, within `speech.budget` tokens."""
        return lines_for(self.engine.tokenizer, question, time_range, speech, question_times, self.engine.prompt_style)

    def plan(self, question: str, start=None, end=None, policy: str | Policy = "auto",
             sampling: SamplingConfig | None = None, question_times: bool = True,
             speech: SpeechContext | None = None) -> _Plan:
        self._check_open()
        requested = Policy.parse(policy)
        sampling = sampling or SamplingConfig(stop_ids=self.engine.eos_ids)
        frames, time_range = self.frames_for(question, start, end, question_times)
        heard = self.heard_lines(question, time_range, speech, question_times) if speech is not None else []
        question_ids = self.engine.prompt(with_speech(question, heard)).question
        frames, packed_from = self._pack(frames, len(question_ids), sampling.max_new_tokens)
        resolved = requested
        if requested.kind == "auto":
            resolved = Policy("all") if self.working_set.fits(len(frames)) else Policy("uniform", self.auto_k)
        if resolved.kind == "all":
            fuse = list(frames)
        elif resolved.kind == "retrieved" and self.picker is not None:
            fuse = sorted(set(int(i) for i in self.picker(question, frames, resolved.k)))
            if not fuse or not set(fuse) <= set(frames):
                raise ValueError("the frame picker must return frames of the frame set")
        else:
            fuse = uniform_pick(frames, resolved.k)
        if resolved.kind == "retrieved" and self.picker is None:
            resolved = Policy("uniform", resolved.k)  # reported as what it was
        cost = len(question_ids) - len(self.engine.prompt(question).question) if heard else 0
        return _Plan(question, frames, fuse, resolved, requested, time_range, packed_from, sampling, question_ids,
                     heard, cost)

    def ask(self, question: str, start: str | float | None = None, end: str | float | None = None,
            policy: str | Policy = "auto", sampling: SamplingConfig | None = None,
            cancel: threading.Event | None = None, question_times: bool = True,
            speech: SpeechContext | None = None) -> AnswerStream:
        """Plan now (bad ranges/policies raise here), compute when the stream is iterated. `question_times`:
        whether a time named in the question ("what happens at 1:05:00?") picks the range when none is given;
        `speech`: the video's transcript, whose lines of the range go into the prompt (None: none)."""
        return AnswerStream(self, self.plan(question, start, end, policy, sampling, question_times, speech), cancel)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this session is closed")

    # ---- computing ------------------------------------------------------------------------------------------
    def _prefix_sum(self, frames: Sequence[int]) -> torch.Tensor:
        """float32 sum over `frames` of P'_f, streamed chunk by chunk from tier B."""
        total = None
        for chunk, local in self.source.group(list(frames)):
            part = self.source.load(chunk, ["prefix_text"])["prefix_text"]
            s = part[local].to(self.device).float().sum(0)
            total = s if total is None else total + s
        return total

    def _build_prefix(self, frames: range) -> PrefixEntry:
        total = self._prefix_sum(frames)
        mean = (total / len(frames)).to(self.engine.model.dtype)
        tokens = self.compressed[frames.start : frames.stop : frames.step].flatten(0, 1)
        seq = torch.cat([mean, tokens])[None]
        cache = allocate_cache(self.engine.model, seq.shape[1] + PREFIX_CACHE_SLACK)
        prefill(self.engine.model, seq, cache)
        return PrefixEntry(frames, cache, cache.length, mean, total, len(frames))

    def prefix_entry(self, frames: range) -> tuple[PrefixEntry, bool]:
        """The prefix cache for this frame set (built if absent), and whether it was already there."""
        entry = self._prefixes.get(frames)
        if entry is not None:
            self._prefixes.move_to_end(frames)
            return entry, True
        entry = self._build_prefix(frames)
        self._remember(entry)
        return entry, False

    def _remember(self, entry: PrefixEntry) -> None:
        """Keep `entry` as the most recent; evict the least recently used beyond `max_prefix_caches`, never a busy
        one (a question in flight decodes in it; it is evicted at a later call once free)."""
        self._prefixes[entry.frames] = entry
        self._prefixes.move_to_end(entry.frames)
        for frames in [f for f, e in self._prefixes.items() if not e.busy and f != entry.frames]:
            if len(self._prefixes) <= self.max_prefix_caches:
                break
            del self._prefixes[frames]

    def _copy_prefix(self, entry: PrefixEntry, room: int) -> KVCache:
        """A fresh cache holding `entry`'s prefix (`entry.length` positions) with room for `room` more."""
        cache = allocate_cache(self.engine.model, entry.length + room)
        n = entry.length
        cache.keys[:, :, :, :n].copy_(entry.cache.keys[:, :, :, :n])
        cache.values[:, :, :, :n].copy_(entry.cache.values[:, :, :, :n])
        cache.length = n
        return cache

    def _claim(self, entry: PrefixEntry, room: int) -> tuple[KVCache, Callable[[], None]]:
        """A cache holding `entry`'s prefix with room for `room` more positions, for one question's exclusive
        use, and the call that gives it back. Under `lock`. The entry's own cache when it is free (busy until
        given back, then rolled back to the prefix); a copy of the prefix when another question is using it."""
        if not entry.busy:
            cache = entry.cache
            cache.length = entry.length
            cache.ensure_capacity(entry.length + room)
            entry.busy = True

            def give_back() -> None:
                cache.length = entry.length
                entry.busy = False

            return cache, give_back
        cache = self._copy_prefix(entry, room)
        size = cache.nbytes()
        with self._copy_lock:
            self._copy_bytes += size

        def drop() -> None:
            with self._copy_lock:
                self._copy_bytes -= size

        return cache, drop

    def fuse_question(self, question_ids: torch.Tensor, frames: list[int]) -> torch.Tensor:
        """Mean over `frames` of Q fused against each frame's pre-fusion states, streamed through tier C. A subset
        small enough for one pass but spread over several chunks (`uniform:K`, `retrieved:K`) is gathered once and
        kept in tier C for the next question over the same frames."""
        src = self.source
        qp = question_pass(self.engine.model, src.key_valid, src.next_position, question_ids)
        if len(frames) <= self.fuse_batch_frames and src.chunk_of(frames[0]) != src.chunk_of(frames[-1]):
            gathered = self.working_set.subset(tuple(frames))
            if gathered is None:
                gathered = GatheredStates.build(frames, *self._gather(frames), room=len(question_ids) + 8)
                self.working_set.keep_subset(gathered)
            total = fused_question_sum_gathered(self.engine.model, qp, gathered)
            return (total / len(frames)).to(qp.text.dtype)
        total = torch.zeros(qp.text.shape, dtype=torch.float32, device=self.device)
        for chunk, local in src.group(list(frames)):  # chunk by chunk: a whole chunk is read in place, not copied
            keys, values = self._chunk_states(chunk, local)
            for start in range(0, len(local), self.fuse_batch_frames):
                part = slice(start, start + self.fuse_batch_frames)
                total += fused_question_sum(self.engine.model, qp, [k[part] for k in keys], [v[part] for v in values])
        return (total / len(frames)).to(qp.text.dtype)

    def _chunk_states(self, chunk: int, local: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Chunk `chunk`'s pre-fusion keys/values of its frames `local`, through tier C (the resident tensors
        themselves when every frame of the chunk is wanted)."""
        keys, values = self.working_set.get(chunk)
        if len(local) != keys[0].shape[0]:
            idx = torch.tensor(local, device=keys[0].device)
            keys, values = [k.index_select(0, idx) for k in keys], [v.index_select(0, idx) for v in values]
        return keys, values

    def _gather(self, frames: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """These frames' pre-fusion keys/values, one (B, Hkv, S, D) tensor per layer, through tier C."""
        src = self.source
        parts = [self._chunk_states(chunk, local) for chunk, local in src.group(frames)]
        if len(parts) == 1:
            return parts[0]
        return ([torch.cat([p[0][i] for p in parts]) for i in range(src.num_layers)],
                [torch.cat([p[1][i] for p in parts]) for i in range(src.num_layers)])

    @torch.no_grad()
    def _start(self, plan: _Plan, cancel: threading.Event, info: dict) -> tuple[DecodeSequence, torch.Tensor]:
        """A question's fusion and LLM prefill (under `lock`): its decode sequence, over a cache of its own from
        the prefix on, and the first answer token's logits."""
        self._check_open()
        model = self.engine.model
        entry, hit = self.prefix_entry(plan.frames)
        info.update(hit=hit, exact=entry.exact, cosine=entry.prefix_cosine)
        fused_q = self.fuse_question(plan.question_ids, plan.fuse)
        limit = model.config.tokenizer_model_max_length
        capacity = plan.sampling.max_new_tokens + 1
        if limit and entry.length + fused_q.shape[0] > limit:  # the reference's cut: no prefix reuse
            frames = plan.frames
            embeds = self.engine._llm_inputs(entry.prefix_mean,
                                             self.compressed[frames.start : frames.stop : frames.step], fused_q)
            cache, give_back = allocate_cache(model, embeds.shape[1] + capacity), None
            first = prefill(model, embeds, cache)
        else:
            cache, give_back = self._claim(entry, fused_q.shape[0] + capacity)
            try:
                first = prefill(model, fused_q[None], cache)
            except BaseException:
                give_back()
                raise
        return DecodeSequence(cache, plan.sampling, cancel, on_end=give_back), first

    # ---- reference comparisons ------------------------------------------------------------------------------
    @torch.no_grad()
    def first_logits(self, question: str, start=None, end=None, policy: str | Policy = "all") -> torch.Tensor:
        """Logits of the first answer token (for tests and deviation measurements)."""
        plan = self.plan(question, start, end, policy, SamplingConfig(max_new_tokens=0))
        with self.lock:
            entry, _ = self.prefix_entry(plan.frames)
            fused_q = self.fuse_question(plan.question_ids, plan.fuse)
            cache, give_back = self._claim(entry, fused_q.shape[0])
            try:
                return prefill(self.engine.model, fused_q[None], cache)
            finally:
                give_back()

    @torch.no_grad()
    def fused_question(self, question: str, start=None, end=None, policy: str | Policy = "all") -> torch.Tensor:
        """Q' under a policy, to compare subsets against `all` (cosine)."""
        plan = self.plan(question, start, end, policy, SamplingConfig(max_new_tokens=0))
        with self.lock:
            return self.fuse_question(plan.question_ids, plan.fuse)

    # ---- live sources -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def append(self, states: FrameStates | ChunkedStates, timestamps: Sequence[float],
               compressed: torch.Tensor | None = None, chunk_frames: int = 32) -> None:
        """New frames of a growing source. Caches of existing frame sets stay valid (their frames did not change);
        questions about the whole video now mean the grown frame set. In "incremental" mode the whole-video prefix
        cache is carried over (stale mean P', new frame tokens prefilled after it)."""
        with self.lock:
            self._check_open()
            if isinstance(states, FrameStates):
                compressed = states.compressed
                states = ChunkedStates.from_states(states, chunk_frames)
            if compressed is None or compressed.shape[0] != states.num_frames or len(timestamps) != states.num_frames:
                raise ValueError("append needs one timestamp and one compressed token per new frame")
            ts = np.asarray(timestamps, dtype=np.float64)
            if states.num_frames == 0:
                return
            if ts[0] <= self.timestamps[-1] or np.any(np.diff(ts) <= 0):
                raise ValueError("appended frames must come after the existing ones, in time order")
            old = self.num_frames
            self.working_set.append_source(states)
            self.compressed = torch.cat([self.compressed, compressed.to(self.device)])
            self.timestamps = np.concatenate([self.timestamps, ts])
            whole = self._prefixes.pop(range(old), None)
            if self.live_mode == "incremental" and whole is not None:
                self._remember(self._extend(whole, range(old, self.num_frames)))

    def _extend(self, entry: PrefixEntry, new: range) -> PrefixEntry:
        """The stale whole-video prefix cache with `new` frames' tokens appended (nothing earlier recomputed). A
        question in flight in it keeps it: the new frames go into a copy of its prefix."""
        if entry.busy:
            cache = self._copy_prefix(entry, len(new) * self.compressed.shape[1] + PREFIX_CACHE_SLACK)
        else:
            cache = entry.cache
            cache.length = entry.length
        prefill(self.engine.model, self.compressed[new.start : new.stop].flatten(0, 1)[None], cache)
        frames = range(entry.frames.start, new.stop)
        total = entry.prefix_sum + self._prefix_sum(new)
        exact_mean = (total / len(frames)).to(entry.prefix_mean.dtype)
        cosine = float(torch.nn.functional.cosine_similarity(entry.prefix_mean.flatten().double(),
                                                             exact_mean.flatten().double(), dim=0))
        return PrefixEntry(frames, cache, cache.length, entry.prefix_mean, total, len(frames), exact=False,
                           prefix_cosine=cosine)

    def rebuild_exact(self) -> None:
        """Replace every approximate (incremental) prefix cache with an exact one."""
        with self.lock:
            for frames in [f for f, e in self._prefixes.items() if not e.exact]:
                self._prefixes[frames] = self._build_prefix(frames)
