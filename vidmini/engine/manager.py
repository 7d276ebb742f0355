"""Many users, one model: sessions share the engine and one lock. A question holds the lock for its fusion and LLM
prefill only; its decode steps run in the engine's `DecodeBatcher`, batched with every other answer in flight
(continuous batching), each over a KV cache of its own, so each gives what it would give alone. Sessions are
evicted least-recently-used when their device bytes exceed the budget, and reopened from their opener (the store)
on the next question.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from vidmini.engine.inference import Engine
from vidmini.engine.session import AnswerStream, SessionAnswer, VideoSession

# opener(**options) → a new session; the manager passes its lock and the session options
Opener = Callable[..., VideoSession]


@dataclass
class ManagerStats:
    opens: int = 0
    evictions: int = 0
    reloads: int = 0


@dataclass
class SessionManager:
    """Sessions by key over one engine. `device_budget_bytes` bounds the sessions' device bytes (tier A + tier C;
    the model's weights are not counted); the session in use is never evicted, even alone over budget."""

    engine: Engine
    device_budget_bytes: int
    session_options: dict = field(default_factory=dict)
    stats: ManagerStats = field(default_factory=ManagerStats)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self._openers: dict[str, Opener] = {}
        self._live: OrderedDict[str, VideoSession] = OrderedDict()
        self._seen: set[str] = set()  # keys opened before: opening again is a reload
        self._index = threading.Lock()  # guards the maps (not the model)

    def open(self, key: str, opener: Opener) -> VideoSession:
        """Register `key` and open its session now."""
        with self._index:
            self._openers[key] = opener
        return self.session(key)

    def session(self, key: str) -> VideoSession:
        """The live session for `key`, reopened when it was evicted; marks it most recently used."""
        with self._index:
            if key not in self._openers:
                raise KeyError(f"no session {key!r}")
            live = self._live.get(key)
            if live is not None:
                self._live.move_to_end(key)
                return live
        with self.lock:  # building tier A runs the model
            with self._index:
                if key in self._live:
                    return self._live[key]
                opener = self._openers[key]
                reload = key in self._seen
            sess = opener(lock=self.lock, **self.session_options)
            if sess.engine is not self.engine:
                raise ValueError("a managed session must use the manager's engine")
            with self._index:
                self._live[key] = sess
                self._seen.add(key)
                self.stats.opens += 1
                self.stats.reloads += reload
        self.enforce_budget(keep=key)
        return sess

    def ask(self, key: str, question: str, **kwargs) -> AnswerStream:
        """A question on session `key` (see `VideoSession.ask`); the budget is enforced when it ends."""
        stream = self.session(key).ask(question, **kwargs)
        stream.on_done.append(lambda: self.enforce_budget(keep=key))
        return stream

    def answer(self, key: str, question: str, **kwargs) -> SessionAnswer:
        return self.ask(key, question, **kwargs).result()

    def device_bytes(self) -> int:
        with self._index:
            return sum(s.device_bytes() for s in self._live.values())

    @property
    def live_keys(self) -> list[str]:
        """Open sessions, least recently used first."""
        with self._index:
            return list(self._live)

    def enforce_budget(self, keep: str | None = None) -> list[str]:
        """Close least-recently-used sessions (not `keep`) until within budget; returns the keys evicted."""
        evicted = []
        with self.lock:  # never during a prefill; an answer decoding keeps its own cache alive
            while self.device_bytes() > self.device_budget_bytes:
                with self._index:
                    victims = [k for k in self._live if k != keep]
                    if not victims:
                        break
                    sess = self._live.pop(victims[0])
                sess.close()
                evicted.append(victims[0])
                self.stats.evictions += 1
        return evicted

    def close(self, key: str) -> None:
        """Forget `key` and release its memory."""
        with self.lock:
            with self._index:
                self._openers.pop(key, None)
                sess = self._live.pop(key, None)
            if sess is not None:
                sess.close()

    def close_all(self) -> None:
        for key in list(self._openers):
            self.close(key)
