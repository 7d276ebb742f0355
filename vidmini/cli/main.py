"""`vidmini` command line: one short command per verb — parse, make one service call, print."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from vidmini.cli.remote import RemoteService, chat_body, server_url
from vidmini.cli.speech import add_asr_options, asr_fields
from vidmini.common.errors import UsageError
from vidmini.common.timefmt import clock, span
from vidmini.service.options import (
    BACKENDS,
    CLIP_REPO,
    DEFAULT_REPO,
    DTYPE_NAMES,
    HWACCELS,
    MAX_FPS,
    MIN_FPS,
    MODES,
    PROMPT_STYLES,
    RANDOM_BANNER,
    AskOptions,
    IngestOptions,
    checked_ingest,
    user_error_types,
)


def _server_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=None, metavar="URL",
                        help="use a running `vidmini serve` (default: $VIDMINI_SERVER; its key: $VIDMINI_API_KEY)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vidmini", description="Question answering over images and long videos.")
    sub = p.add_subparsers(dest="command", required=True)

    ask = sub.add_parser("ask", help="answer a question about an image or a video file")
    ask.add_argument("media", help="image or video file")
    ask.add_argument("question")
    ask.add_argument("--model", help="checkpoint directory or Hugging Face id (default: $VIDMINI_MODEL, "
                                     "else the shipped model)")
    ask.add_argument("--max-new-tokens", type=int, default=AskOptions.max_new_tokens)
    ask.add_argument("--temperature", type=float, default=AskOptions.temperature)
    ask.add_argument("--top-p", type=float, default=AskOptions.top_p)
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
    ask.add_argument("--policy", default=AskOptions.policy,
                     help="question-time fusion: all (exact), uniform:K, retrieved:K or auto (default)")
    ask.add_argument("--prefusion-budget-gb", type=float, default=AskOptions.prefusion_budget_gb,
                     help="device memory for pre-fusion states (tier C); auto uses all frames when they fit")
    ask.add_argument("--no-cache", action="store_true",
                     help="answer the reference's way: decode the frames again and recompute everything")
    ask.add_argument("--no-speech", action="store_true",
                     help="leave the transcript's lines out of the prompt (they go in as heard speech by default)")
    ask.add_argument("--speech-tokens", type=int, default=AskOptions.speech_tokens, metavar="N",
                     help="at most N prompt tokens of heard speech, nearest the question's times first")
    ask.add_argument("--json", action="store_true", help="print one JSON object")
    ask.add_argument("--logprobs", type=int, default=0, metavar="K", help="with --json: top-K log-probs per token")
    ask.add_argument("--json-schema", default=None, metavar="FILE",
                     help="answer as JSON valid under this JSON schema (decoding is held to its grammar)")
    _server_option(ask)

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

    se = sub.add_parser("search", help="find moments by describing them (text → frames) or by words said in them")
    se.add_argument("query")
    se.add_argument("--video", default=None, help="one stored video (id or prefix); default: the whole library")
    se.add_argument("-k", type=int, default=10, help="how many moments")
    se.add_argument("--model", help="checkpoint directory or Hugging Face id (its text tower embeds the query)")
    se.add_argument("--json", action="store_true", help="one JSON object")
    _server_option(se)

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
    sv = sub.add_parser("serve", help="the HTTP API: OpenAI-compatible chat over stored videos, the library over REST")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (anything but loopback needs keys)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key-file", default=None, help="one key (or sha256:<hex> digest) per line")
    sv.add_argument("--media-root", action="append", default=[], metavar="DIR",
                    help="a folder whose files requests may name by path (repeat for several; default: none)")
    sv.add_argument("--model", help="checkpoint directory or Hugging Face id")
    sv.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    sv.add_argument("--device", default="cpu")
    sv.add_argument("--app", action="store_true",
                    help="also serve the app (the Streamlit page) at / of the same process: one model for both")
    sv.add_argument("--max-upload-mb", type=int, default=16 << 10, help="largest upload taken (413 beyond)")
    sv.add_argument("--max-pending", type=int, default=32, help="questions in flight at once (429 beyond)")
    sv.add_argument("--rate-limit", type=int, default=None, metavar="N",
                    help="requests per minute per key (per client address without keys); default: none")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="a web origin browsers may call the API from (repeat; default: none)")
    sv.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="serve on Ray Serve: local (start Ray here), auto (this machine's cluster) or ray://host:port")
    sv.add_argument("--replicas", type=int, default=None, metavar="N",
                    help="model replicas on Ray Serve (default 1); a video's requests stay on one replica")
    sv.add_argument("--replica-cpus", type=float, default=1.0, metavar="N", help="CPUs per replica (default 1)")
    sv.add_argument("--replica-gpus", type=float, default=0.0, metavar="N",
                    help="GPUs per replica (default 0; > 0 runs the replica's model on its GPU)")
    sv.add_argument("--no-watches", action="store_true",
                    help="do not run the data home's live watches (`vidmini watch`) here; by default the server "
                         "runs them and serves their alerts at /v1/watches")
    mc = sub.add_parser("mcp", help="the MCP server over stdio (Model Context Protocol): the library as tools")
    mc.add_argument("--media-root", action="append", default=[], metavar="DIR",
                    help="a folder whose files add_video may name by path (repeat for several; default: none)")
    mc.add_argument("--model", help="checkpoint directory or Hugging Face id")
    mc.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32")
    mc.add_argument("--device", default="cpu")

    from vidmini.cli.summarize import add_parser as add_summarize_parser
    from vidmini.cli.watch import add_parser as add_watch_parser

    add_summarize_parser(sub)
    add_watch_parser(sub)
    return p


def _ingest_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fps", type=float, default=IngestOptions.fps,
                   help=f"sampling rate, {MIN_FPS:g} to {MAX_FPS:g} frames per second")
    p.add_argument("--every-k", type=int, default=None, help="instead of --fps: every k-th frame")
    p.add_argument("--mode", choices=MODES, default=IngestOptions.mode,
                   help="exact: the frame displayed at each time; fast: within one frame, quicker")
    p.add_argument("--stream", type=int, default=None, help="video stream index (default: the main one)")
    p.add_argument("--backend", choices=BACKENDS, default=IngestOptions.backend)
    p.add_argument("--hwaccel", choices=HWACCELS, default=None,
                   help="decode on the GPU (NVDEC, pyav backend); falls back to software when unavailable")
    add_asr_options(p)


def _options(args: argparse.Namespace) -> IngestOptions:
    return checked_ingest(IngestOptions(fps=args.fps, every_k=args.every_k, mode=args.mode, stream=args.stream,
                                        backend=args.backend, hwaccel=args.hwaccel, **asr_fields(args)))


def _progress_bar(label: str):
    from tqdm import tqdm

    bar = tqdm(desc=label, unit="frame", file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(p) -> None:
        bar.total = p.total
        bar.n = p.frames_done
        bar.set_postfix_str(f"{p.rate_fps:.1f} fr/s" + (f", ETA {p.eta_s:.0f}s" if p.eta_s is not None else ""))
        bar.refresh()

    return bar, update


class _LazyBar:
    """A progress bar made when the work first reports (so that a command failing early prints only its error)."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def update(self, p) -> None:
        if self.bar is None:
            self.bar, self._update = _progress_bar(self.label)
        self._update(p)

    def __enter__(self) -> _LazyBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _library(model: str | None = None, **options):
    """The service (vidmini/service/library.py), the same one the app uses; `model` and `options` (dtype,
    device, prompt_style) choose the model it loads on first use."""
    from vidmini.common.paths import data_home
    from vidmini.service.library import Library

    return Library(data_home(), model=model, **options)


