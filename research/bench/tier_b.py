"""Tier B: read stored pre-fusion states, or recompute them from stored visual features — which is faster?

For each model, a synthetic video is ingested through the real path (its store holds every frame's pre-fusion
states), then per frame:
  read warm  — `load_states(store)` with the chunk files in the page cache (memory-mapped safetensors);
  read cold  — the same after `posix_fadvise(DONTNEED)` drops the chunk files from the cache;
  recompute  — `prefuse_prefix` from the projected patch tokens + compressed token (the features a store would
               keep instead), in batches of 64 frames.
Bytes per frame of each representation are printed beside them.

  python -m research.bench.tier_b --frames 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from vidmini.demo.render import write_video
from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.demo.world import generate_timeline
from vidmini.engine.fusion import prefuse_prefix
from vidmini.engine.load import ModelChoice, choose_model, open_engine
from vidmini.ingest.job import IngestOptions, load_states, run_ingest
from vidmini.store.video_store import VideoStore


def drop_cache(store: VideoStore) -> None:
    for path in store.path.rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def measure(engine, label: str, frames: int, workdir: Path) -> dict:
    video = write_video(generate_timeline(99, frames), workdir / f"{label}.mp4")
    result = run_ingest(str(video), engine, workdir / label, IngestOptions())
    store = VideoStore.load_existing(result.store_path)
    load_states(store)  # warm
    t = time.perf_counter()
    states = load_states(store)
    warm = (time.perf_counter() - t) / frames * 1000
    drop_cache(store)
    t = time.perf_counter()
    load_states(store)
    cold = (time.perf_counter() - t) / frames * 1000
    pixels = engine.frame_pixels([f for f in _frames(video)])
    patches, compressed = engine.model.encode_visual(pixels)
    t = time.perf_counter()
    for start in range(0, frames, 64):
        prefuse_prefix(engine.model, patches[start : start + 64], compressed[start : start + 64], engine.prefix_ids)
    recompute = (time.perf_counter() - t) / frames * 1000
    feature_bytes = (patches[0].numel() + compressed[0].numel()) * patches.element_size()
    return {"model": label, "state_bytes": states.nbytes() / frames, "feature_bytes": feature_bytes,
            "warm": warm, "cold": cold, "recompute": recompute}


def _frames(video: Path):
    from vidmini.ingest.sampler import FrameSampler

    return [f.image for f in FrameSampler(str(video), fps=1.0)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=256)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vidmini-tierb-") as tmp:
        tiny = build_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        for label, choice in (("demo", choose_model(None)), ("tiny", ModelChoice(str(tiny), "tiny"))):
            rows.append(measure(open_engine(choice), label, args.frames, Path(tmp)))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.frames} frames")
    print("| model | states KB/frame | features KB/frame | read warm ms/frame | read cold ms/frame | recompute ms/frame "
          "| faster |\n| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        best = min(("read (warm)", r["warm"]), ("read (cold)", r["cold"]), ("recompute", r["recompute"]),
                   key=lambda x: x[1])[0]
        print(f"| {r['model']} | {r['state_bytes'] / 1024:.1f} | {r['feature_bytes'] / 1024:.1f} | {r['warm']:.3f} "
              f"| {r['cold']:.3f} | {r['recompute']:.3f} | {best} |")


if __name__ == "__main__":
    main()
