"""Continuous batching: the decode steps of every answer in flight run together, in one engine-wide thread.

A question's fusion and LLM prefill run on the thread that asked it (under its session's lock, briefly), and
its first token is chosen there from the prefill's logits. From then on its `DecodeSequence` belongs to the
engine's `DecodeBatcher`, whose one thread repeats a step:

1. sequences waiting to join are admitted (up to `max_batch` in flight); those whose consumer cancelled or went
   away leave now, giving their cache back;
2. ONE forward for every remaining sequence's last token: embedding, norms, q/k/v and output projections, MLP
   and lm_head batched over the B rows, each row at its own length and positions. Attention: when the batch's
   keys/values fit in `pool_bytes`, over a `DecodePool` — the batch's caches copied side by side once, when the
   batch changes, then one masked attention call per layer for all rows (`generate.decode_step_pooled`); the
   positions decoded there go back into each answer's own cache when the batch changes again and it goes on.
   Otherwise per sequence over its own cache (`generate.decode_step`), with no copy. On a CPU a step of a small
   model is op-dispatch bound, and the pool replaces B calls per layer with one. With a single sequence the
   step is exactly the lone path (`generate.prefill` of one token), so an answer asked alone is computed as it
   always was;
3. each sequence chooses its next token from its row of logits with its own `DecodeState` — the same code
   `generate.decode` runs (greedy, temperature/top-p with its own seeded generator, its own grammar, stop ids,
   `max_new_tokens`, log-probs) — and hands the `TokenEvent` to its consumer's queue; finished ones leave. The
   tensor work of that choice (log-softmax, grammar masks, argmax, log-probs) runs once for the whole batch
   (`generate.choose_events`), the same operations row by row.

Sequences join and leave between steps. Batched matrix products may differ from batch-1 ones in the last bits
of a float (the kernels block differently), so a greedy answer equals its lone answer unless two candidates tie
to ~1e-6; tests/engine/test_batcher.py checks that they match.

Thread-safety. This thread is the only one running decode steps; prefills of new questions run on request
threads, one at a time with the steps (each holds `compute`: two forwards side by side would share the cores
and their OpenMP teams would wait on each other). Even side by side it would be safe: a forward pass reads the
model's parameters and writes only the cache it is given (no module keeps state between calls; the rotary
tables are computed per call), and a cache is used by one thread at a time — the asking thread until it hands
the sequence over, then this one until the answer ends (the pool is this thread's alone).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from vidmini.engine.generate import (
    DecodeState,
    SamplingConfig,
    TokenEvent,
    choose_events,
    decode_step,
    decode_step_pooled,
    prefill,
)
from vidmini.engine.llama import DecodePool, KVCache
from vidmini.engine.model import LlavaMiniModel

__all__ = ["DecodeBatcher", "DecodeSequence"]

DEFAULT_MAX_BATCH = 32
DEFAULT_MAX_PREFILL_STALL_S = 0.5  # decoding waits for questions being prefilled at most this long at a time
SMALL_LLM_BYTES = 256 << 20  # a CPU decode step over an LLM this small is op-dispatch bound: one intra-op thread
IDLE_EXIT_S = 2.0  # the decode thread ends after this long with nothing to do (a new answer starts it again)
DEFAULT_POOL_BYTES = 64 << 20  # a batch whose keys/values fit in this is stepped over a `DecodePool` copy
POOL_ROOM = 64  # positions a pool has beyond its longest row when gathered (it grows by doubling)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # batchers that may have a thread, closed at exit


@atexit.register
def _close_all() -> None:
    """Stop every decode thread before the interpreter finalizes: a daemon thread still inside torch then would
    abort the process ("terminate called without an active exception")."""
    for batcher in list(_LIVE):
        batcher.close()


def _after_fork_in_child() -> None:
    """A forked child has no decode thread: start afresh (answers in flight belong to the parent)."""
    for batcher in list(_LIVE):
        batcher._cond = threading.Condition()
        batcher._waiting, batcher._active, batcher._thread, batcher._allowed = deque(), [], None, None
        batcher._closing, batcher._prefilling, batcher._stall_since = False, 0, None
        batcher._pool, batcher._pooled = None, []
        batcher.compute = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def default_step_threads(model: LlavaMiniModel) -> int | None:
    """Intra-op threads for the decode thread's steps: None (torch's default) on an accelerator or for an LLM
    of SMALL_LLM_BYTES or more; 1 for a small LLM on the CPU. There a step is a few hundred tiny ops, and an
    OpenMP team only adds a barrier to each: on the 2-core machine a step of the demo model at batch 8 took
    4.3-5.5 ms with one thread, 89-114 ms with two while another process used a core (`bench/RESULTS.md`)."""
    if model.device.type != "cpu":
        return None
    parts = (model.model.layers, model.lm_head)
    size = sum(p.numel() * p.element_size() for part in parts for p in part.parameters())
    return 1 if size < SMALL_LLM_BYTES else None


class _Ended:
    def __init__(self, error: BaseException | None) -> None:
        self.error = error


class DecodeSequence:
    """One answer being decoded: a cache of its own from its prefix on (`cache.length` filled), its sampling
    state, and the queue its consumer reads `TokenEvent`s from. `on_end` runs once when the answer ends (it gives
    the cache back, e.g. rolls a shared prefix cache back), before the consumer hears of the end."""

    def __init__(self, cache: KVCache, sampling: SamplingConfig, cancel: threading.Event | None = None,
                 on_end: Callable[[], None] | None = None) -> None:
        self.cache = cache
        self.state = DecodeState(sampling, cancel)
        self.token: int | None = None  # the last chosen token: the next step's input
        self.abandoned = False  # the consumer went away without cancelling
        self._on_end = on_end
        self._queue: deque = deque()
        self._ready = threading.Condition(threading.RLock())
        self._ended = False

    @property
    def stopped(self) -> bool:
        """Cancelled, or nobody reads it any more: leave at the next step."""
        return self.abandoned or self.state.cancelled

    @property
    def ended(self) -> bool:
        return self._ended

    def advance(self, logits: torch.Tensor) -> bool:
        """Choose the next token from (V,) `logits` alone and hand it to the consumer; True when a step must
        follow."""
        try:
            event = self.state.next_event(logits)
        except Exception as e:  # noqa: BLE001 - e.g. a grammar refusing a token: this answer fails, not the batch
            event = e
        return self.deliver(event)

    def deliver(self, event: TokenEvent | BaseException | None) -> bool:
        """Hand the chosen token to the consumer (None: the answer ended before one; an error: it failed); True
        when a step must follow."""
        if isinstance(event, BaseException):
            self.end(event)
            return False
        if event is None:
            self.end()
            return False
        self._put(event)
        if self.state.finished:
            self.end()
            return False
        self.token = event.token_id
        return True

    def end(self, error: BaseException | None = None) -> None:
        """Give the cache back (once) and tell the consumer the answer is over (failed with `error` if given)."""
        with self._ready:
            if self._ended:
                return
            self._ended = True
        self.state.finished = True
        try:
            if self._on_end is not None:
                self._on_end()
        except Exception as e:  # noqa: BLE001 - reported to the consumer
            error = error or e
        self._put(_Ended(error))

    def _put(self, item: object) -> None:
        with self._ready:
            self._queue.append(item)
            self._ready.notify()

    def events(self) -> Iterator[TokenEvent]:
        """The answer's tokens as they are chosen (blocking until each comes); raises what made the answer fail."""
        while True:
            with self._ready:
                while not self._queue:
                    self._ready.wait()
                item = self._queue.popleft()
            if isinstance(item, _Ended):
                if item.error is not None:
                    raise item.error
                return
            yield item


