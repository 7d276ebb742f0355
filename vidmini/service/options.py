"""What a face may ask for, with every default stated once: how to answer (`AskOptions`), how to ingest
(`IngestOptions`), the model options' names. Importable without torch, so parsers show them and light verbs
start fast."""

from __future__ import annotations

from dataclasses import dataclass, replace

from vidmini.common.errors import UsageError
from vidmini.engine.names import CLIP_REPO, DEFAULT_REPO, DTYPE_NAMES, PROMPT_STYLES, RANDOM_BANNER
from vidmini.engine.speech_prompt import DEFAULT_SPEECH_TOKENS
from vidmini.ingest.options import (
    ASR_BACKENDS,
    BACKENDS,
    DEFAULT_ASR,
    HWACCELS,
    LIVE_CHUNK_FRAMES,
    MAX_FPS,
    MIN_FPS,
    MODES,
    IngestOptions,
)

__all__ = ["ASR_BACKENDS", "BACKENDS", "CLIP_REPO", "DEFAULT_ASR", "DEFAULT_REPO", "DTYPE_NAMES", "HWACCELS", "LIVE_CHUNK_FRAMES", "MAX_FPS",
           "MIN_FPS", "MODES", "PROMPT_STYLES", "RANDOM_BANNER", "AskOptions", "IngestOptions", "checked_ingest",
           "user_error_types"]

POLICY_HELP = "all (exact), uniform:K, retrieved:K or auto"


@dataclass(frozen=True)
class AskOptions:
    """How to answer a question; these defaults are every face's (CLI, app, API)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    logprobs: int = 0
    policy: str = "auto"
    start: str | float | None = None
    end: str | float | None = None
    prefusion_budget_gb: float = 1.0  # device memory for a question's pre-fusion states (tier C)
    no_cache: bool = False  # the reference's one pass over freshly decoded frames (a baseline)
    no_store: bool = False  # decode and encode in memory; store nothing
    max_frames: int | None = None  # with no_store: stop after N frames
    json_schema: dict | None = None  # the answer is a JSON document valid under this schema (llguidance)
    speech: bool = True  # the transcript's lines of the range go into the prompt as heard speech (when there is one)
    speech_tokens: int = DEFAULT_SPEECH_TOKENS  # at most this many prompt tokens of heard speech

    def check(self) -> AskOptions:
        """Raise UsageError on options no answer can run with; return self."""
        if self.logprobs < 0 or self.max_new_tokens < 0:
            raise UsageError("logprobs and max-new-tokens must be >= 0")
        if self.prefusion_budget_gb <= 0:
            raise UsageError("prefusion-budget-gb must be > 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise UsageError("temperature must be >= 0 and top-p in (0, 1]")
        if self.max_frames is not None and self.max_frames < 1:
            raise UsageError("max-frames must be >= 1")
        if self.json_schema is not None and not isinstance(self.json_schema, dict):
            raise UsageError("json-schema must be a JSON object")
        if not isinstance(self.speech, bool) or isinstance(self.speech_tokens, bool) \
                or not isinstance(self.speech_tokens, int) or self.speech_tokens < 0:
            raise UsageError("speech must be true or false and speech-tokens an integer >= 0")
        return self

    def with_range(self, start: str | float | None, end: str | float | None) -> AskOptions:
        return replace(self, start=start, end=end)


def checked_ingest(options: IngestOptions) -> IngestOptions:
    """`options.check()` with its complaint as a UsageError (a face's bad input, one line)."""
    try:
        return options.check()
    except ValueError as e:
        raise UsageError(str(e)) from None


def user_error_types() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input, reported as one line (exit 2). Only the modules a command actually
    loaded are consulted: an error class of a module never imported cannot have been raised, and importing it
    here would make every light command pay for torch and transformers."""
    import sys

    types: list[type[BaseException]] = [UsageError, FileNotFoundError]
    for module, name in (("vidmini.engine.checkpoint", "CheckpointError"), ("vidmini.ingest.errors", "IngestError"),
                         ("vidmini.service.library", "LibraryError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            types.append(getattr(loaded, name))
    return tuple(types)
