"""Encode throughput (vision tower + compressor + projector + question-independent pre-fusion) by batch size.

  python -m research.bench.encode --config llama3-8b --device cuda --dtype bf16 --batches 8 16 32 64 128

Random weights measure speed as real ones do. Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import time

import torch
from qa_latency import DTYPES, build_engine, pixels_for, sync


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["tiny", "llama3-8b"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--frames", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32, 64])
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    engine = build_engine(args.config, args.device, DTYPES[args.dtype], "sdpa")
    pixels = pixels_for(engine, args.frames, 0)
    cuda = args.device.startswith("cuda")
    rows = []
    for batch in args.batches:
        engine.encode_frames(pixels[: 2 * batch], batch_size=batch)  # warm-up
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        sync(args.device)
        t0 = time.perf_counter()
        states = engine.encode_frames(pixels, batch_size=batch)
        sync(args.device)
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        rows.append((batch, args.frames / seconds, peak))
        print(f"batch {batch}: {args.frames / seconds:.1f} frames/s, peak {peak:.1f} GB", flush=True)
        del states
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"\nconfig={args.config} device={name} dtype={args.dtype} frames={args.frames}\n")
    print("| batch | frames/s | × real time at 1 fps | peak GPU memory |")
    print("| --- | --- | --- | --- |")
    for batch, fps, peak in rows:
        print(f"| {batch} | {fps:.1f} | {fps:.0f}× | {peak:.1f} GB |")


if __name__ == "__main__":
    main()
