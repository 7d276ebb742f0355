"""A stored video as a session's tier B: chunks read on demand from the store's safetensors files (safetensors
memory-maps the file; only the requested slices are copied out), compressed tokens loaded once for tier A."""

from __future__ import annotations

import torch

from vidmini.engine.inference import Engine
from vidmini.engine.session import VideoSession
from vidmini.engine.tiers import ChunkedStates
from vidmini.store.video_store import VideoStore


def store_states(store: VideoStore) -> ChunkedStates:
    """The store's per-frame pre-fusion states, chunk by chunk, as the store wrote them."""
    m = store.manifest
    chunks, meta, schema = m["chunks"], m["meta"], m.get("schema") or {}
    if not chunks:
        raise ValueError(f"store {store.video_id} has no frames")
    starts = [c["start_frame"] for c in chunks] + [m["frames"]]
    layers = sum(1 for k in schema if k.startswith("keys."))

    def load(chunk: int, names: list[str]) -> dict[str, torch.Tensor]:
        _, tensors = next(store.iter_chunks(names, slice(starts[chunk], starts[chunk + 1])))
        return tensors

    first = load(0, [f"keys.{i}" for i in range(layers)] + [f"values.{i}" for i in range(layers)])
    frame_bytes = sum(t[0].numel() * t.element_size() for t in first.values())
    return ChunkedStates(starts, load, layers, torch.tensor(meta["key_valid"], dtype=torch.bool),
                         torch.tensor(meta["prefix_ids"], dtype=torch.long), int(meta["next_position"]), frame_bytes)


def open_store_session(engine: Engine, store: VideoStore, **options) -> VideoSession:
    """Tier A from the store's compressed tokens; tier B/C from its chunks (see `VideoSession` for options)."""
    compressed = store.load(["compressed"])["compressed"]
    return VideoSession(engine, store_states(store), compressed, store.timestamps().tolist(), **options)
