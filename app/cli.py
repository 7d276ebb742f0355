"""`vidmini` command line: ask about an image or a video, download the real checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.checkpoint import DEFAULT_REPO, DTYPES, CheckpointError
from engine.generate import SamplingConfig
from engine.prompt import PROMPT_STYLES

CLIP_REPO = "openai/clip-vit-large-patch14-336"


class UsageError(ValueError):
    """Bad input from the user: reported as one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidmini", description="Question answering over images and long videos.")
    sub = p.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about an image or a video file")
    ask.add_argument("media", help="image or video file")
    ask.add_argument("question")
    ask.add_argument("--model", help="checkpoint directory or Hugging Face id (default: $VIDMINI_MODEL, "
                                     "else the shipped model)")
    ask.add_argument("--max-new-tokens", type=int, default=256)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=None)
    ask.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ask.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ask.add_argument("--fps", type=float, default=1.0, help="video sampling rate (frames per second)")
    ask.add_argument("--max-frames", type=int, default=None)
    ask.add_argument("--prompt-style", choices=PROMPT_STYLES, default="reference",
                     help="reference: the reference's prompt, quirks included; corrected: assistant header, one BOS")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("--logprobs", type=int, default=0, metavar="K", help="with --json: top-K log-probs per token")

    dl = sub.add_parser("download", help="fetch a checkpoint and its vision tower into the Hugging Face cache")
    dl.add_argument("model_id", nargs="?", default=DEFAULT_REPO)
    dl.add_argument("--vision-tower", default=None, help=f"default: the checkpoint's mm_vision_tower ({CLIP_REPO})")
    return p


def _read_media(engine, path: str, fps: float, max_frames: int | None):
    from ingest.simple_decode import load_image, media_kind, sample_frames

    if not Path(path).exists():
        raise UsageError(f"no such file: {path}")
    if media_kind(path) == "image":
        return engine.image_pixels(load_image(path)), [0.0]
    sampled = sample_frames(path, fps=fps, max_frames=max_frames)
    return engine.frame_pixels(sampled.frames), sampled.timestamps


def cmd_ask(args: argparse.Namespace) -> int:
    from app.models import RANDOM_BANNER, choose_model, open_engine

    if args.logprobs < 0 or args.max_new_tokens < 0 or args.fps <= 0:
        raise UsageError("--logprobs and --max-new-tokens must be >= 0 and --fps > 0")
    from ingest.simple_decode import media_kind

    if not Path(args.media).exists():
        raise UsageError(f"no such file: {args.media}")
    media_kind(args.media)  # bad media fails before the model loads
    choice = choose_model(args.model)
    if choice.is_random:
        print(RANDOM_BANNER, file=sys.stderr)
    engine = open_engine(choice, dtype=args.dtype, device=args.device, prompt_style=args.prompt_style)
    t0 = time.perf_counter()
    pixels, timestamps = _read_media(engine, args.media, args.fps, args.max_frames)
    states = engine.encode_frames(pixels)
    encode_ms = (time.perf_counter() - t0) * 1000
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              stop_ids=engine.eos_ids, logprobs=args.logprobs, seed=args.seed)
    answer = engine.collect(engine.answer(args.question, states, sampling), frames=states.num_frames)
    if args.json:
        out = {
            "answer": answer.text,
            "token_ids": answer.token_ids,
            "frames": answer.frames,
            "timestamps": timestamps,
            "ttft_ms": round(answer.ttft_ms, 3),
            "tokens_per_s": round(answer.tokens_per_s, 3),
            "encode_ms": round(encode_ms, 3),
            "model": engine.name,
            "random_weights": choice.is_random,
        }
        if args.logprobs:
            out["logprobs"] = answer.logprobs
        print(json.dumps(out))
    else:
        print(answer.text)
        print(f"[{engine.name}; {answer.frames} frame(s); first token {answer.ttft_ms:.1f} ms; "
              f"{answer.tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    import json as _json

    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(args.model_id))
        tower = args.vision_tower or _json.loads((path / "config.json").read_text()).get("mm_vision_tower", CLIP_REPO)
        if not Path(tower).is_dir():
            snapshot_download(tower)
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
        raise UsageError(f"download of {args.model_id} failed (network needed): {type(e).__name__}: {e}") from None
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from ingest.simple_decode import MediaError
    except ImportError:  # pragma: no cover
        MediaError = UsageError  # noqa: N806
    try:
        return {"ask": cmd_ask, "download": cmd_download}[args.command](args)
    except (UsageError, CheckpointError, MediaError, FileNotFoundError) as e:
        print(f"vidmini: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
