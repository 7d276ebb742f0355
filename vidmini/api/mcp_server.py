"""The MCP face (Model Context Protocol, the official `mcp` SDK 2.x): the library as tools an assistant can call.

Tools: `list_videos`, `get_video`, `add_video` (a server path under a media root, or a stream URL; waits for the
ingest), `ask` (the answer, with the frames' times and the range as structured output), `search_moments` and
`summarize`. A failure the caller can fix (an unknown video, a path outside the media roots, a bad option) comes
back as a tool error (`isError`) with a one-line message; anything else as the SDK's generic tool error, never a
crash of the server.

Transports: `run_stdio` (the `vidmini mcp` verb; stdout carries only protocol messages: while serving, the SDK
points fd 1 at stderr) and `mcp_http_app`, a Starlette app for streamable HTTP that `vidmini serve` mounts at
`/mcp`. A mounted app's lifespan does not run by itself: the parent app must run `app.router.lifespan_context`
(the SDK's session manager) as its own lifespan.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, Field, ValidationError
from starlette.applications import Starlette

from vidmini.common.errors import one_line
from vidmini.common.keys import is_loopback
from vidmini.common.timefmt import span
from vidmini.service.library import Library, LibraryError, VideoRow
from vidmini.service.options import AskOptions
from vidmini.service.summaries import MODES, SummarizeOptions

VIDEO_SCHEME = "vidmini://"
STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "srt://", "udp://", "http://", "https://")
ADD_WAIT_S = 600.0  # add_video's default wait for the ingest to finish

INSTRUCTIONS = (
    "vidmini answers questions about long videos. Add a video with add_video (a file under the server's media "
    "folders, or a stream URL), find it with list_videos, then ask about it (optionally over a time range), "
    "search_moments to find when something happens, or summarize it. Videos are named by id (or vidmini://<id>)."
)


# ---- structured outputs ---------------------------------------------------------------------------------------
class Video(BaseModel):
    id: str | None = Field(description="the video's id (None while an ingest has not stored anything yet)")
    name: str
    source: str
    status: str = Field(description="ready | ingesting | queued | failed | incomplete | cancelled")
    frames: int
    duration: float | None = Field(description="seconds")
    fraction: float | None = Field(None, description="ingest progress, 0..1")
    error: str | None = None
    model_id: str = ""
    transcript: str = Field("none", description="the audio's transcript: none | running | incomplete | complete | "
                                                "no_audio | failed")


class VideoDetail(Video):
    summary: str | None = Field(None, description="the stored summary, when one was written")


class VideoList(BaseModel):
    videos: list[Video]


class TimeSpan(BaseModel):
    start: float
    end: float


class Moment(BaseModel):
    video_id: str
    start: float
    end: float
    time: float = Field(description="the best frame's time (seconds); heard, both: when the words were said")
    score: float
    source: str = Field("seen", description="seen (the frames match), heard (the words were said) or both")
    text: str | None = Field(None, description="heard, both: what was said")


class Answer(BaseModel):
    answer: str
    video_id: str
    range: TimeSpan | None = Field(description="the time range asked over (None: the whole video)")
    frames: list[int] = Field(description="indices of the frames the answer saw")
    timestamps: list[float] = Field(description="those frames' times in seconds")
    policy: str
    moments: list[Moment] = Field(default_factory=list, description='for "when ..." questions: matching moments')


class Moments(BaseModel):
    query: str
    video_id: str | None
    moments: list[Moment]


class Chapter(BaseModel):
    start: float
    end: float
    title: str
    summary: list[str]


class Event(BaseModel):
    event: str
    start: float
    end: float
    confidence: float


class Summary(BaseModel):
    video_id: str
    mode: str
    model: str
    duration: float
    summary: str
    chapters: list[Chapter]
    events: list[Event]


# ---- helpers ----------------------------------------------------------------------------------------------------
@contextmanager
def _tool_errors() -> Iterator[None]:
    """The library's complaints (LibraryError, UsageError and other ValueErrors, timeouts) as tool errors, one
    line each."""
    try:
        yield
    except ToolError:
        raise
    except (ValueError, TimeoutError, FileNotFoundError, PermissionError) as e:
        raise ToolError(one_line(e)) from None


def _ref(video_id: str) -> str:
    ref = video_id.strip()
    return ref[len(VIDEO_SCHEME):] if ref.startswith(VIDEO_SCHEME) else ref


def _video(row: VideoRow) -> Video:
    return Video(id=row.video_id, name=row.name, source=row.source, status=row.status, frames=row.frames,
                 duration=row.duration, fraction=row.fraction, error=row.error, model_id=row.model_id,
                 transcript=row.transcript)


def _moment(m) -> Moment:
    return Moment(video_id=m.video_id, start=float(m.start), end=float(m.end), time=float(m.time),
                  score=round(float(m.score), 4), source=getattr(m, "source", "seen"), text=getattr(m, "text", None))


def allowed_path(roots: list[Path], source: str) -> Path:
    """`source` resolved (links followed), when it is a file under one of `roots`; else a tool error."""
    if not roots:
        raise ToolError("this server has no media root: it adds only stream URLs (start it with --media-root DIR)")
    real = Path(source.removeprefix("file://")).expanduser().resolve()
    if not any(real.is_relative_to(root.expanduser().resolve()) for root in roots):
        raise ToolError(f"{source} is not under a media root of this server")
    if not real.is_file():
        raise ToolError(f"no such file on the server: {source}")
    return real


def _preload(library: Library) -> None:
    try:
        library.engine  # noqa: B018 - load now, not in the first call
    except Exception as e:  # noqa: BLE001 - the first tool that needs the model reports it again
        print(f"vidmini: error: the model failed to load: {one_line(e)}", file=sys.stderr, flush=True)


# ---- the server -------------------------------------------------------------------------------------------------
class _Server(MCPServer):
    """The SDK's server, with arguments that fail the input schema reported on one line (pydantic's report is
    several, with a link)."""

    async def call_tool(self, name, arguments, context=None):
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as e:
            cause = e.__cause__
            if isinstance(e, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                                 for err in cause.errors())
            raise ToolError(f"Error executing tool {name}: invalid arguments: {problems}") from cause


def build_mcp(library: Library, media_roots: list[Path] | list[str] | None = None, *,
              preload: bool = False) -> MCPServer:
    """An MCP server over `library`; files may be added only from under `media_roots`. `preload`: load the model
    in the background when the server starts (as `vidmini serve` does)."""
    roots = [Path(r) for r in media_roots or []]

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[None]:
        if preload and not library.model_loaded:
            threading.Thread(target=_preload, args=(library,), name="vidmini-model-load", daemon=True).start()
        yield

    mcp = _Server("vidmini", instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING")

    @mcp.tool()
    def list_videos() -> VideoList:
        """The videos in the library (stored ones, and ingests running or failed), with their ids."""
        with _tool_errors():
            return VideoList(videos=[_video(r) for r in library.videos()])

    @mcp.tool()
    def get_video(video_id: Annotated[str, Field(description="a video id, or vidmini://<id>")]) -> VideoDetail:
        """One video: its status, frames, duration and stored summary."""
        with _tool_errors():
            ref = _ref(video_id)
            try:
                ref = library.get_store(ref).video_id  # an id's prefix names the video too
            except LibraryError:
                pass
            row = library.video(ref)
            summary = library.summary(ref) if row.video_id and row.status != "failed" else None
            return VideoDetail(**_video(row).model_dump(), summary=summary)

    @mcp.tool()
    def add_video(
        source: Annotated[str, Field(description="a file path on the server (under a media root) or a stream URL "
                                                 "(rtsp://, http(s)://, ...)")],
        wait_s: Annotated[float, Field(gt=0, le=3600, description="how long to wait for the ingest (seconds)")]
        = ADD_WAIT_S,
    ) -> Video:
        """Add a video to the library and wait until it is stored (read and encoded once, so that questions are
        fast). Returns its id, frames and duration; a stream still running after `wait_s` comes back with status
        "ingesting" (poll get_video)."""
        with _tool_errors():
            source = source.strip()
            if not source.lower().startswith(STREAM_SCHEMES):
                source = str(allowed_path(roots, source))
            job = library.add(source)
            try:
                job = library.wait(job.job_id, timeout=wait_s)
            except TimeoutError:
                job = library.job(job.job_id)
            if job.status in ("failed", "cancelled"):
                raise ToolError(f"ingest of {job.name} {job.status}: {job.error or 'no reason given'}")
            if job.status == "ready" and job.video_id:
                return _video(library.video(job.video_id))
            return Video(id=job.video_id, name=job.name, source=job.source, status=job.status,
                         frames=job.frames_done, duration=None, fraction=job.fraction)

    @mcp.tool()
    def ask(
        video_id: Annotated[str, Field(description="a video id, or vidmini://<id>")],
        question: str,
        start: Annotated[str | float | None, Field(description="range start: seconds or m:ss")] = None,
        end: Annotated[str | float | None, Field(description="range end: seconds or m:ss")] = None,
        policy: Annotated[str, Field(description="which frames: all (exact), uniform:K, retrieved:K or auto")]
        = AskOptions.policy,
        max_tokens: Annotated[int, Field(ge=1, le=4096)] = AskOptions.max_new_tokens,
    ) -> Annotated[CallToolResult, Answer]:
        """Answer a question about a stored video (optionally over a time range). Returns the answer text, and
        as structured content the frames it saw with their times and the range."""
        with _tool_errors():
            options = AskOptions(max_new_tokens=max_tokens, policy=policy, start=start, end=end)
            result = library.answer(_ref(video_id), question, options)
        a = result.answer
        out = Answer(answer=a.text, video_id=result.video_id,
                     range=None if a.range is None else TimeSpan(start=a.range.start, end=a.range.end),
                     frames=list(a.frames), timestamps=[float(t) for t in a.timestamps], policy=a.policy,
                     moments=[_moment(m) for m in result.moments or []])
        seen = f"{len(a.frames)} frames" + (f", {span(min(a.timestamps), max(a.timestamps), True)}"
                                            if a.timestamps else "")
        return CallToolResult(content=[TextContent(type="text", text=a.text),
                                       TextContent(type="text", text=f"(from {seen}; policy {a.policy})")],
                              structured_content=out.model_dump(mode="json"))

    @mcp.tool()
    def search_moments(
        query: Annotated[str, Field(description='what to find, described: e.g. "a red circle"')],
        video_id: Annotated[str | None, Field(description="one video's id; None: the whole library")] = None,
        k: Annotated[int, Field(ge=1, le=100)] = 5,
    ) -> Moments:
        """Moments (time ranges) whose frames match a description or where its words are said, best first; each
        says whether it was seen, heard or both (heard ones carry what was said)."""
        with _tool_errors():
            found = library.search(query, None if video_id is None else _ref(video_id), k, curve=False)
            return Moments(query=query, video_id=found.video_id, moments=[_moment(m) for m in found.moments])

    @mcp.tool()
    def summarize(
        video_id: Annotated[str, Field(description="a video id, or vidmini://<id>")],
        mode: Annotated[str, Field(description=f"one of {', '.join(MODES)}")] = "general",
        events: Annotated[list[str] | None, Field(description='surveillance: e.g. ["a person enters"]')] = None,
        window: Annotated[float | None, Field(gt=0, description="seconds per described piece")] = None,
    ) -> Summary:
        """Summarize a stored video: chapters (general, lecture) or an event log (surveillance)."""
        with _tool_errors():
            options = SummarizeOptions(mode, window, tuple(events or ()))
            s = library.summarize(_ref(video_id), options)
        return Summary(video_id=s.video_id, mode=s.mode, model=s.model, duration=s.duration, summary=s.summary,
                       chapters=[Chapter(start=c.start, end=c.end, title=c.title, summary=list(c.summary))
                                 for c in s.chapters],
                       events=[Event(event=e.event, start=e.start, end=e.end, confidence=e.confidence)
                               for e in s.events])

    return mcp


def run_stdio(library: Library, media_roots: list[Path] | list[str] | None = None) -> None:
    """Serve MCP over this process's stdin/stdout until the client closes stdin."""
    build_mcp(library, media_roots, preload=True).run("stdio")


def mcp_http_app(library: Library, media_roots: list[Path] | list[str] | None = None, *,
                 host: str = "127.0.0.1") -> Starlette:
    """MCP over streamable HTTP, served at the app's root (mount it: `Mount("/mcp", app)`; clients then use
    `<base>/mcp/`). The caller runs `app.router.lifespan_context` as its own lifespan (a mounted app's lifespan
    does not run). On loopback the SDK checks Host/Origin against DNS rebinding; on other addresses `vidmini
    serve` requires API keys, which guard the mount."""
    security = None if is_loopback(host) else TransportSecuritySettings(enable_dns_rebinding_protection=False)
    return build_mcp(library, media_roots).streamable_http_app(streamable_http_path="/", host=host,
                                                               transport_security=security)


__all__ = ["allowed_path", "build_mcp", "mcp_http_app", "run_stdio"]
