"""`vidmini summarize`: its parser and its command (parse → one service call → print)."""

from __future__ import annotations

import argparse
import json

from vidmini.cli.remote import RemoteLibrary, RemoteService, server_url
from vidmini.cli.speech import add_asr_options, asr_fields
from vidmini.common.errors import UsageError
from vidmini.service.options import BACKENDS, DTYPE_NAMES, IngestOptions, checked_ingest


def add_parser(sub) -> None:
    from vidmini.service.summaries import FORMATS, MODES, SUBTITLES

    p = sub.add_parser("summarize", help="summarize files and folders of video: chapters, event logs, timelines")
    p.add_argument("paths", nargs="+", metavar="PATH", help="video files or folders (searched recursively)")
    p.add_argument("--mode", choices=MODES, default="general")
    p.add_argument("--format", dest="formats", action="append", choices=FORMATS,
                   help="output format; repeat for several (default: md and json)")
    p.add_argument("--out", default="summaries", help="output folder (default: ./summaries); holds manifest.json")
    p.add_argument("--window", type=float, default=None,
                   help="seconds per window (default 60; surveillance: 10, the coarse scan before per-frame refining)")
    p.add_argument("--events", nargs="+", default=[], metavar="EVENT", help='surveillance: e.g. "a person enters"')
    p.add_argument("--fps", type=float, default=IngestOptions.fps, help="ingest sampling rate")
    p.add_argument("--backend", choices=BACKENDS, default=IngestOptions.backend, help="ingest decoder")
    add_asr_options(p)
    p.add_argument("--subtitles", choices=SUBTITLES, default="auto",
                   help="what srt/vtt hold: the speech (the transcript, one cue per line spoken) or the summary's "
                        "chapters/events/timeline; auto: the speech when the video has any")
    p.add_argument("--model", help="checkpoint directory or Hugging Face id")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
    p.add_argument("--ray", action="store_true", help="run on a local Ray instance")
    p.add_argument("--ray-address", default=None, metavar="ADDR", help="run on an existing Ray cluster (host:port)")
    p.add_argument("--workers", type=int, default=None, help="Ray actors (default: one per GPU, else per CPU)")
    p.add_argument("--json", action="store_true", help="print the batch report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--server", default=None, metavar="URL",
                   help="ingest and summarize on a running `vidmini serve` (default: $VIDMINI_SERVER; its key: "
                        "$VIDMINI_API_KEY); the same files are written here")


def cmd_summarize(args: argparse.Namespace) -> int:
    from vidmini.service.summaries import BatchOptions, SummarizeOptions, run_batch

    speech = asr_fields(args)
    checked_ingest(IngestOptions(fps=args.fps, backend=args.backend, **speech))
    try:
        summarize = SummarizeOptions(args.mode, args.window, tuple(args.events))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.events and args.mode != "surveillance":
        raise UsageError("--events apply to --mode surveillance")
    if args.workers is not None and args.workers < 1:
        raise UsageError("--workers must be >= 1")
    options = BatchOptions(summarize, tuple(dict.fromkeys(args.formats or ["md", "json"])), args.model,
                           args.device, args.dtype, args.fps, args.backend, subtitles=args.subtitles, **speech)
    server = server_url(args.server)
    if server is not None:
        if args.ray or args.ray_address or args.workers is not None:
            raise UsageError("--ray, --ray-address and --workers run locally; drop --server (or $VIDMINI_SERVER)")
        if args.model:
            raise UsageError("--model: the server summarizes with its own model; drop --model or --server")
        remote = RemoteService(server)
        remote.check()  # a server that is down, or a wrong key, is one error before any input
        report = run_batch(args.paths, args.out, options, library=RemoteLibrary(remote), progress=not args.quiet)
    else:
        report = run_batch(args.paths, args.out, options, ray=args.ray, ray_address=args.ray_address,
                           workers=args.workers, progress=not args.quiet)
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"{len(report.done)} summarized, {len(report.skipped)} already done, {len(report.failed)} failed "
              f"→ {args.out}")
    return 2 if report.failed else 0
