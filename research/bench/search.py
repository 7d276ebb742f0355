"""FAISS moment-search benchmark at the real model's embedding width (768).

Vectors are built like frames of video: shots (random centres) of 20–400 frames each, frames scattered around
their shot's centre, unit norm. Queries are noisy shot centres (a description lands near a shot, not on a
frame). For each size it builds the index vidmini builds at that size (`index.vectors.FrameVectors`), times
single-query searches (p50/p99 over `--queries`), and measures recall@10 against exact search.

  python -m research.bench.search                 # 100k and 1M (1M needs ~7 GB of memory, a few minutes on 2 cores)
  python -m research.bench.search --sizes 100000
"""

from __future__ import annotations

import argparse
import resource
import time

import faiss
import numpy as np

from vidmini.index.vectors import FrameVectors

DIM = 768


def frames_like(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < n:
        lengths.append(int(rng.integers(20, 401)))
    lengths[-1] -= sum(lengths) - n
    centres = rng.standard_normal((len(lengths), DIM)).astype(np.float32)
    x = np.empty((n, DIM), np.float32)
    start = 0
    for c, length in zip(centres, lengths, strict=True):
        x[start : start + length] = c + 0.5 * rng.standard_normal((length, DIM)).astype(np.float32)
        start += length
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, centres


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run(n: int, queries: int, seed: int) -> dict:
    x, centres = frames_like(n, seed)
    rng = np.random.default_rng(seed + 1)
    q = centres[rng.integers(len(centres), size=queries)] + 1.5 * rng.standard_normal((queries, DIM))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    exact = faiss.IndexFlatIP(DIM)
    exact.add(x)
    _, truth = exact.search(q, 10)
    del exact
    t0 = time.perf_counter()
    index = FrameVectors.build(x, np.arange(n), DIM, seed=seed)
    build_s = time.perf_counter() - t0
    index.search(q[:1], 10)  # warm
    times, found = [], []
    for i in range(queries):
        t = time.perf_counter()
        _, ids = index.search(q[i : i + 1], 10)
        times.append((time.perf_counter() - t) * 1000)
        found.append(len(set(ids[0]) & set(truth[i])) / 10)
    return {"n": n, "kind": index.spec.kind, "nlist": index.spec.nlist, "nprobe": index.spec.nprobe,
            "build_s": build_s, "index_gb": len(faiss.serialize_index(index.index)) / 2**30,
            "p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99)),
            "recall": float(np.mean(found)), "peak_rss_gb": rss_gb()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, dim {DIM}")
    print("| vectors | index | build s | index GB | p50 ms | p99 ms | recall@10 vs exact | peak RSS GB |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in args.sizes:
        r = run(n, args.queries, args.seed)
        kind = r["kind"] if r["kind"] == "flat" else f"ivf {r['nlist']} / nprobe {r['nprobe']}"
        print(f"| {n:,} | {kind} | {r['build_s']:.1f} | {r['index_gb']:.2f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
              f"| {r['recall']:.3f} | {r['peak_rss_gb']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
