"""The MCP face through the official `mcp` SDK's own client: `vidmini mcp` over stdio (a child process, its stdout
nothing but protocol messages) and streamable HTTP mounted at `/mcp/` in a live `vidmini serve`, behind its API
keys. The shipped demo model, real sample videos; failures the caller can fix come back as tool errors."""

from __future__ import annotations

import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

import anyio
import httpx2
import pytest
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from test_openai_api import KEY, REPO, start_server, stop

from vidmini.engine.load import SHIPPED_MODEL_DIR

VIDEOS = Path("/work/shared/fixtures/videos")
TOOLS = {"list_videos", "get_video", "add_video", "ask", "search_moments", "summarize"}
pytestmark = [
    pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model"),
    pytest.mark.skipif(not VIDEOS.is_dir(), reason="no sample videos"),
]


def text_of(result) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


async def call_ok(session: ClientSession, tool: str, args: dict) -> dict:
    result = await session.call_tool(tool, args, read_timeout_seconds=120)
    assert not result.is_error, f"{tool}: {text_of(result)}"
    assert isinstance(result.structured_content, dict), f"{tool} gave no structured content"
    return result.structured_content


async def call_error(session: ClientSession, tool: str, args: dict) -> str:
    result = await session.call_tool(tool, args, read_timeout_seconds=120)
    assert result.is_error, f"{tool} {args} should have failed: {text_of(result)}"
    message = text_of(result)
    assert "\n" not in message.strip()
    return message


async def library_round(session: ClientSession, inside: Path, outside: Path, question: str) -> dict:
    """The same checks over any transport: tools listed, a video added from under the media root, listed,
    asked about, searched; paths outside the media root and unknown ids refused as tool errors."""
    await session.initialize()
    listed = await session.list_tools()
    assert {t.name for t in listed.tools} == TOOLS
    ask_tool = next(t for t in listed.tools if t.name == "ask")
    assert ask_tool.output_schema and "timestamps" in ask_tool.output_schema["properties"]

    added = await call_ok(session, "add_video", {"source": str(inside)})
    video_id, duration = added["id"], added["duration"]
    assert added["status"] == "ready" and added["frames"] > 0 and duration > 0

    videos = (await call_ok(session, "list_videos", {}))["videos"]
    assert [v["id"] for v in videos if v["status"] == "ready"] == [video_id]
    got = await call_ok(session, "get_video", {"video_id": f"vidmini://{video_id}"})
    assert got["id"] == video_id and got["frames"] == added["frames"]

    result = await session.call_tool("ask", {"video_id": video_id, "question": question, "max_tokens": 16},
                                     read_timeout_seconds=120)
    assert not result.is_error, text_of(result)
    answer = result.structured_content
    assert answer["answer"].strip() and result.content[0].text == answer["answer"]
    assert answer["timestamps"] and len(answer["timestamps"]) == len(answer["frames"])
    assert all(0 <= t <= duration for t in answer["timestamps"])

    ranged = await call_ok(session, "ask", {"video_id": video_id, "question": question, "start": 0,
                                            "end": duration / 2, "max_tokens": 8})
    assert ranged["range"] is not None and ranged["range"]["end"] <= duration / 2 + 1e-6
    assert all(0 <= t <= duration / 2 + 1e-6 for t in ranged["timestamps"])

    found = await call_ok(session, "search_moments", {"query": "a red circle", "video_id": video_id, "k": 3})
    assert 1 <= len(found["moments"]) <= 3
    assert all(m["video_id"] == video_id and 0 <= m["start"] <= m["end"] <= duration for m in found["moments"])

    assert "not under a media root" in await call_error(session, "add_video", {"source": str(outside)})
    assert "no such file" in await call_error(session, "add_video", {"source": str(inside.parent / "none.mp4")})
    assert "no stored video" in await call_error(session, "ask", {"video_id": "0123abcd-nope", "question": "x"})
    assert "no stored video" in await call_error(session, "get_video", {"video_id": "0123abcd-nope"})
    assert "policy" in (await call_error(session, "ask", {"video_id": video_id, "question": question,
                                                          "policy": "sometimes"})).lower()
    assert await call_error(session, "ask", {"video_id": video_id, "question": question, "max_tokens": 0})
    return {"video_id": video_id, "duration": duration}


