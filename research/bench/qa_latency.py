"""Time to the first answer token: cached frame states (encode once, answer many) versus `forward_full`
(the paper's one pass per question), for N frames, measured in the same run.

  python -m research.bench.qa_latency                                   # CPU, tiny config
  python -m research.bench.qa_latency --config llama3-8b --device cuda --dtype bf16   # Llama-3.1-8B-sized, random

Random weights measure speed and memory as real ones do. Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from vidmini.demo.tiny import randomize_, tiny_clip, tiny_llama_config
from vidmini.demo.tokenizer import build_llama3_style_tokenizer, generation_eos_ids
from vidmini.engine.config import LlavaMiniConfig
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.inference import Engine
from vidmini.engine.model import LlavaMiniModel
from vidmini.engine.vision import VisionTower, make_image_processor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
QUESTION = "What colour is the square, and how many circles are there?"


def build_engine(name: str, device: str, dtype: torch.dtype, attn: str) -> Engine:
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_llama3_style_tokenizer(tmp, vocab_size=4096)
    eos = tuple(generation_eos_ids(tok))
    torch.manual_seed(0)
    if name == "tiny":
        clip = tiny_clip()
        llama = tiny_llama_config(len(tok), bos=tok.bos_token_id, eos=list(eos))
        cfg = LlavaMiniConfig(llama=llama, prefusion_layer_num=2, mm_hidden_size=clip.config.hidden_size)
        model = LlavaMiniModel(cfg, VisionTower(clip), attn=attn)
        randomize_(model, 0)
    else:  # Llama-3.1-8B + CLIP ViT-L/14-336 shapes
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

        llama = LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 8192}, rms_norm_eps=1e-5,
        )
        clip_cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                    num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
        cfg = LlavaMiniConfig(llama=llama, prefusion_layer_num=4, mm_hidden_size=1024)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        with torch.device(device):
            clip = CLIPVisionModel(clip_cfg)
            model = LlavaMiniModel(cfg, VisionTower(clip), attn=attn)
        torch.set_default_dtype(prev)
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.rotary = type(model.rotary)(cfg.rope, cfg.head_dim).to(device)
    model = model.to(device=device, dtype=dtype).eval()
    processor = make_image_processor(model.vision.config.image_size)
    return Engine(model, tok, processor, eos, name=name, encode_batch=32 if device.startswith("cuda") else 16)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ttft(fn, device: str) -> tuple[float, int]:
    """Seconds until the first token is yielded, and that token."""
    sync(device)
    t0 = time.perf_counter()
    token = next(iter(fn())).token_id
    sync(device)
    return time.perf_counter() - t0, token


def pixels_for(engine: Engine, n: int, seed: int) -> torch.Tensor:
    size = engine.model.vision.config.image_size
    frames = np.random.default_rng(seed).integers(0, 256, (min(n, 64), size, size, 3), dtype=np.uint8)
    px = engine.frame_pixels(frames)
    reps = -(-n // px.shape[0])
    return px.repeat(reps, 1, 1, 1, 1)[:n]  # content does not change the cost


def measure(engine: Engine, n: int, args: argparse.Namespace, one: SamplingConfig) -> dict:
    cuda = args.device.startswith("cuda")
    pixels = pixels_for(engine, n, n)
    warm = engine.encode_frames(pixels[:4])  # warm-up: kernels, allocator
    next(iter(engine.answer(QUESTION, warm, one)))
    next(iter(engine.forward_full(pixels[:4], QUESTION, one)))
    del warm
    # the baseline first, so that it never shares the device with N frames' cached states
    full = [ttft(lambda: engine.forward_full(pixels, QUESTION, one), args.device) for _ in range(args.full_repeats)]
    print(f"  forward_full over {n} frames: {full[0][0] * 1000:.1f} ms", flush=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(args.device)
    t0 = time.perf_counter()
    states = engine.encode_frames(pixels)
    sync(args.device)
    encode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    prefix = engine.build_prefix_cache(states, extra_capacity=256)
    sync(args.device)
    prefix_s = time.perf_counter() - t0
    cached = [ttft(lambda: engine.answer(QUESTION, states, one, prefix_cache=prefix), args.device)
              for _ in range(args.repeats)]
    states_only = [ttft(lambda: engine.answer(QUESTION, states, one), args.device)
                   for _ in range(max(1, args.repeats // 2))]
    kv_per_token = prefix.cache.nbytes() / prefix.cache.capacity
    row = {
        "frames": n,
        "encode_s": encode_s,
        "encode_fps": n / encode_s,
        "prefix_cache_s": prefix_s,
        "ttft_cached_ms": statistics.median(t for t, _ in cached) * 1000,
        "ttft_states_only_ms": statistics.median(t for t, _ in states_only) * 1000,
        "ttft_full_ms": statistics.median(t for t, _ in full) * 1000,
        "same_first_token": len({tok for _, tok in cached + states_only + full}) == 1,
        "states_mb_per_frame": states.nbytes() / n / 2**20,
        # tier A: the fused compressed token(s) plus their LLM keys/values
        "tier_a_kb_per_frame": (states.compressed[0].numel() * states.compressed.element_size()
                                + kv_per_token * engine.model.config.num_queries) / 1024,
    }
    if cuda:
        row["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["tiny", "llama3-8b"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--frames", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--full-repeats", type=int, default=1)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    dtype = DTYPES[args.dtype]
    engine = build_engine(args.config, args.device, dtype, args.attn)
    one = SamplingConfig(max_new_tokens=1, stop_ids=())
    prompt = engine.prompt(QUESTION)
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"config={args.config} device={dev_name} dtype={args.dtype} threads={torch.get_num_threads()} "
          f"|P|={len(prompt.prefix)} |Q|={len(prompt.question)}", flush=True)
    rows = []
    for n in args.frames:
        rows.append(measure(engine, n, args, one))
        print(rows[-1], flush=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print()
    head = ("| frames | encode (frames/s) | LLM prefix cache build | TTFT cached states + prefix cache | "
            "TTFT cached states, no prefix cache | TTFT forward_full | speed-up | same 1st token | "
            "pre-fusion states / frame | tier A / frame |")
    if args.device.startswith("cuda"):
        head += " peak GPU |"
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for r in rows:
        line = (f"| {r['frames']:,} | {r['encode_fps']:.1f} | {r['prefix_cache_s'] * 1000:.1f} ms | "
                f"{r['ttft_cached_ms']:.1f} ms | {r['ttft_states_only_ms']:.1f} ms | {r['ttft_full_ms']:.1f} ms | "
                f"{r['ttft_full_ms'] / r['ttft_cached_ms']:.0f}× | {r['same_first_token']} | "
                f"{r['states_mb_per_frame']:.3f} MB | {r['tier_a_kb_per_frame']:.1f} KB |")
        if "peak_gpu_gb" in r:
            line += f" {r['peak_gpu_gb']:.1f} GB |"
        print(line)


if __name__ == "__main__":
    main()
