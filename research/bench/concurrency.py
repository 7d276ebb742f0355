"""Many clients at once through `vidmini serve`: aggregate decode tokens/s and time to first token at 1, 4, 8
concurrent clients, each on its own stored video.

  python -m research.bench.concurrency                   # 8 synthetic-world videos of 120 s, 3 rounds
  python -m research.bench.concurrency --clients 1 4 8 16 --seconds 300
  python -m research.bench.concurrency --max-tokens 48 160 320   # one table per answer length

Each client is a thread with the official openai client, streaming answers about its own video (warm sessions:
every video is asked once before timing). Answers are held to a JSON schema with one free string field and
`max_tokens` (default 48), so every answer decodes the same number of tokens (the demo model would otherwise stop
after a word or two and the table would measure prefill). A round: every client asks one question at the same
moment; the round's wall time covers all of them. Prints a table: per client count, aggregate completion
tokens/s (tokens of all answers / wall time of the rounds), p50/p95 time to first token, the speed-up of the
aggregate over one client, and the CPU seconds the server and the clients (this process) used meanwhile: on a
2-core machine both share the cores, so the clients' own streaming work is part of the wall time. The in-process table adds the decoder's own rate: tokens decoded in batched steps per
second spent in those steps (the batcher's counters), i.e. decoding without the questions' fusion and prefill. A second table asks the same questions through the service in the bench's own process
(no HTTP, no server): the engine's share, with the decode batcher's step counts and batch sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCHEMA = {"type": "object", "required": ["note"], "additionalProperties": False,
          "properties": {"note": {"type": "string"}}}


def timed_rounds(rounds: int, calls: list[tuple], target) -> float:
    """Wall seconds of `rounds` rounds, each starting `target(*args)` for every args tuple at once, on threads."""
    wall = 0.0
    for _ in range(rounds):
        threads = [threading.Thread(target=target, args=args) for args in calls]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        wall += time.perf_counter() - t
    return wall


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc), all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    from openai import OpenAI

    from research.bench.serving import start_serve
    from vidmini.demo.render import write_video
    from vidmini.demo.world import generate_timeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--seconds", type=int, default=120, help="length of each client's video")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[48])
    ap.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the same questions through the service in this process (no HTTP)")
    args = ap.parse_args()
    videos_needed = max(args.clients)
    with tempfile.TemporaryDirectory(prefix="vidmini-concurrency-") as tmp:
        env = {**os.environ, "VIDMINI_HOME": str(Path(tmp, "home"))}
        env.pop("VIDMINI_MODEL", None)
        vidmini = [sys.executable, "-m", "vidmini.cli.main"]
        paths = [str(write_video(generate_timeline(100 + i, args.seconds), Path(tmp, f"world-{i}.mp4")))
                 for i in range(videos_needed)]
        out = subprocess.run([*vidmini, "ingest", *paths, "--json"], env=env, capture_output=True, text=True,
                             check=True, cwd=REPO)
        ids = [json.loads(line)["id"] for line in out.stdout.splitlines()]
        server, base = start_serve(env, ["--max-pending", "64"])
        rows = []
        try:
            client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)

            def ask(video_id: str, out: list, max_tokens: int) -> None:
                t = time.perf_counter()
                first, tokens = None, 0
                stream = client.chat.completions.create(
                    model="vidmini", stream=True, max_tokens=max_tokens, stream_options={"include_usage": True},
                    response_format={"type": "json_schema", "json_schema": {"name": "note", "schema": SCHEMA}},
                    messages=[{"role": "user", "content": [
                        {"type": "video_url", "video_url": {"url": f"vidmini://{video_id}"}},
                        {"type": "text", "text": "Describe what happens in this video."}]}])
                for chunk in stream:
                    if first is None and any(c.delta.content for c in chunk.choices):
                        first = time.perf_counter() - t
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                out.append(((first or 0.0) * 1000, tokens))

            for video_id in ids:  # every session opened and its prefix cache built: warm from here on
                ask(video_id, [], args.max_tokens[0])
            for max_tokens in args.max_tokens:
                for n in args.clients:
                    results: list = []
                    server_cpu, client_cpu = cpu_seconds(server.pid), time.process_time()
                    wall = timed_rounds(args.rounds, [(ids[i], results, max_tokens) for i in range(n)], ask)
                    server_cpu, client_cpu = cpu_seconds(server.pid) - server_cpu, time.process_time() - client_cpu
                    ttfts = [r[0] for r in results]
                    tokens = sum(r[1] for r in results)
                    rows.append((max_tokens, n, tokens / wall, statistics.median(ttfts), percentile(ttfts, 0.95),
                                 tokens, wall, server_cpu, client_cpu))
        finally:
            server.terminate()
            server.wait(timeout=30)
        engine_rows = in_process(Path(tmp, "home"), ids, args) if args.in_process else []
    print(f"{videos_needed} videos of {args.seconds} s (1 fps), {args.rounds} rounds, answers held to a JSON schema")
    print("| answer tokens | clients | aggregate tokens/s | vs 1 client | p50 first token ms | p95 first token ms "
          "| tokens | wall s | server CPU s | clients' CPU s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for max_tokens, n, rate, p50, p95, tokens, wall, server_cpu, client_cpu in rows:
        one = next((r[2] for r in rows if r[0] == max_tokens and r[1] == 1), None)
        speed = f"{rate / one:.2f}x" if one else "-"
        print(f"| {max_tokens} | {n} | {rate:.1f} | {speed} | {p50:.1f} | {p95:.1f} | {tokens} | {wall:.2f} "
              f"| {server_cpu:.2f} | {client_cpu:.2f} |")
    if engine_rows:
        print("\nthe same questions in-process (`Library.answer` from N threads, no HTTP): the engine's own share")
        print("| answer tokens | clients | aggregate tokens/s | vs 1 client | decode steps | mean batch | max batch "
              "| decode-step tokens/s | vs 1 client |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for max_tokens, n, rate, steps, mean, most, step_rate in engine_rows:
            one = next((r for r in engine_rows if r[0] == max_tokens and r[1] == 1), None)
            vs = f"{rate / one[2]:.2f}x" if one else "-"
            vs_step = f"{step_rate / one[6]:.2f}x" if one and one[6] else "-"
            print(f"| {max_tokens} | {n} | {rate:.1f} | {vs} | {steps} | {mean:.2f} | {most} | {step_rate:.1f} "
                  f"| {vs_step} |")


def in_process(home: Path, ids: list[str], args) -> list[tuple]:
    """Aggregate tokens/s of N threads asking the service directly, with the decode batcher's counters."""
    os.environ["VIDMINI_HOME"] = str(home)
    from vidmini.service.library import Library
    from vidmini.service.options import AskOptions

    lib = Library(home)
    question = "Describe what happens in this video."
    for video_id in ids:
        lib.answer(video_id, question, AskOptions(max_new_tokens=args.max_tokens[0], json_schema=SCHEMA))
    batcher = lib.engine.batcher
    rows = []
    for max_tokens in args.max_tokens:
        options = AskOptions(max_new_tokens=max_tokens, json_schema=SCHEMA)
        for n in args.clients:
            batcher.reset_stats()
            tokens: list[int] = []

            def one_answer(video_id: str, out: list[int] = tokens, options: AskOptions = options) -> None:
                out.append(len(lib.answer(video_id, question, options).answer.token_ids))

            wall = timed_rounds(args.rounds, [(ids[i],) for i in range(n)], one_answer)
            sizes = batcher.batch_sizes
            steps = sum(sizes.values())
            mean = sum(k * v for k, v in sizes.items()) / steps if steps else 0.0
            rows.append((max_tokens, n, sum(tokens) / wall, steps, mean, batcher.max_batch_seen,
                         batcher.tokens / batcher.step_s if batcher.step_s else 0.0))
    return rows


if __name__ == "__main__":
    main()
