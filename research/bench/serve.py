"""Warm questions through `vidmini serve` against `vidmini ask --no-cache`, on a stored synthetic-world video.

  python -m research.bench.serve                 # a 1,000-frame video (made and ingested once), 5 questions
  python -m research.bench.serve --seconds 300

Rows: time to the first streamed token over HTTP (the official openai client, a live server holding the model
and the video's warm session; medians over the questions after one warm-up), the whole streamed answer, and
`vidmini ask --no-cache` (a fresh process that decodes and encodes every frame again, the reference's way), whose
first token it reports itself. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    import numpy as np
    from openai import OpenAI

    from research.bench.serving import start_serve
    from vidmini.demo.questions import make_questions
    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=1000)
    ap.add_argument("--questions", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vidmini-serve-bench-") as tmp:
        env = {**os.environ, "VIDMINI_HOME": str(Path(tmp, "home"))}
        env.pop("VIDMINI_MODEL", None)
        timeline = generate_timeline(5, args.seconds)
        video = write_video(timeline, Path(tmp, "world.mp4"))
        vidmini = [sys.executable, "-m", "vidmini.cli.main"]
        t0 = time.perf_counter()
        out = subprocess.run([*vidmini, "ingest", str(video), "--json"], env=env, capture_output=True, text=True,
                             check=True, cwd=REPO)
        ingest_s = time.perf_counter() - t0
        video_id = json.loads(out.stdout)["id"]
        questions = [q.question for q in make_questions(timeline, np.random.default_rng(1), per_family=1)]
        questions = (questions * args.questions)[: args.questions]
        server, base = start_serve(env, [])
        try:
            client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)

            def ask(question: str, policy: str = "auto") -> tuple[float, float]:
                t = time.perf_counter()
                first = None
                stream = client.chat.completions.create(model="vidmini", stream=True, max_tokens=16,
                                                        extra_body={"policy": policy}, messages=[
                    {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"vidmini://{video_id}"}},
                                                 {"type": "text", "text": question}]}])
                for chunk in stream:
                    if first is None and any(c.delta.content for c in chunk.choices):
                        first = time.perf_counter() - t
                return (first or 0.0) * 1000, (time.perf_counter() - t) * 1000

            ask(questions[0])  # the session opens and its prefix cache fills: not a warm question
            warm = [ask(q) for q in questions]
            ask(questions[0], "uniform:64")
            subset = [ask(q, "uniform:64") for q in questions]
        finally:
            server.terminate()
            server.wait(timeout=30)
        cold = []
        for q in questions[:2]:
            t = time.perf_counter()
            res = subprocess.run([*vidmini, "ask", video_id, q, "--no-cache", "--json", "--max-new-tokens", "16"],
                                 env=env, capture_output=True, text=True, check=True, cwd=REPO)
            cold.append((json.loads(res.stdout)["ttft_ms"], (time.perf_counter() - t) * 1000))
    http_ttft = statistics.median(w[0] for w in warm)
    print(f"video: {args.seconds} frames (ingested once in {ingest_s:.1f} s)")
    print("| path | first token ms (median) | whole answer ms (median) | runs |")
    print("| --- | --- | --- | --- |")
    print(f"| HTTP, warm session (openai client, streamed) | {http_ttft:.1f} | "
          f"{statistics.median(w[1] for w in warm):.1f} | {len(warm)} |")
    print(f"| HTTP, warm session, policy uniform:64 | {statistics.median(w[0] for w in subset):.1f} | "
          f"{statistics.median(w[1] for w in subset):.1f} | {len(subset)} |")
    print(f"| `vidmini ask --no-cache` (recompute, fresh process) | {statistics.median(c[0] for c in cold):.1f} | "
          f"{statistics.median(c[1] for c in cold):.1f} | {len(cold)} |")
    cold_ttft = statistics.median(c[0] for c in cold)
    print(f"\nfirst token: --no-cache / HTTP warm = {cold_ttft / http_ttft:.0f}x (auto), "
          f"{cold_ttft / statistics.median(w[0] for w in subset):.0f}x (uniform:64); the issue's bound: >= 100x")


if __name__ == "__main__":
    main()