class DecodeBatcher:
    """The engine's one decode thread (started on demand, ended when idle). `start(seq, first_logits)` chooses a
    prefilled sequence's first token on the caller's thread and, when the answer goes on, hands it over.

    Counters for benchmarks and tests: `steps` (forward steps run), `tokens` (positions run, summed over the
    batch), `batched_steps` (steps with more than one sequence), `max_batch_seen`, `batch_sizes` (a Counter of
    batch size → steps), `step_s` (seconds spent in steps), `choose_s` (of which choosing the tokens and handing
    them over, after the forwards); `reset_stats()` zeroes them. `in_flight` is the number of sequences active or
    waiting to join.

    Prefills first. While a question is being fused and prefilled (`prefilling()`, entered before it waits for
    the session lock), decoding waits, at most `max_prefill_stall_s` at a time: the questions asked together
    then join one batch instead of each decoding alone while the next one prefills beside it, and a prefill has
    the cores to itself. That is vLLM's default order; the bound keeps a steady stream of new questions from
    starving the answers already decoding (after it, one step runs and a new wait may begin).

    `hold()` stops stepping at the next step boundary (sequences still join, as waiting), `allow(n)` lets n more
    steps run, `release()` lets it run freely again: to line up a batch exactly (tests, benchmarks). `close()`
    fails the answers in flight and stops the thread (at exit; a later answer starts it again)."""

    def __init__(self, model: LlavaMiniModel, max_batch: int = DEFAULT_MAX_BATCH, idle_s: float = IDLE_EXIT_S,
                 max_prefill_stall_s: float = DEFAULT_MAX_PREFILL_STALL_S, step_threads: int | None = None,
                 pool_bytes: int = DEFAULT_POOL_BYTES) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if pool_bytes < 0:
            raise ValueError("pool_bytes must be >= 0")
        self.pool_bytes = pool_bytes
        self._pool: DecodePool | None = None
        self._pooled: list[DecodeSequence] = []  # the pool's rows, in order
        if step_threads is not None and step_threads < 1:
            raise ValueError("step_threads must be >= 1")
        self.step_threads = step_threads if step_threads is not None else default_step_threads(model)
        if max_prefill_stall_s < 0:
            raise ValueError("max_prefill_stall_s must be >= 0")
        self.model, self.max_batch, self.idle_s = model, max_batch, idle_s
        self.max_prefill_stall_s = max_prefill_stall_s
        self._prefilling = 0  # questions between `prefilling()` entry and exit
        self._stall_since: float | None = None  # when decoding began to wait for them
        self._cond = threading.Condition()
        self._waiting: deque[DecodeSequence] = deque()
        self._active: list[DecodeSequence] = []
        self._thread: threading.Thread | None = None
        self._allowed: int | None = None  # steps it may still run while held; None: not held
        self._closing = False
        # Held around every forward pass on the model: a decode step here, a question's fusion and prefill on its
        # thread (`AnswerStream`). One runs at a time, each with all the intra-op threads: two running together
        # would each get half the cores and their thread teams would spin against each other.
        self.compute = threading.Lock()
        self.reset_stats()
        _LIVE.add(self)

    def reset_stats(self) -> None:
        self.steps = self.tokens = self.batched_steps = self.max_batch_seen = 0
        self.batch_sizes: Counter[int] = Counter()
        self.step_s = self.stall_s = self.choose_s = 0.0

    @contextmanager
    def prefilling(self) -> Iterator[None]:
        """Around a question's wait for its session lock, fusion and prefill: decoding gives way meanwhile."""
        with self._cond:
            self._prefilling += 1
        try:
            yield
        finally:
            with self._cond:
                self._prefilling -= 1
                self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        """Answers decoding or waiting to join, not yet ended."""
        with self._cond:
            return sum(not s.ended for s in self._active) + sum(not s.ended for s in self._waiting)

    @property
    def running(self) -> bool:
        """Whether the decode thread is alive now."""
        with self._cond:
            return self._thread is not None

    def start(self, seq: DecodeSequence, first_logits: torch.Tensor) -> None:
        """The sequence's first token from its prefill's logits, chosen here; the rest of its steps are batched.
        Its consumer hears of the first token only once the sequence is queued for the next step."""
        with seq._ready:
            if seq.advance(first_logits):
                self.submit(seq)

    def hold(self) -> None:
        """No step starts until `allow` or `release`."""
        with self._cond:
            self._allowed = 0

    def allow(self, steps: int, timeout: float = 60.0) -> None:
        """While held: let `steps` more steps run and wait until they have (or nothing is left to step)."""
        with self._cond:
            if self._allowed is None:
                raise RuntimeError("the batcher is not held")
            self._allowed += steps
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: self._allowed == 0 or not (self._active or self._waiting), timeout):
                raise TimeoutError(f"{steps} decode steps did not run within {timeout:.0f} s")

    def release(self) -> None:
        """Step freely again."""
        with self._cond:
            self._allowed = None
            self._cond.notify_all()

    def close(self, timeout: float = 30.0) -> None:
        """Fail every answer in flight and stop the decode thread (after the step it is in)."""
        with self._cond:
            thread, self._closing = self._thread, True
            stranded = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        for seq in stranded:
            seq.end(RuntimeError("the decoder was closed"))
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._cond:
            self._closing = False

    def submit(self, seq: DecodeSequence) -> None:
        """Queue a sequence whose `token` still has to be run; it joins at the next step."""
        with self._cond:
            closing = self._closing
            if not closing:
                self._waiting.append(seq)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="vidmini-decode", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
        if closing:
            seq.end(RuntimeError("the decoder was closed"))

    # ---- the decode thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        if self.step_threads:
            torch.set_num_threads(self.step_threads)  # the calling thread's own OpenMP team; others keep theirs
        try:
            with torch.no_grad():  # grad mode is per thread
                while True:
                    leaving = self._admit()
                    if leaving is None:
                        self._drop_pool()  # every answer has ended: only the memory goes
                        return
                    self._step(leaving)
        except BaseException as e:  # a bug here must not leave consumers waiting forever
            with self._cond:
                stranded = self._active + list(self._waiting)
                self._active, self._thread = [], None
                self._waiting.clear()
            for seq in stranded:
                seq.end(e)
            raise

    def _admit(self) -> list[DecodeSequence] | None:
        """Before a step: cancelled or abandoned sequences leave (returned, to be ended), freeing their slots, and
        waiting ones join. None (and the thread ends) after `idle_s` with nothing to do."""
        with self._cond:
            while True:
                if self._closing:
                    stranded, self._active, self._thread = self._active, [], None
                    self._cond.notify_all()
                    break
                leaving: list[DecodeSequence] = []
                if self._allowed != 0:
                    leaving = [s for s in self._active if s.stopped]
                    self._active = [s for s in self._active if not s.stopped]
                while self._waiting and len(self._active) < self.max_batch:
                    self._active.append(self._waiting.popleft())
                if leaving or (self._active and self._allowed != 0):
                    if not leaving and self._stall_for_prefill():
                        continue
                    self._stall_since = None
                    return leaving
                if not self._cond.wait(self.idle_s) and not self._active and not self._waiting:
                    self._thread = None
                    self._cond.notify_all()
                    return None
        for seq in stranded:
            seq.end(RuntimeError("the decoder was closed"))
        return None

    def _stall_for_prefill(self) -> bool:
        """Under `_cond`: wait (a while) for the questions being prefilled; False when the step should run now."""
        if not self._prefilling or self.max_prefill_stall_s == 0 or self._allowed is not None:
            return False
        now = time.perf_counter()
        if self._stall_since is None:
            self._stall_since = now
        left = self._stall_since + self.max_prefill_stall_s - now
        if left <= 0:
            return False
        self._cond.wait(left)
        self.stall_s += time.perf_counter() - now
        return True

    def _step(self, leaving: list[DecodeSequence]) -> None:
        for seq in leaving:
            seq.end()  # gives its cache back; the consumer hears the answer is over
        batch = [seq for seq in self._active if not seq.stopped]  # one that stopped since joins the leavers
        for seq in self._active:
            if seq.stopped:
                seq.end()
        if not batch:
            self._done_step([])
            return
        t0 = time.perf_counter()
        model = self.model
        try:
            with self.compute:
                if len(batch) == 1:  # exactly the lone path
                    self._drop_pool()
                    seq = batch[0]
                    ids = torch.tensor([[seq.token]], device=model.device)
                    rows = [prefill(model, model.embed(ids), seq.cache)]
                else:
                    rows = self._batched_forward(batch)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: these answers fail, the thread goes on
            for seq in batch:
                seq.end(e)
            self._done_step([])
            return
        self.steps += 1
        self.tokens += len(batch)
        self.batch_sizes[len(batch)] += 1
        self.batched_steps += len(batch) > 1
        self.max_batch_seen = max(self.max_batch_seen, len(batch))
        t1 = time.perf_counter()
        if len(batch) == 1:
            going_on = batch if batch[0].advance(rows[0]) else []
        else:  # the tensor work of choosing done once for the batch, not once per answer
            events = choose_events([seq.state for seq in batch], rows)
            going_on = [seq for seq, event in zip(batch, events, strict=True) if seq.deliver(event)]
        t2 = time.perf_counter()
        self.step_s += t2 - t0
        self.choose_s += t2 - t1
        self._done_step(going_on, counted=True)

    def _batched_forward(self, batch: list[DecodeSequence]) -> torch.Tensor:
        """(B, V) logits of one step for `batch`: over a `DecodePool` of its caches when they fit in `pool_bytes`
        (gathered when the batch changes, kept while it stays the same), else over the caches themselves."""
        tokens = [s.token for s in batch]
        same = len(batch) == len(self._pooled) and all(a is b for a, b in zip(batch, self._pooled, strict=True))
        if not same:
            self._drop_pool()
            caches = [s.cache for s in batch]
            if self.pool_bytes and DecodePool.nbytes_for(caches, POOL_ROOM) <= self.pool_bytes:
                self._pool, self._pooled = DecodePool.gather(caches, POOL_ROOM), list(batch)
        if self._pool is None:
            return decode_step(self.model, tokens, [s.cache for s in batch])
        return decode_step_pooled(self.model, tokens, self._pool)

    def _drop_pool(self) -> None:
        """Give the pooled answers that go on their positions back (into their own caches) and drop the pool.
        An answer that ended has given its cache back already: nothing is written to it."""
        if self._pool is not None:
            self._pool.write_back([b for b, seq in enumerate(self._pooled) if not seq.ended])
        self._pool, self._pooled = None, []

    def _done_step(self, going_on: list[DecodeSequence], counted: bool = False) -> None:
        with self._cond:
            self._active = going_on
            if counted and self._allowed:
                self._allowed -= 1
            self._cond.notify_all()
