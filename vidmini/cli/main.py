"""`vidmini` command line: ask about an image or a video, download the real checkpoint."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vidmini.common.errors import UsageError
from vidmini.common.timefmt import clock, span
from vidmini.service.options import CLIP_REPO, DEFAULT_REPO, DTYPE_NAMES, PROMPT_STYLES, user_error_types


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
    ask.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    ask.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ask.add_argument("--max-frames", type=int, default=None, help="with --no-store: stop after N frames")
    ask.add_argument("--prompt-style", choices=PROMPT_STYLES, default="reference",
                     help="reference: the reference's prompt, quirks included; corrected: assistant header, one BOS")
    _ingest_options(ask)
    ask.add_argument("--no-store", action="store_true", help="decode and encode in memory; store nothing")
    ask.add_argument("--from", dest="start", default=None, metavar="T",
                     help="only frames from this time (1:02:03, 62:03 or seconds)")
    ask.add_argument("--to", dest="end", default=None, metavar="T", help="only frames up to this time")
    ask.add_argument("--policy", default="auto",
                     help="question-time fusion: all (exact), uniform:K, retrieved:K or auto (default)")
    ask.add_argument("--prefusion-budget-gb", type=float, default=1.0,
                     help="device memory for pre-fusion states (tier C); auto uses all frames when they fit")
    ask.add_argument("--no-cache", action="store_true",
                     help="answer the reference's way: decode the frames again and recompute everything")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("--logprobs", type=int, default=0, metavar="K", help="with --json: top-K log-probs per token")

    ing = sub.add_parser("ingest", help="sample, encode and store videos or streams (resumable)")
    ing.add_argument("sources", nargs="+", metavar="PATH_OR_URL")
    _ingest_options(ing)
    ing.add_argument("--model", help="checkpoint directory or Hugging Face id")
    ing.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    ing.add_argument("--device", default="cpu")
    ing.add_argument("--json", action="store_true", help="one JSON object per input on stdout")

    ls = sub.add_parser("list", help="list stored videos")
    ls.add_argument("--json", action="store_true")

    rm = sub.add_parser("rm", help="delete a stored video")
    rm.add_argument("video_id")

    se = sub.add_parser("search", help="find moments by describing them (text → frames)")
    se.add_argument("query")
    se.add_argument("--video", default=None, help="one stored video (id or prefix); default: the whole library")
    se.add_argument("-k", type=int, default=10, help="how many moments")
    se.add_argument("--model", help="checkpoint directory or Hugging Face id (its text tower embeds the query)")
    se.add_argument("--json", action="store_true", help="one JSON object")

    sc = sub.add_parser("scenes", help="scene boundaries of a stored video (from frame embeddings)")
    sc.add_argument("video_id")
    sc.add_argument("--json", action="store_true")

    sa = sub.add_parser("sample", help="put the sample synthetic-world video in the library (made once)")
    sa.add_argument("--model", help="checkpoint directory (default: the shipped demo model)")

    demo = sub.add_parser("demo", help="make a synthetic-world video, ingest it, ask one question per family")
    demo.add_argument("--model", help="checkpoint directory (default: the shipped demo model)")
    demo.add_argument("--seconds", type=int, default=120, help="length of the generated video")
    demo.add_argument("--seed", type=int, default=7)

    dl = sub.add_parser("download", help="fetch a checkpoint and its vision tower into the Hugging Face cache")
    dl.add_argument("model_id", nargs="?", default=DEFAULT_REPO)
    dl.add_argument("--vision-tower", default=None, help=f"default: the checkpoint's mm_vision_tower ({CLIP_REPO})")
    from vidmini.summaries.batch import (
        add_parser as add_summarize_parser,  # vidmini summarize (vidmini/summaries/batch.py)
    )

    add_summarize_parser(sub)
    return p


def _ingest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", type=float, default=1.0, help="sampling rate, 0.05 to 30 frames per second")
    p.add_argument("--every-k", type=int, default=None, help="instead of --fps: every k-th frame")
    p.add_argument("--mode", choices=["exact", "fast"], default="exact",
                   help="exact: the frame displayed at each time; fast: within one frame, quicker")
    p.add_argument("--stream", type=int, default=None, help="video stream index (default: the main one)")
    p.add_argument("--backend", choices=["pyav", "ffmpeg", "decord"], default="pyav")
    p.add_argument("--hwaccel", choices=["cuda"], default=None,
                   help="decode on the GPU (NVDEC, pyav backend); falls back to software when unavailable")


def _options(args: argparse.Namespace):
    from vidmini.ingest.job import IngestOptions

    if not 0.05 <= args.fps <= 30:
        raise UsageError("--fps must be between 0.05 and 30")
    if args.every_k is not None and args.every_k < 1:
        raise UsageError("--every-k must be >= 1")
    return IngestOptions(fps=args.fps, every_k=args.every_k, mode=args.mode, stream=args.stream,
                         backend=args.backend, hwaccel=args.hwaccel)


def _progress_bar(label: str):
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(p) -> None:
        bar.total = p.total
        bar.n = p.frames_done
        bar.set_postfix_str(f"{p.rate_fps:.1f} fr/s" + (f", ETA {p.eta_s:.0f}s" if p.eta_s is not None else ""))
        bar.refresh()

    return bar, update


def _library(engine=None, **model):
    """The service the app uses too (vidmini/service/library.py): one path for ask, ingest, list, rm, search, scenes.
    `model`: the model to load on first use (model, dtype, device, prompt_style) when no engine is given."""
    from vidmini.common.paths import data_home
    from vidmini.service.library import Library

    return Library(data_home(), engine=engine, **model)


def _ingest_one(engine, source: str, options):
    bar, update = _progress_bar(Path(source).name or source)
    try:
        return _library(engine).ingest(source, options, on_progress=update)
    finally:
        bar.close()


def cmd_ask(args: argparse.Namespace) -> int:
    from vidmini.engine.load import RANDOM_BANNER
    from vidmini.service.asking import AskOptions, ask_media

    options = AskOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, logprobs=args.logprobs, policy=args.policy, start=args.start, end=args.end,
                         prefusion_budget_gb=args.prefusion_budget_gb, no_cache=args.no_cache, no_store=args.no_store,
                         max_frames=args.max_frames)
    options.check()
    ingest = _options(args)
    lib = _library(model=args.model, dtype=args.dtype, device=args.device, prompt_style=args.prompt_style)

    def banner() -> None:
        if lib.model_choice.is_random:
            print(RANDOM_BANNER, file=sys.stderr)

    shown: list = []  # the ingest's bar, made when an ingest first reports (images and stored videos show none)

    def progress(p) -> None:
        if not shown:
            shown.extend(_progress_bar(Path(args.media).name or args.media))
        shown[1](p)

    try:
        reply = ask_media(lib, args.media, args.question, options, ingest, on_progress=progress, before_load=banner)
    finally:
        if shown:
            shown[0].close()
    if args.json:
        print(json.dumps(reply.to_json()))
        return 0
    print(reply.answer)
    if reply.moments:
        print("moments: " + ", ".join(f"{span(m.start, m.end)} ({m.score:.2f})" for m in reply.moments))
    r = reply.result
    where = "" if r["range"] is None else f" from {r['range']['start']:g}s to {r['range']['end']:g}s"
    print(f"[{reply.model}; {len(reply.timestamps)} frame(s){where}; policy {r['policy']}; "
          f"first token {r['ttft_ms']:.1f} ms; {r['tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from vidmini.engine.load import RANDOM_BANNER, choose_model
    from vidmini.ingest.errors import IngestError
    from vidmini.service.models import open_model

    options = _options(args)
    choice = choose_model(args.model)
    if choice.is_random:
        print(RANDOM_BANNER, file=sys.stderr)
    engine = open_model(choice, dtype=args.dtype, device=args.device)
    failures = 0
    for source in args.sources:
        try:
            result = _ingest_one(engine, source, options)
        except IngestError as e:  # one bad input does not stop the others
            failures += 1
            print(f"vidmini: error: {e}".splitlines()[0], file=sys.stderr)
            if args.json:
                print(json.dumps({"source": source, "error": str(e).splitlines()[0]}))
            continue
        if args.json:
            print(json.dumps({"id": result.video_id, "source": source, "frames": result.frames,
                              "duration": result.duration_s, "gaps": result.gaps, "store": result.store_path,
                              "seconds": round(result.seconds, 3), "reused": result.reused,
                              "resumed_from": result.resumed_from}), flush=True)
        else:
            state = "reused" if result.reused else f"{result.frames} frames in {result.seconds:.1f}s"
            gaps = f", gaps {result.gaps}" if result.gaps else ""
            print(f"{result.video_id}  {source}  ({state}{gaps})", flush=True)
    return 2 if failures else 0


def cmd_list(args: argparse.Namespace) -> int:
    infos = _library().stored()
    if args.json:
        print(json.dumps([_info_dict(i) for i in infos]))
        return 0
    for i in infos:
        d = _info_dict(i)
        status = "complete" if d.get("complete") else "incomplete"
        print(f"{d.get('video_id')}  {d.get('frames')} frames  {status}  {d.get('source')}")
    return 0


def _info_dict(info) -> dict:
    from dataclasses import asdict, is_dataclass

    d = asdict(info) if is_dataclass(info) else dict(info)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def cmd_rm(args: argparse.Namespace) -> int:
    from vidmini.service.library import LibraryError

    try:
        removed = _library().remove(args.video_id)
    except LibraryError:
        raise UsageError(f"no stored video {args.video_id}") from None
    print(f"removed {removed}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from vidmini.engine.load import choose_model
    from vidmini.service.library import LibraryError
    from vidmini.service.models import open_model

    if args.k < 1:
        raise UsageError("-k must be at least 1")
    if not args.query.strip():
        raise UsageError("empty search query")
    engine = open_model(choose_model(args.model))
    try:
        moments = _library(engine).search(args.query, args.video, args.k, curve=False).moments
    except LibraryError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({"query": args.query, "video": args.video, "model": engine.name,
                          "moments": [m.to_json() for m in moments]}))
        return 0
    if not moments:
        print("no matching moments")
    for m in moments:
        print(f"{m.score:.3f}  {m.video_id[:16]}  {span(m.start, m.end)}  (best frame at {clock(m.time)})")
    return 0


def cmd_scenes(args: argparse.Namespace) -> int:
    from vidmini.service.library import LibraryError

    lib = _library()  # boundaries need frame embeddings, not the model
    try:
        video_id = lib.get_store(args.video_id).video_id
        cuts = lib.scenes(video_id)
    except LibraryError as e:
        raise UsageError(str(e)) from None
    if args.json:
        print(json.dumps({"video_id": video_id, "scene_starts": cuts}))
    else:
        print("\n".join(f"{t:.1f}" for t in cuts) or "one scene")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    """The sample synthetic video in the library (the app's `make run` calls this): made and ingested once."""
    from vidmini.engine.load import RANDOM_BANNER, choose_model
    from vidmini.service.models import open_model

    choice = choose_model(args.model)
    if choice.is_random:
        print(RANDOM_BANNER, file=sys.stderr)
    lib = _library(open_model(choice))
    path = lib.sample_path(announce=lambda p: print(f"writing the sample video {p} ...", file=sys.stderr))
    result = _ingest_one(lib.engine, str(path), None)
    print(f"{result.video_id}  {path}  ({'already in the library' if result.reused else f'{result.frames} frames'})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The offline end-to-end demo: a synthetic video (made once), ingested, and one question per family."""
    import numpy as np

    from vidmini.common.paths import data_home
    from vidmini.demo.questions import make_questions
    from vidmini.demo.world import generate_timeline
    from vidmini.engine.load import RANDOM_BANNER, choose_model
    from vidmini.ingest.job import IngestOptions, load_states
    from vidmini.service.models import open_model
    from vidmini.store.video_store import StoreCatalog

    if not 10 <= args.seconds <= 3 * 3600:
        raise UsageError("--seconds must be between 10 and 10800")
    choice = choose_model(args.model)
    if choice.is_random:
        print(RANDOM_BANNER, file=sys.stderr)
    engine = open_model(choice)
    timeline = generate_timeline(args.seed, args.seconds)
    path = _library(engine).sample_path(args.seconds, args.seed, announce=lambda p: print(
        f"writing the sample video {p} ...", file=sys.stderr))
    result = _ingest_one(engine, str(path), IngestOptions())
    store = StoreCatalog(data_home()).get(result.video_id)
    states, seconds = load_states(store), np.rint(store.timestamps()).astype(int)
    print(f"model: {engine.name}")
    print(f"video: {path} ({result.frames} frames at 1 fps, id {result.video_id[:12]})")
    right = 0
    questions = make_questions(timeline, np.random.default_rng(args.seed), per_family=1)
    from vidmini.engine.generate import SamplingConfig

    sampling = SamplingConfig(max_new_tokens=8, stop_ids=engine.eos_ids)
    for q in questions:
        index = np.flatnonzero((seconds >= q.start_s) & (seconds <= q.end_s)).tolist()
        got = engine.collect(engine.answer(q.question, states.select(index), sampling), len(index)).text
        ok = got.strip().lower() == q.answer.lower()
        right += ok
        print(f"  {q.with_range():<62} model: {got:<8} truth: {q.answer:<8} {'ok' if ok else 'WRONG'}")
    print(f"{right}/{len(questions)} right")
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
    commands = {"ask": cmd_ask, "ingest": cmd_ingest, "list": cmd_list, "rm": cmd_rm, "download": cmd_download,
                "demo": cmd_demo, "search": cmd_search, "scenes": cmd_scenes, "sample": cmd_sample}
    from vidmini.summaries.batch import cmd_summarize

    commands["summarize"] = cmd_summarize
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not isinstance(e, user_error_types()):
            raise
        print(f"vidmini: error: {e}".splitlines()[0], file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