def _say_if_random(lib) -> None:
    if lib.model_choice.is_random:
        print(RANDOM_BANNER, file=sys.stderr)


def _ingest_one(lib, source: str, options: IngestOptions | None):
    """Frames and, beside them, the audio's transcript (waited for: the command ends when both are stored)."""
    with _LazyBar(Path(source).name or source) as bar:
        return lib.ingest(source, options, on_progress=bar.update, wait_transcript=True)


def cmd_ask(args: argparse.Namespace) -> int:
    from vidmini.service.asking import ask_media

    options = AskOptions(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, logprobs=args.logprobs, policy=args.policy, start=args.start, end=args.end,
                         prefusion_budget_gb=args.prefusion_budget_gb, no_cache=args.no_cache, no_store=args.no_store,
                         max_frames=args.max_frames, json_schema=_json_schema(args.json_schema),
                         speech=not args.no_speech, speech_tokens=args.speech_tokens).check()
    ingest = _options(args)
    server = server_url(args.server)
    if server is not None:
        if args.no_cache or args.no_store:
            raise UsageError("--no-cache and --no-store run locally; drop --server (or $VIDMINI_SERVER)")
        reply = RemoteService(server).ask(args.media, args.question, chat_body(options))
    else:
        lib = _library(args.model, dtype=args.dtype, device=args.device, prompt_style=args.prompt_style)
        with _LazyBar(Path(args.media).name or args.media) as bar:  # images and stored videos show none
            reply = ask_media(lib, args.media, args.question, options, ingest, on_progress=bar.update,
                              before_load=lambda: _say_if_random(lib)).to_json()
    if args.json:
        print(json.dumps(reply))
        return 0
    print(reply["answer"])
    if reply.get("moments"):
        print("moments: " + ", ".join(f"{span(m['start'], m['end'])} ({m['score']:.2f})" for m in reply["moments"]))
    for line in reply.get("heard") or ():
        print(f"heard: [{clock(line['start'])}] {line['text']}")
    where = "" if reply["range"] is None else f" from {reply['range']['start']:g}s to {reply['range']['end']:g}s"
    print(f"[{reply['model']}; {reply['frames']} frame(s){where}; policy {reply['policy']}; "
          f"first token {reply['ttft_ms']:.1f} ms; {reply['tokens_per_s']:.1f} tok/s]", file=sys.stderr)
    return 0


