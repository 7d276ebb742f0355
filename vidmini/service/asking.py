"""A question about a file, an image or a stored video, answered through the library: what `vidmini ask` calls.

The face parses its input into `AskOptions` (and the ingest's `IngestOptions`), makes this one call and prints
the `AskReply`; everything in between — deciding image, stored video or new file, ingesting it (resumable, into
the same stores the app uses), opening a session, the reference one-pass path, the heard speech in the prompt,
the "when" moments and the transcript lines that answer a question about the speech — is here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vidmini.common.errors import UsageError
from vidmini.engine.timerange import times_in_question
from vidmini.service.options import AskOptions, checked_ingest

__all__ = ["AskOptions", "AskReply", "ask_media", "reply_of", "times_in_question"]

if TYPE_CHECKING:
    from vidmini.ingest.job import Progress
    from vidmini.ingest.options import IngestOptions
    from vidmini.service.library import AskResult, Library


@dataclass
class AskReply:
    """The answer and what it used; `to_json()` is the one JSON shape of an answer."""

    answer: str
    token_ids: list[int]
    timestamps: list[float]
    result: dict[str, Any]
    encode_ms: float
    model: str
    video_id: str | None
    random_weights: bool
    logprobs: list | None = None
    moments: list | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    heard: list | None = None  # a question about the speech: the transcript lines that answer it (best first)

    def to_json(self) -> dict[str, Any]:
        r = self.result
        out = {
            "answer": self.answer,
            "token_ids": self.token_ids,
            "frames": len(self.timestamps),
            "timestamps": [float(t) for t in self.timestamps],
            "frame_indices": r["frame_indices"],
            "fused_frames": r["fused_frames"],
            "range": r["range"],
            "policy": r["policy"],
            "policy_requested": r["policy_requested"],
            "exact_prefix": r["exact_prefix"],
            "packed_from": r["packed_from"],
            "ttft_ms": round(r["ttft_ms"], 3),
            "tokens_per_s": round(r["tokens_per_s"], 3),
            "encode_ms": round(self.encode_ms, 3),
            "model": self.model,
            "video_id": self.video_id,
            "random_weights": self.random_weights,
        }
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.moments is not None:
            out["moments"] = [m.to_json() for m in self.moments]
        out["speech"] = [dict(line) for line in r.get("speech", [])]  # the heard speech the prompt carried
        out["speech_tokens"] = r.get("speech_tokens", 0)
        if self.heard is not None:
            out["heard"] = self.heard
        return out


def _is_image(path: str) -> bool:
    from vidmini.ingest.simple_decode import MediaError, media_kind

    try:
        return media_kind(path) == "image"
    except MediaError:
        return False  # reported with the usual message when the media is read


def ask_media(library: Library, media: str, question: str, options: AskOptions, ingest: IngestOptions,
              on_progress: Callable[[Progress], None] | None = None,
              before_load: Callable[[], None] | None = None) -> AskReply:
    """Answer `question` about `media`: an image, a video file (ingested into the library first unless
    `no_store`) or a stored video's id. Bad input raises UsageError (or the decoder's error) before the model
    loads where it can; `before_load()` runs just before the model loads (not at all when it is loaded)."""
    from vidmini.engine.session import Policy, VideoSession
    from vidmini.engine.speech_prompt import lines_for, speech_cost, with_speech
    from vidmini.engine.timerange import choose_range
    from vidmini.ingest.simple_decode import media_kind
    from vidmini.service.heard import heard_answer, speech_context

    options.check()
    checked_ingest(ingest)
    try:
        Policy.parse(options.policy)
        explicit = choose_range(question, options.start, options.end)
    except ValueError as e:
        raise UsageError(str(e)) from None
    is_image = Path(media).exists() and _is_image(media)
    if is_image:
        if options.start is not None or options.end is not None:
            raise UsageError("--from/--to apply to videos, not images")
        explicit = None  # times written in a question about an image are not ranges
    stored, kind = None, None
    if not Path(media).exists():
        try:
            stored = library.stores.get(media)  # a stored video's id
        except KeyError:
            raise UsageError(f"no such file or stored video: {media}") from None
    else:
        kind = media_kind(media)  # bad media fails before the model loads
    if before_load is not None and not library.model_loaded:
        before_load()
    engine = library.engine
    from vidmini.engine.generate import SamplingConfig

    grammar = None
    if options.json_schema is not None:
        from vidmini.engine.constrained import JsonConstraint

        try:
            grammar = JsonConstraint(engine.tokenizer, options.json_schema, engine.eos_ids)
        except ValueError as e:  # a schema llguidance cannot compile
            raise UsageError(str(e)) from None
    sampling = SamplingConfig(max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                              top_p=options.top_p, stop_ids=engine.eos_ids, logprobs=options.logprobs,
                              seed=options.seed, grammar=grammar)
    t0 = time.perf_counter()
    video_id = stored.video_id if stored is not None else None
    if options.no_cache:
        try:
            pixels, timestamps = _reference_frames(engine, media, options, stored, kind, ingest, explicit)
        except ValueError as e:
            raise UsageError(str(e)) from None
        encode_ms = 0.0  # the reference encodes inside every question: counted in ttft_ms
        speech = None if is_image else speech_context(library, video_id, options, source=media)
        spoken = [] if speech is None else lines_for(engine.tokenizer, question, explicit, speech,
                                                     style=engine.prompt_style)
        answer = engine.collect(engine.forward_full(pixels, with_speech(question, spoken), sampling),
                                frames=len(timestamps))
        frames = list(range(len(timestamps)))
        result = {"answer": answer.text, "token_ids": answer.token_ids, "policy": "reference",
                  "policy_requested": options.policy, "frame_indices": frames, "fused_frames": frames,
                  "range": None if explicit is None else {"start": explicit.start, "end": explicit.end,
                                                          "source": explicit.source},
                  "ttft_ms": answer.ttft_ms, "tokens_per_s": answer.tokens_per_s, "logprobs": answer.logprobs,
                  "exact_prefix": True, "prefix_cosine": 1.0, "packed_from": None,
                  "speech": [line.to_json() for line in spoken],
                  "speech_tokens": speech_cost(engine.tokenizer, question, spoken, engine.prompt_style)}
    else:
        budget = int(options.prefusion_budget_gb * 2**30)
        if stored is None and (kind == "image" or options.no_store):
            pixels, timestamps = _read_media(engine, media, ingest.fps, options.max_frames)
            session = VideoSession.from_states(engine, engine.encode_frames(pixels), timestamps,
                                               prefusion_budget_bytes=budget)
        else:
            from vidmini.index.search import frame_picker
            from vidmini.store.session import open_store_session

            if stored is None:
                # with speech on, the transcript is waited for: the prompt carries the whole range's speech
                stored = library.stores.get(library.ingest(media, ingest, on_progress=on_progress,
                                                           wait_transcript=options.speech).video_id)
                video_id = stored.video_id
            session = open_store_session(engine, stored, prefusion_budget_bytes=budget,
                                         picker=frame_picker(library.searcher, stored.video_id))
        encode_ms = (time.perf_counter() - t0) * 1000
        speech = None if is_image else speech_context(library, video_id, options, source=media)
        try:
            got = session.ask(question, options.start, options.end, options.policy, sampling,
                              question_times=not is_image, speech=speech).result()
        except ValueError as e:
            raise UsageError(str(e)) from None
        timestamps = got.timestamps
        result = got.to_json()
        result["answer"] = result.pop("text")
        result["frame_indices"] = result.pop("frames")
    moments, heard_lines = None, None
    if video_id is not None:
        moments = library.when_moments(question, video_id, result["range"], 5) or None
        heard_lines = heard_answer(library, question, video_id, result["range"]) or None
    choice = library.model_choice
    return AskReply(result["answer"], result["token_ids"], list(timestamps), result, encode_ms, engine.name, video_id,
                    bool(choice and choice.is_random), result["logprobs"] if options.logprobs else None, moments,
                    heard=heard_lines)


def _read_media(engine, path: str, fps: float, max_frames: int | None):
    from vidmini.ingest.simple_decode import load_image, media_kind, sample_frames

    if not Path(path).exists():
        raise UsageError(f"no such file: {path}")
    if media_kind(path) == "image":
        return engine.image_pixels(load_image(path)), [0.0]
    sampled = sample_frames(path, fps=fps, max_frames=max_frames)
    return engine.frame_pixels(sampled.frames), sampled.timestamps


def _reference_frames(engine, media: str, options: AskOptions, stored, kind, ingest, time_range):
    """no_cache: the frames decoded again from the source (a stored video's own file and sampling), cut to the
    range; returns pixels and timestamps."""
    from vidmini.ingest.sampler import FrameSampler

    if kind == "image" or (stored is None and options.no_store):
        pixels, timestamps = _read_media(engine, media, ingest.fps, options.max_frames)
    else:
        source, sampling = media, {"fps": ingest.fps, "every_k": ingest.every_k, "mode": ingest.mode,
                                   "stream": ingest.stream}
        if stored is not None:
            meta = stored.manifest["meta"]
            source, sampling = meta["source"], meta["sampling"]
            if not Path(source).exists():
                raise UsageError(f"--no-cache needs the stored video's source file, which is gone: {source}")
        bounds = {} if time_range is None else {"start": time_range.start, "end": time_range.end + 1e-3}
        frames = list(FrameSampler(source, fps=None if sampling["every_k"] else sampling["fps"],
                                   every_k=sampling["every_k"], mode=sampling["mode"], stream=sampling["stream"],
                                   backend=ingest.backend, **bounds))
        if not frames:
            raise UsageError("no frames decoded in that range")
        pixels, timestamps = engine.frame_pixels([f.image for f in frames]), [f.t for f in frames]
    if time_range is None:
        return pixels, timestamps
    picked = time_range.frame_span(timestamps)
    return pixels[picked.start : picked.stop], [timestamps[i] for i in picked]


def reply_of(library: Library, result: AskResult, logprobs: bool = False, encode_ms: float = 0.0) -> AskReply:
    """A `Library.ask` result in the one answer shape (`AskReply`), so the HTTP API and a `--server` CLI print
    what a local `vidmini ask --json` prints. `encode_ms`: the time to open the video's session, when known."""
    r = result.answer.to_json()
    r["answer"] = r.pop("text")
    r["frame_indices"] = r.pop("frames")
    choice = library.model_choice
    return AskReply(r["answer"], r["token_ids"], [float(t) for t in result.answer.timestamps], r, encode_ms,
                    library.engine.name, result.video_id, bool(choice and choice.is_random),
                    r["logprobs"] if logprobs else None, result.moments or None, heard=result.heard or None)
