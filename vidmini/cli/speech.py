"""The audio options every ingesting command takes (`ingest`, `ask`, `summarize`): which recognizer transcribes
the audio track beside the frames, with which model and language, or none. Checked here, one line on bad input."""

from __future__ import annotations

import argparse
from pathlib import Path

from vidmini.common.errors import UsageError
from vidmini.service.options import ASR_BACKENDS, DEFAULT_ASR


def add_asr_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--asr", default=None, metavar="|".join(ASR_BACKENDS),
                   help=f"transcribe the audio track beside the frames (default {DEFAULT_ASR}: offline, English; "
                        "whisper: any language, best on a GPU; none: no transcript)")
    p.add_argument("--asr-model", default=None, metavar="PATH_OR_ID",
                   help="whisper: a local model folder or a Hugging Face id already in the local cache")
    p.add_argument("--language", default=None, metavar="CODE", help="the spoken language, e.g. en (default: the "
                                                                     "recognizer's: English, or Whisper's detection)")
    p.add_argument("--no-audio", action="store_true", help="ignore the audio track (the same as --asr none)")
    p.add_argument("--asr-workers", type=int, default=None, metavar="N",
                   help="processes recognizing the audio at once, each on one core at a lower priority than the "
                        "frames (default: one per core for pocketsphinx, 1 for whisper)")


def asr_fields(args: argparse.Namespace) -> dict:
    """`asr`, `asr_model`, `language` and `asr_workers` for IngestOptions, from the flags (contradictions are
    UsageErrors)."""
    asr = args.asr.strip().lower() if args.asr is not None else None
    if asr is not None and asr not in ASR_BACKENDS:
        raise UsageError(f"--asr must be one of {', '.join(ASR_BACKENDS)}, got {args.asr!r}")
    if args.no_audio and asr not in (None, "none"):
        raise UsageError(f"--no-audio and --asr {asr} contradict each other; give one")
    if args.asr_model is not None:
        if asr not in (None, "whisper") or args.no_audio:
            raise UsageError("--asr-model is a Whisper model: use it with --asr whisper")
        asr = "whisper"
        name = args.asr_model
        hub_id = name.count("/") == 1 and not name.startswith(("/", ".", "~"))
        if not hub_id and not Path(name).expanduser().exists():
            raise UsageError(f"--asr-model {args.asr_model}: no such folder (give a model folder or a Hugging Face "
                             "id owner/name)")
    if asr == "whisper" and args.asr_model is None:  # refused before anything is ingested, not after the frames
        raise UsageError("--asr whisper needs --asr-model: a local model folder or a Hugging Face id already in the "
                         "local cache (nothing is downloaded)")
    if args.asr_workers is not None and args.asr_workers < 1:
        raise UsageError(f"--asr-workers must be >= 1, got {args.asr_workers}")
    if args.no_audio:
        asr = "none"
    if args.language is not None and (asr or DEFAULT_ASR) == "none":
        raise UsageError("--language applies to a transcript; drop it or --no-audio")
    model = str(Path(args.asr_model).expanduser()) if args.asr_model and Path(args.asr_model).expanduser().exists() \
        else args.asr_model
    return {"asr": asr or DEFAULT_ASR, "asr_model": model, "language": args.language, "asr_workers": args.asr_workers}