@pytest.fixture
def media(tmp_path) -> dict:
    root = tmp_path / "media"
    root.mkdir()
    inside = root / "cockatoo.mp4"
    shutil.copy(VIDEOS / "cockatoo.mp4", inside)
    outside = tmp_path / "elsewhere" / "safari.mp4"
    outside.parent.mkdir()
    shutil.copy(VIDEOS / "safari.mp4", outside)
    (root / "link.mp4").symlink_to(outside)  # a link out of the media root is outside too
    env = {**os.environ, "VIDMINI_HOME": str(tmp_path / "home")}
    env.pop("VIDMINI_MODEL", None)
    return {"root": root, "inside": inside, "outside": outside, "env": env, "tmp": tmp_path}


def test_stdio(media):
    stream_faults: list[Exception] = []

    async def on_message(message) -> None:  # anything on stdout that is not JSON-RPC arrives here
        if isinstance(message, Exception):
            stream_faults.append(message)

    async def run() -> None:
        params = StdioServerParameters(command=sys.executable, cwd=REPO, env=media["env"],
                                       args=["-m", "vidmini.cli.main", "mcp", "--media-root", str(media["root"])])
        with anyio.fail_after(240), open(media["tmp"] / "stderr.log", "w") as errlog:
            async with stdio_client(params, errlog=errlog) as (read, write), \
                    ClientSession(read, write, message_handler=on_message) as session:
                stored = await library_round(session, media["inside"], media["outside"],
                                             "What colour is the background?")
                assert "not under a media root" in await call_error(
                    session, "add_video", {"source": str(media["root"] / "link.mp4")})
                summary = await call_ok(session, "summarize", {"video_id": stored["video_id"]})
                assert summary["summary"].strip() and summary["mode"] == "general"
                assert "surveillance" in await call_error(session, "summarize", {
                    "video_id": stored["video_id"], "mode": "surveillance"})

    anyio.run(run)
    assert not stream_faults, f"stdout carried more than protocol messages: {stream_faults}"


def test_stdio_refuses_a_media_root_that_is_not_a_folder(media):
    import subprocess

    res = subprocess.run([sys.executable, "-m", "vidmini.cli.main", "mcp", "--media-root",
                          str(media["inside"])], cwd=REPO, env=media["env"], capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and "is not a folder" in res.stderr and res.stdout == ""


def post_mcp(base: str, key: str | None) -> int:
    """A raw MCP `initialize` POST: the HTTP status it gets."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{base}/mcp/", body, headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_streamable_http_behind_the_api_key(media):
    keys = media["tmp"] / "keys.txt"
    keys.write_text(f"{KEY}\n")
    inside = media["root"] / "realshort.mp4"
    shutil.copy(VIDEOS / "realshort.mp4", inside)
    proc, base = start_server(["--api-key-file", str(keys), "--media-root", str(media["root"])], media["env"])
    try:
        assert post_mcp(base, None) == 401
        assert post_mcp(base, "sk-wrong-" + "x" * 24) == 401
        assert post_mcp(base, KEY) == 200

        async def run() -> None:
            http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {KEY}"},
                                      timeout=httpx2.Timeout(30.0, read=300.0))
            with anyio.fail_after(240):
                async with http, streamable_http_client(f"{base}/mcp/", http_client=http) as (read, write), \
                        ClientSession(read, write) as session:
                    await library_round(session, inside, media["outside"], "What colour is the background?")

        anyio.run(run)
    finally:
        stop(proc)
