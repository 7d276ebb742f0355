"""Questions over a cached video session versus recomputing per question (the reference's way), for N frames.

  python -m research.bench.session                      # CPU, tiny random-weight config: 100, 1,000, 10,800 frames

Session: frames encoded once (not counted per question), tier A (c'_f + the LLM prefix cache) built by the first
question on a frame set ("cold"); later questions ("warm") run only Q through pre-fusion and the LLM.
Reference: `Engine.forward_full` per question — every frame through the vision tower, the whole pre-fusion pass
over [patches, c, P, Q], then the LLM prefill over all frame tokens.
`auto` runs with a pre-fusion budget of 100 frames' states: the ratio of the session's 1 GiB default to an
8B-sized model's ~10 MB per frame, so `auto` is `all` at 100 frames and uniform:64 above. `all` is reported too.
Peak RSS is the process's high-water mark so far (it only grows from row to row). Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from research.bench.qa_latency import build_engine, pixels_for
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.session import AUTO_K, VideoSession

QUESTIONS = ["What colour is the square, and how many circles are there?", "What happens after the red car leaves?",
             "Is anyone holding an umbrella?", "Where is the dog at the end?"]


def ttft_and_rate(stream) -> tuple[float, float, str]:
    res = stream.result()
    return res.ttft_ms, res.tokens_per_s, res.policy


def reference(engine, pixels, question: str, decode_tokens: int) -> tuple[float, float]:
    """TTFT (ms) and decode tokens/s of forward_full."""
    one = SamplingConfig(max_new_tokens=decode_tokens, stop_ids=())
    ans = engine.collect(engine.forward_full(pixels, question, one), frames=pixels.shape[0])
    return ans.ttft_ms, ans.tokens_per_s


def measure(engine, n: int, args) -> dict:
    pixels = pixels_for(engine, n, n)
    ref = [reference(engine, pixels, QUESTIONS[i % len(QUESTIONS)], args.decode_tokens)
           for i in range(args.ref_repeats if n < 5000 else 1)]
    print(f"  reference over {n} frames: {ref[0][0]:.1f} ms to the first token", flush=True)
    t0 = time.perf_counter()
    states = engine.encode_frames(pixels)
    encode_s = time.perf_counter() - t0
    del pixels
    frame_bytes = sum(k[0].numel() * k.element_size() for k in states.keys + states.values)
    session = VideoSession.from_states(engine, states, [float(i) for i in range(n)],
                                       prefusion_budget_bytes=100 * frame_bytes)
    sampling = SamplingConfig(max_new_tokens=args.decode_tokens, stop_ids=())
    t0 = time.perf_counter()
    cold_ms, _, _ = ttft_and_rate(session.ask(QUESTIONS[0], policy="auto", sampling=sampling))
    cold_total = (time.perf_counter() - t0) * 1000
    row = {"frames": n, "encode_s": encode_s, "cold_auto_ttft_ms": cold_ms, "cold_total_ms": cold_total}
    for policy in ("auto", "all"):
        runs = [ttft_and_rate(session.ask(QUESTIONS[1 + i % 3], policy=policy, sampling=sampling))
                for i in range(args.repeats)]
        row[f"{policy}_policy"] = runs[0][2]
        row[f"{policy}_ttft_ms"] = statistics.median(r[0] for r in runs)
        row[f"{policy}_tok_s"] = statistics.median(r[1] for r in runs)
    exact = session.fused_question(QUESTIONS[1], policy="all").flatten().double()
    sub = session.fused_question(QUESTIONS[1], policy=f"uniform:{AUTO_K}").flatten().double()
    row["q_cosine_uniform"] = float(torch.nn.functional.cosine_similarity(sub, exact, dim=0))
    row["ref_ttft_ms"] = statistics.median(r[0] for r in ref)
    row["ref_tok_s"] = statistics.median(r[1] for r in ref)
    entry = session.prefix_entry(range(n))[0]
    filled = entry.cache.nbytes() * entry.length / entry.cache.capacity  # the filled part, no slack
    row["tier_a_b_per_frame"] = (session.compressed.numel() * session.compressed.element_size() + filled) / n
    row["tier_a_formula_b"] = session.tier_a_bytes_per_frame()
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[100, 1000, 10800])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ref-repeats", type=int, default=2, help="reference repeats below 5,000 frames (else 1)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    engine = build_engine("tiny", "cpu", torch.float32, "sdpa")
    warm = pixels_for(engine, 8, 0)  # warm-up: first calls allocate and pick kernels
    reference(engine, warm, QUESTIONS[0], 2)
    VideoSession.from_states(engine, engine.encode_frames(warm), [float(i) for i in range(8)]).ask(
        QUESTIONS[0], sampling=SamplingConfig(max_new_tokens=2, stop_ids=())).result()
    print(f"config=tiny device=cpu dtype=fp32 threads={torch.get_num_threads()} "
          f"|P|={len(engine.prefix_ids)} decode={args.decode_tokens} tokens", flush=True)
    rows = []
    for n in args.frames:
        rows.append(measure(engine, n, args))
        print(rows[-1], flush=True)
    print()
    head = ("| frames | TTFT session auto (policy) | TTFT session all | TTFT reference | ratio auto | ratio all | "
            "decode tok/s session | decode tok/s reference | first question (prefix build) | "
            "Q' cosine uniform:64 vs all | tier A / frame | peak RSS |")
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in rows:
        print(f"| {r['frames']:,} | {r['auto_ttft_ms']:.1f} ms ({r['auto_policy']}) | {r['all_ttft_ms']:.1f} ms | "
              f"{r['ref_ttft_ms']:.1f} ms | {r['ref_ttft_ms'] / r['auto_ttft_ms']:.0f}× | "
              f"{r['ref_ttft_ms'] / r['all_ttft_ms']:.0f}× | {r['auto_tok_s']:.0f} | {r['ref_tok_s']:.0f} | "
              f"{r['cold_auto_ttft_ms']:.1f} ms | {r['q_cosine_uniform']:.4f} | "
              f"{r['tier_a_b_per_frame']:.0f} B ({r['tier_a_formula_b']:.0f} B formula) | "
              f"{r['peak_rss_mb']:.0f} MB |")


if __name__ == "__main__":
    main()
