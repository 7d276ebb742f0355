"""The ingest job: sample frames, encode them with the engine, write them to the store — resumably.

Decoding runs in a thread feeding a bounded queue, so decode and compute overlap and memory stays bounded.
Frames are grouped into fixed-size chunks; a chunk is committed atomically by the store, and a resumed job
skips exactly the committed frames, so a killed ingest ends with the same store as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from vidmini.engine.fusion import FrameStates
from vidmini.engine.inference import Engine
from vidmini.ingest.options import IngestOptions
from vidmini.ingest.thumbnails import thumbnail_jpeg

if TYPE_CHECKING:
    from vidmini.ingest.prefetch import PrefetchedFrames
    from vidmini.store.video_store import VideoStore



@dataclass
class Progress:
    frames_done: int
    total: int | None
    rate_fps: float
    eta_s: float | None


@dataclass
class IngestResult:
    video_id: str
    source: str
    frames: int
    duration_s: float | None
    gaps: list[tuple[float, float]]
    store_path: str
    seconds: float
    reused: bool = False
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class PreparedChunk:
    """A chunk ready for the engine: sampling times, real pts, model-input pixels, JPEG thumbnails."""

    timestamps: list[float]
    pts: list[float]
    pixels: torch.Tensor
    thumbnails: list[bytes]


def model_fingerprint(engine: Engine) -> tuple[str, str]:
    """(model id, config hash): the hash covers the config, the prompt prefix the states were built for and,
    when known, the weights (a retrained model with the same config must not read the old model's states)."""
    cfg = json.dumps(engine.model.config.to_dict(), sort_keys=True, default=str)
    prefix = ",".join(map(str, engine.prefix_ids.tolist()))
    key = f"{cfg}|{engine.prompt_style}|{prefix}|{engine.model.dtype}"
    digest = hashlib.sha256((key + f"|weights {engine.weights}" if engine.weights else key).encode()).hexdigest()
    return engine.name, digest[:16]


def states_to_tensors(states: FrameStates) -> dict[str, torch.Tensor]:
    out = {"compressed": states.compressed, "prefix_text": states.prefix_text}
    for i, (k, v) in enumerate(zip(states.keys, states.values, strict=True)):
        out[f"keys.{i}"] = k
        out[f"values.{i}"] = v
    return {name: t.detach().contiguous().cpu() for name, t in out.items()}


def tensors_to_states(tensors: dict[str, torch.Tensor], meta: dict) -> FrameStates:
    layers = sum(1 for k in tensors if k.startswith("keys."))
    return FrameStates(
        compressed=tensors["compressed"],
        prefix_text=tensors["prefix_text"],
        keys=[tensors[f"keys.{i}"] for i in range(layers)],
        values=[tensors[f"values.{i}"] for i in range(layers)],
        key_valid=torch.tensor(meta["key_valid"], dtype=torch.bool),
        prefix_ids=torch.tensor(meta["prefix_ids"], dtype=torch.long),
        next_position=int(meta["next_position"]),
    )


def _chunks(frames: Iterator, size: int) -> Iterator[list]:
    batch: list = []
    for f in frames:
        batch.append(f)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class _Producer(threading.Thread):
    """Decodes in the background into a bounded queue; errors are handed over, not lost."""

    _END = object()

    def __init__(self, frames: Iterator, chunk: int, depth: int, prepare: Callable[[list], object]) -> None:
        super().__init__(daemon=True)
        self.frames, self.chunk, self.prepare = frames, chunk, prepare
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            for batch in _chunks(self.frames, self.chunk):
                batch = self.prepare(batch)  # in this thread: full-size frames never wait in the queue
                while not self.stop.is_set():
                    try:
                        self.q.put(batch, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            self.error = e
        finally:
            self.q.put(self._END)

    def __iter__(self) -> Iterator[list]:
        while True:
            item = self.q.get()
            if item is self._END:
                if self.error is not None:
                    raise self.error
                return
            yield item


def run_ingest(
    source: str,
    engine: Engine,
    data_root: Path,
    options: IngestOptions | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    cancel: threading.Event | None = None,
    on_chunk: Callable[[VideoStore, int, torch.Tensor | None], None] | None = None,
    prefetched: PrefetchedFrames | None = None,
    finished: Callable[[], bool] | None = None,
) -> IngestResult:
    """Ingest one file or stream; reuses a complete store, resumes an incomplete one.

    `on_chunk(store, first_frame, embeddings)` runs after each chunk is committed (the moment-search index
    adds a live source's frames as they arrive). `prefetched`: the same source's frames, already being decoded
    under the same options (started before the model loaded); the caller closes it. `finished`: for a live file,
    says when its writer is done with it (the ingest then ends without waiting out `idle_timeout`)."""
    from vidmini.ingest.live import FollowFile, is_stream_url
    from vidmini.ingest.probe import probe
    from vidmini.ingest.sampler import FrameSampler
    from vidmini.store.video_store import StoreKey, VideoStore, fingerprint, fingerprint_url

    options = options or IngestOptions()
    t0 = time.perf_counter()
    url = is_stream_url(source)
    is_live = options.live or url
    # a stream can be opened once: it is probed by the sampler's own connection, not separately; nor is a file
    # still being written (its first bytes may not be there yet, and it has no duration)
    info = None if is_live else probe(source, stream=options.stream)
    video_fp = fingerprint_url(source, time.strftime("%Y%m%dT%H%M%S")) if is_live else fingerprint(source)
    model_id, config_hash = model_fingerprint(engine)
    key = StoreKey(video_fp, model_id, config_hash, options.sampling_key())
    prefix = engine.prefix_ids
    probe_meta = asdict(info) if info is not None else {"source": str(source), "is_live": True}
    meta = {
        "source": str(source),
        "probe": probe_meta,
        # only what defines the frames: a resume with another chunk size or queue depth is still the same video
        "sampling": {"fps": options.fps, "every_k": options.every_k, "mode": options.mode, "stream": options.stream},
        "model": {"id": model_id, "config_hash": config_hash, "dtype": str(engine.model.dtype),
                  "prompt_style": engine.prompt_style},
        "prefix_ids": prefix.tolist(),
    }
    store = VideoStore.open(Path(data_root), key, meta)
    if store.complete:
        return IngestResult(store.video_id, str(source), store.committed_frames, store.manifest.get("duration"),
                            [tuple(g) for g in store.manifest.get("gaps", [])], str(store.path),
                            time.perf_counter() - t0, reused=True)
    done = resumed_from = store.committed_frames
    duration = info.duration_s if info is not None and not is_live else None
    total = None
    if duration and not options.every_k and not is_live:
        total = int(np.ceil(duration * options.fps - 1e-9))

    if prefetched is not None and prefetched.side in (None, engine.frame_side):
        sampler = prefetched
    else:
        reader = FollowFile(source, options.idle_timeout, finished=finished) if options.live and not url else source
        sampler = FrameSampler(reader, fps=None if options.every_k else options.fps, every_k=options.every_k,
                               mode=options.mode, stream=options.stream, backend=options.backend,
                               hwaccel=options.hwaccel)
    frames = (f for i, f in enumerate(sampler) if i >= resumed_from)  # resume: skip committed frames exactly
    def prepare(batch: list) -> PreparedChunk:
        return PreparedChunk([f.t for f in batch], [f.pts for f in batch],
                             engine.frame_pixels([f.image for f in batch]),
                             [f.thumbnail or thumbnail_jpeg(f.image) for f in batch])

    producer = _Producer(frames, options.chunk_frames, options.queue_chunks, prepare)
    producer.start()
    started = time.perf_counter()
    try:
        for batch in producer:
            if cancel is not None and cancel.is_set():
                break
            states, embeddings = engine.encode_frames_and_embeddings(batch.pixels, out_device="cpu")
            if "key_valid" not in store.manifest.get("meta", {}):
                store.update_meta({"key_valid": states.key_valid.tolist(), "next_position": states.next_position})
            store.append_chunk(timestamps=batch.timestamps, pts=batch.pts, tensors=states_to_tensors(states),
                               thumbnails=batch.thumbnails, embeddings=embeddings, start_frame=done)
            if on_chunk is not None:
                on_chunk(store, done, embeddings)
            done += len(batch.timestamps)
            if on_progress is not None:
                rate = (done - resumed_from) / max(time.perf_counter() - started, 1e-9)
                eta = (total - done) / rate if total and rate > 0 else None
                on_progress(Progress(done, total, rate, eta))
    finally:
        producer.stop.set()
    if cancel is not None and cancel.is_set():
        return IngestResult(store.video_id, str(source), done, duration, [], str(store.path),
                            time.perf_counter() - t0, resumed_from=resumed_from)
    gaps = [tuple(g) for g in getattr(sampler, "gaps", [])]
    if done == 0:
        store.mark_failed("no frames could be decoded")
        from vidmini.ingest.errors import CorruptMedia

        raise CorruptMedia(f"{source}: no frames could be decoded")
    store.mark_complete(gaps=gaps, duration=duration)
    return IngestResult(store.video_id, str(source), done, duration, gaps, str(store.path),
                        time.perf_counter() - t0, resumed_from=resumed_from)


def load_states(store, device: str | torch.device = "cpu") -> FrameStates:
    """A stored video's frame states (memory-mapped chunks, concatenated) for the engine."""
    meta = store.manifest["meta"]
    return tensors_to_states(store.load(device=device), meta).to(device)
