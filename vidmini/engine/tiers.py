"""Memory tiers for a video's per-frame state (docs/architecture.md, "The caching split").

Tier B (`ChunkedStates`): everything per frame that is too big to keep on the device — the pre-fusion keys and
values and the fused prompt prefix P'_f — readable chunk by chunk from wherever it lives (a store's
memory-mapped safetensors chunks, or tensors in memory).
Tier C (`PrefusionWorkingSet`): the pre-fusion keys/values of recently used chunks on the device, under a byte
budget, evicted least-recently-used a whole chunk at a time (a chunk is the unit the store reads).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from vidmini.engine.fusion import FrameStates

ChunkLoader = Callable[[int, list[str]], dict[str, torch.Tensor]]


@dataclass
class ChunkedStates:
    """Tier B: per-frame tensors split into chunks; `load(i, names)` reads chunk i's tensors by name
    ("prefix_text", "keys.{layer}", "values.{layer}").

    starts: the first frame of each chunk, then the total frame count (len = chunks + 1).
    frame_bytes: bytes of one frame's pre-fusion keys+values (for budgets).
    """

    starts: list[int]
    loader: ChunkLoader
    num_layers: int
    key_valid: torch.Tensor
    prefix_ids: torch.Tensor
    next_position: int
    frame_bytes: int

    @property
    def num_frames(self) -> int:
        return self.starts[-1]

    @property
    def num_chunks(self) -> int:
        return len(self.starts) - 1

    def chunk_of(self, frame: int) -> int:
        return bisect.bisect_right(self.starts, frame) - 1

    def load(self, chunk: int, names: list[str]) -> dict[str, torch.Tensor]:
        return self.loader(chunk, names)

    def kv_names(self) -> list[str]:
        return [f"keys.{i}" for i in range(self.num_layers)] + [f"values.{i}" for i in range(self.num_layers)]

    def group(self, frames: list[int]) -> Iterator[tuple[int, list[int]]]:
        """(chunk, local indices) for sorted frame indices, chunk by chunk."""
        i = 0
        while i < len(frames):
            c = self.chunk_of(frames[i])
            end = self.starts[c + 1]
            j = bisect.bisect_left(frames, end, lo=i)
            yield c, [f - self.starts[c] for f in frames[i:j]]
            i = j

    def extend(self, other: ChunkedStates) -> ChunkedStates:
        """This source followed by `other` (a live source that grew): chunks of both, renumbered."""
        n, k = self.num_frames, self.num_chunks
        first, second = self.loader, other.loader

        def load(chunk: int, names: list[str]) -> dict[str, torch.Tensor]:
            return first(chunk, names) if chunk < k else second(chunk - k, names)

        return ChunkedStates(self.starts[:-1] + [n + s for s in other.starts], load, self.num_layers,
                             self.key_valid, self.prefix_ids, self.next_position, self.frame_bytes)

    @staticmethod
    def from_states(states: FrameStates, chunk_frames: int = 32) -> ChunkedStates:
        """States already in memory (tests, a live source's new frames), viewed as chunks without copying."""
        n = states.num_frames
        starts = list(range(0, n, chunk_frames)) + [n]
        named = {"prefix_text": states.prefix_text}
        for i, (k, v) in enumerate(zip(states.keys, states.values, strict=True)):
            named[f"keys.{i}"], named[f"values.{i}"] = k, v

        def load(chunk: int, names: list[str]) -> dict[str, torch.Tensor]:
            lo, hi = starts[chunk], starts[chunk + 1]
            return {name: named[name][lo:hi] for name in names}

        per_frame = sum(t[0].numel() * t.element_size() for t in [*states.keys, *states.values]) if n else 0
        return ChunkedStates(starts, load, len(states.keys), states.key_valid, states.prefix_ids,
                             states.next_position, per_frame)


@dataclass
class WorkingSetStats:
    hits: int = 0
    loads: int = 0
    evictions: int = 0
    loaded_bytes: int = 0


@dataclass
class PrefusionWorkingSet:
    """Tier C: chunks of pre-fusion keys/values on `device`, at most `budget_bytes` of them (a single chunk
    larger than the budget is still loaded for its use, then dropped), least recently used evicted first.
    Gathered frame subsets (`engine.fusion.GatheredStates`, kept for `uniform:K`/`retrieved:K`) count against the
    same budget and are evicted before chunks: they are copies that can be gathered again."""

    source: ChunkedStates
    budget_bytes: int
    device: torch.device | str = "cpu"
    stats: WorkingSetStats = field(default_factory=WorkingSetStats)
    _chunks: OrderedDict[int, tuple[list[torch.Tensor], list[torch.Tensor], int]] = field(
        default_factory=OrderedDict, repr=False)
    _subsets: OrderedDict[tuple[int, ...], object] = field(default_factory=OrderedDict, repr=False)

    @property
    def resident_bytes(self) -> int:
        return sum(n for _, _, n in self._chunks.values()) + sum(g.nbytes() for g in self._subsets.values())

    def _make_room(self, nbytes: int) -> None:
        while self._subsets and self.resident_bytes + nbytes > self.budget_bytes:
            self._subsets.popitem(last=False)
            self.stats.evictions += 1
        while self._chunks and self.resident_bytes + nbytes > self.budget_bytes:
            self._chunks.popitem(last=False)
            self.stats.evictions += 1

    def subset(self, frames: tuple[int, ...]):
        """The kept gathered states of exactly these frames, or None."""
        got = self._subsets.get(frames)
        if got is not None:
            self._subsets.move_to_end(frames)
            self.stats.hits += 1
        return got

    def keep_subset(self, gathered) -> None:
        """Keep a `GatheredStates` for the next question over the same frames, if it fits the budget."""
        nbytes = gathered.nbytes()
        if nbytes > self.budget_bytes:
            return
        self._make_room(nbytes)
        self._subsets[gathered.frames] = gathered

    @property
    def resident_chunks(self) -> list[int]:
        """Resident chunk indices, least recently used first."""
        return list(self._chunks)

    def fits(self, num_frames: int) -> bool:
        """Whether `num_frames` frames' states fit the budget at once (the `auto` policy's test)."""
        return num_frames * self.source.frame_bytes <= self.budget_bytes

    def get(self, chunk: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Chunk `chunk`'s keys and values (one tensor per pre-fusion layer) on the device."""
        if chunk in self._chunks:
            self._chunks.move_to_end(chunk)
            self.stats.hits += 1
            keys, values, _ = self._chunks[chunk]
            return keys, values
        names = self.source.kv_names()
        loaded = self.source.load(chunk, names)
        layers = self.source.num_layers
        keys = [loaded[f"keys.{i}"].to(self.device, non_blocking=True) for i in range(layers)]
        values = [loaded[f"values.{i}"].to(self.device, non_blocking=True) for i in range(layers)]
        nbytes = sum(t.numel() * t.element_size() for t in keys + values)
        self.stats.loads += 1
        self.stats.loaded_bytes += nbytes
        self._make_room(nbytes)
        if nbytes <= self.budget_bytes:
            self._chunks[chunk] = (keys, values, nbytes)
        return keys, values

    def clear(self) -> None:
        self._chunks.clear()
        self._subsets.clear()

    def append_source(self, extra: ChunkedStates) -> None:
        """A live source grew: its new chunks come after the existing ones (resident chunks keep their index)."""
        self.source = self.source.extend(extra)