def _json_schema(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        schema = json.loads(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"cannot read --json-schema {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UsageError(f"--json-schema {path} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise UsageError(f"--json-schema {path} must hold a JSON object (a schema)")
    return schema


def cmd_ingest(args: argparse.Namespace) -> int:
    options = _options(args)
    lib = _library(args.model, dtype=args.dtype, device=args.device)
    _say_if_random(lib)
    failures = 0
    for source in args.sources:
        try:
            result = _ingest_one(lib, source, options)  # the first loads the model while its frames decode
        except Exception as e:
            if not isinstance(e, user_error_types()) or not lib.model_loaded:
                raise  # a model that does not load is one error for the whole command
            failures += 1  # one bad input does not stop the others
            print(f"vidmini: error: {e}".splitlines()[0], file=sys.stderr)
            if args.json:
                print(json.dumps({"source": source, "error": str(e).splitlines()[0]}))
            continue
        if args.json:
            print(json.dumps({"id": result.video_id, "source": source, "frames": result.frames,
                              "duration": result.duration_s, "gaps": result.gaps, "store": result.store_path,
                              "seconds": round(result.seconds, 3), "reused": result.reused,
                              "resumed_from": result.resumed_from,
                              "transcript": result.extra.get("transcript", {"state": "none"})}), flush=True)
        else:
            state = "reused" if result.reused else f"{result.frames} frames in {result.seconds:.1f}s"
            gaps = f", gaps {result.gaps}" if result.gaps else ""
            heard = result.extra.get("transcript", {}).get("state")
            heard = f", transcript {heard.replace('_', ' ')}" if heard and heard != "none" else ""
            print(f"{result.video_id}  {source}  ({state}{gaps}{heard})", flush=True)
    return 2 if failures else 0


def cmd_list(args: argparse.Namespace) -> int:
    from vidmini.service.library import video_fp_of

    lib = _library()
    infos = lib.stored()
    rows = [_info_dict(i) | {"transcript": lib.transcript_state(video_fp_of(i.video_id))["state"]} for i in infos]
    if args.json:
        print(json.dumps(rows))
        return 0
    for d in rows:
        status = "complete" if d.get("complete") else "incomplete"
        heard = "" if d["transcript"] == "none" else f"  transcript {d['transcript'].replace('_', ' ')}"
        print(f"{d.get('video_id')}  {d.get('frames')} frames  {status}{heard}  {d.get('source')}")
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
    from vidmini.service.library import LibraryError

    if args.k < 1:
        raise UsageError("-k must be at least 1")
    if not args.query.strip():
        raise UsageError("empty search query")
    server = server_url(args.server)
    if server is not None:
        found = RemoteService(server).search(args.query, args.video, args.k)
    else:
        lib = _library(args.model)
        try:
            moments = lib.search(args.query, args.video, args.k, curve=False).moments
        except LibraryError as e:
            raise UsageError(str(e)) from None
        found = {"query": args.query, "video": args.video, "model": lib.model_info().name,
                 "moments": [m.to_json() for m in moments]}
    if args.json:
        print(json.dumps(found))
        return 0
    if not found["moments"]:
        print("no matching moments")
    for m in found["moments"]:
        source = m.get("source", "seen")
        where = f"best frame at {clock(m['time'])}" if source != "heard" else f"said at {clock(m['time'])}"
        said = f'  "{m["text"]}"' if m.get("text") else ""
        print(f"{m['score']:.3f}  {m['video_id'][:16]}  {span(m['start'], m['end'])}  {source:5}  ({where}){said}")
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


def _announce(path: Path) -> None:
    print(f"writing the sample video {path} ...", file=sys.stderr)


def cmd_sample(args: argparse.Namespace) -> int:
    """The sample synthetic video in the library (the app's `make run` calls this): made and ingested once."""
    lib = _library(args.model)
    _say_if_random(lib)
    path = lib.sample_path(announce=_announce)
    result = _ingest_one(lib, str(path), None)
    print(f"{result.video_id}  {path}  ({'already in the library' if result.reused else f'{result.frames} frames'})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The offline end-to-end demo: a synthetic video (made once), ingested, and one question per family."""
    from vidmini.service.demo_quiz import run_demo_quiz

    lib = _library(args.model)
    _say_if_random(lib)
    with _LazyBar("demo video") as bar:
        quiz = run_demo_quiz(lib, args.seconds, args.seed, on_progress=bar.update, announce=_announce)
    print(f"model: {quiz.model}")
    print(f"video: {quiz.path} ({quiz.frames} frames at 1 fps, id {quiz.video_id[:12]})")
    for line in quiz.lines:
        print(f"  {line.question:<62} model: {line.answer:<8} truth: {line.truth:<8} {'ok' if line.right else 'WRONG'}")
    print(f"{sum(line.right for line in quiz.lines)}/{len(quiz.lines)} right")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import dataclasses

    from vidmini.api.server import ServeConfig, serve
    from vidmini.common.keys import ApiKeys

    keys = ApiKeys.from_file(args.api_key_file) if args.api_key_file else None
    roots = [Path(r).expanduser() for r in args.media_root]
    for root in roots:
        if not root.is_dir():
            raise UsageError(f"--media-root {root} is not a folder")
    config = ServeConfig(args.host, args.port, keys, roots, max_upload_bytes=args.max_upload_mb << 20,
                         max_pending=args.max_pending, rate_per_minute=args.rate_limit,
                         cors_origins=args.cors_origin, watches=not args.no_watches).check()
    lib = _library(args.model, dtype=args.dtype, device=args.device)
    _say_if_random(lib)
    if args.ray_address is not None or args.replicas is not None:
        from vidmini.service.watches import WatchFolders

        if not args.no_watches and WatchFolders(lib.root).names():
            print("vidmini: the watches do not run on Ray Serve's replicas; run `vidmini watch run` beside it",
                  file=sys.stderr, flush=True)
        return _serve_on_ray(args, lib, dataclasses.replace(config, watches=False))
    ui = _app_for(lib, args.api_key_file) if args.app else None
    print(f"vidmini serving on http://{args.host}:{args.port} (OpenAI base URL: http://{args.host}:{args.port}/v1)"
          + (f"; the app at http://{args.host}:{args.port}/" if ui is not None else ""), file=sys.stderr, flush=True)
    serve(lib, config, ui)
    return 0


def _serve_on_ray(args: argparse.Namespace, lib, config) -> int:
    """`vidmini serve --ray-address ADDR --replicas N`: the same API on Ray Serve (vidmini/api/ray_serve.py)."""
    from vidmini.api.ray_serve import RayOptions, serve_on_ray

    if args.ray_address is None:
        raise UsageError("--replicas needs --ray-address (local, auto or ray://host:port)")
    if args.app:
        raise UsageError("--app serves the page from one process; it does not combine with --ray-address")
    replicas = 1 if args.replicas is None else args.replicas
    options = RayOptions(args.ray_address, replicas, args.replica_cpus, args.replica_gpus).check()
    url = f"http://{args.host}:{args.port}"

    def ready() -> None:
        print(f"vidmini serving on {url} (OpenAI base URL: {url}/v1) with {options.replicas} replica(s) on Ray "
              f"({options.address})", file=sys.stderr, flush=True)

    serve_on_ray(lib.root, config, options, args.model, args.dtype, args.device, ready=ready)
    return 0


def _app_for(lib, key_file: str | None):
    """The Streamlit app over this command's Library (shared as the process's one), asking for a key when the API
    has keys."""
    from vidmini.service.library import share_library
    from vidmini.ui.app import KEY_FILE_ENV, make_app
    from vidmini.ui.watches import IN_SERVE_ENV

    share_library(lib)
    if key_file:
        os.environ[KEY_FILE_ENV] = str(Path(key_file).resolve())
    os.environ[IN_SERVE_ENV] = "1"  # serve runs the watches (or not, with --no-watches); the page does not
    return make_app()


def cmd_mcp(args: argparse.Namespace) -> int:
    """MCP over stdio: stdout carries only protocol messages (everything else goes to stderr)."""
    from vidmini.api.mcp_server import run_stdio

    roots = [Path(r).expanduser() for r in args.media_root]
    for root in roots:
        if not root.is_dir():
            raise UsageError(f"--media-root {root} is not a folder")
    lib = _library(args.model, dtype=args.dtype, device=args.device)
    _say_if_random(lib)
    run_stdio(lib, roots)
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from vidmini.service.models import download

    print(download(args.model_id, args.vision_tower))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {"ask": cmd_ask, "ingest": cmd_ingest, "list": cmd_list, "rm": cmd_rm, "download": cmd_download,
                "demo": cmd_demo, "search": cmd_search, "scenes": cmd_scenes, "sample": cmd_sample,
                "serve": cmd_serve, "mcp": cmd_mcp}
    from vidmini.cli.summarize import cmd_summarize
    from vidmini.cli.watch import cmd_watch

    commands["summarize"], commands["watch"] = cmd_summarize, cmd_watch
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if not isinstance(e, user_error_types()):
            raise
        print(f"vidmini: error: {e}".splitlines()[0], file=sys.stderr)
        return 2


def run() -> None:
    """The `vidmini` command. A command that loaded torch would spend ~1.2 s more tearing the interpreter down
    (torch's and transformers' modules and thread pools); by then every store and output file is committed
    (atomic renames, fsync) and every worker has been joined, so the process flushes its streams and leaves."""
    code = main()
    if "torch" in sys.modules:
        import logging
        import os

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
