"""`vidmini serve` through the official `openai` client: a live server on a free loopback port, the shipped demo
model, a synthetic-world video stored first. Plain and streamed answers equal `vidmini ask`'s; keys, unknown
videos, paths outside the media roots and bad bodies get OpenAI's error types with the right status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jsonschema
import pytest
from fixtures.app_helpers import reliable_questions, world_video
from fixtures.serve_helpers import free_port, start_server, stop

from vidmini.engine.load import SHIPPED_MODEL_DIR

openai = pytest.importorskip("openai")
REPO = Path(__file__).resolve().parents[2]
KEY = "sk-test-" + "k" * 24
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")


def cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vidmini.cli.main", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    home, media = tmp / "home", tmp / "media"
    media.mkdir()
    env = {**os.environ, "VIDMINI_HOME": str(home)}
    env.pop("VIDMINI_MODEL", None)
    stored, timeline = world_video(tmp, seed=12, seconds=24)
    res = cli(["ingest", str(stored), "--json"], env)
    assert res.returncode == 0, res.stderr
    video_id = json.loads(res.stdout)["id"]
    inside, _ = world_video(media, seed=13, seconds=12)
    keys = tmp / "keys.txt"
    keys.write_text(f"# one key\n{KEY}\n")
    proc, base = start_server(["--api-key-file", str(keys), "--media-root", str(media)], env)
    yield {"base": base, "video_id": video_id, "timeline": timeline, "env": env, "inside": inside, "tmp": tmp}
    stop(proc)


def client(server, key: str | None = KEY):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=key or "none", max_retries=0)


def video_message(url: str, question: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": question}]}]


def test_answers_plain_and_streamed_equal_the_cli(server):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["vidmini-demo (a demo model for the synthetic world)"]
    questions = reliable_questions(server["timeline"], seed=3, per_family=1)[:3]
    assert questions
    for q in questions:
        extra = {"start": q.start_s, "end": q.end_s}
        got = c.chat.completions.create(model="vidmini", messages=video_message(f"vidmini://{server['video_id']}",
                                                                                 q.question),
                                        max_tokens=16, extra_body=extra)
        res = cli(["ask", server["video_id"], q.question, "--from", str(q.start_s), "--to", str(q.end_s),
                   "--max-new-tokens", "16", "--json"], server["env"])
        assert res.returncode == 0, res.stderr
        expected = json.loads(res.stdout)
        answer = got.choices[0].message.content
        assert answer == expected["answer"] and got.choices[0].finish_reason == "stop"
        assert got.usage.completion_tokens == len(expected["token_ids"])
        details = got.model_extra["vidmini"]  # the one answer shape: what `vidmini ask --json` prints
        timing = {"ttft_ms", "tokens_per_s", "encode_ms"}
        assert {k: v for k, v in details.items() if k not in timing} == \
            {k: v for k, v in expected.items() if k not in timing}
        stream = c.chat.completions.create(model="vidmini", messages=video_message(
            f"vidmini://{server['video_id']}", q.question), max_tokens=16, extra_body=extra, stream=True,
            stream_options={"include_usage": True})
        pieces, finish, usage = [], None, None
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        assert "".join(pieces) == answer and finish == "stop"
        assert usage is not None and usage.completion_tokens == got.usage.completion_tokens


def test_the_cli_with_a_server_prints_what_it_prints_alone_and_loads_no_model(server):
    """`vidmini ask|search --server URL` (and `$VIDMINI_SERVER`): the same JSON as the local command, torch never
    imported in the command's process."""
    q = reliable_questions(server["timeline"], seed=5, per_family=1)[1]
    args = ["ask", server["video_id"], q.question, "--from", str(q.start_s), "--to", str(q.end_s),
            "--max-new-tokens", "16", "--json"]
    local = cli(args, server["env"])
    assert local.returncode == 0, local.stderr
    remote_env = {**server["env"], "VIDMINI_API_KEY": KEY}
    probe = ("import sys; from vidmini.cli.main import main; rc = main(sys.argv[1:]); "
             "print('torch' in sys.modules, file=sys.stderr); sys.exit(rc)")
    remote = subprocess.run([sys.executable, "-c", probe, *args, "--server", server["base"]], capture_output=True,
                            text=True, cwd=REPO, env=remote_env, timeout=120)
    assert remote.returncode == 0, remote.stderr
    assert remote.stderr.strip().splitlines()[-1] == "False"  # no model, no torch in the client
    timing = {"ttft_ms", "tokens_per_s", "encode_ms"}
    mine, theirs = json.loads(local.stdout), json.loads(remote.stdout)
    assert {k: v for k, v in theirs.items() if k not in timing} == {k: v for k, v in mine.items() if k not in timing}

    search = ["search", "a red circle", "--video", server["video_id"], "-k", "3", "--json"]
    alone = cli(search, server["env"])
    served = cli(search, {**remote_env, "VIDMINI_SERVER": server["base"]})
    assert alone.returncode == 0 and served.returncode == 0, served.stderr
    assert json.loads(served.stdout) == json.loads(alone.stdout)
    refused = cli([*args, "--server", server["base"]], server["env"])  # no key
    assert refused.returncode == 2 and "401" in refused.stderr
    gone = cli([*args, "--server", "http://127.0.0.1:9"], server["env"])
    assert gone.returncode == 2 and "cannot reach" in gone.stderr


def test_an_image_as_a_data_url_or_a_media_root_path_is_answered_as_the_cli_answers_it(server):
    import base64

    from PIL import Image

    image = server["tmp"] / "media" / "square.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(image)
    question = "What colour is the background?"
    local = cli(["ask", str(image), question, "--max-new-tokens", "8", "--json"], server["env"])
    assert local.returncode == 0, local.stderr
    expected = json.loads(local.stdout)
    data_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    c = client(server)
    timing = {"ttft_ms", "tokens_per_s", "encode_ms"}
    for url in (data_url, str(image)):
        msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
        got = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=8)
        assert got.choices[0].message.content == expected["answer"]
        details = got.model_extra["vidmini"]
        assert details["frames"] == 1 and {k: v for k, v in details.items() if k not in timing | {"video_id"}} == \
            {k: v for k, v in expected.items() if k not in timing | {"video_id"}}
        pieces = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="vidmini", messages=msgs, max_tokens=8, stream=True) if ch.choices]
        assert "".join(pieces) == expected["answer"]
    outside = server["tmp"] / "outside.png"
    Image.new("RGB", (8, 8)).save(outside)
    for url, error in ((str(outside), openai.PermissionDeniedError), ("data:image/png;base64,@@@", openai.BadRequestError),
                       ("https://example.com/a.png", openai.BadRequestError)):
        with pytest.raises(error):
            c.chat.completions.create(model="vidmini", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]}])


def test_a_stream_url_is_followed_live_and_answered_over_its_frames_so_far(server):
    """A `video_url` naming a live stream (ffmpeg serving MPEG-TS over loopback HTTP, in real time): the server
    starts one live ingest, answers over the frames it has, and a later question sees more of them — through the
    same connection (the listener serves one client only)."""
    import shutil

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg CLI not on PATH")
    port = free_port()
    url = f"http://127.0.0.1:{port}/live.ts"
    feed = subprocess.Popen(["ffmpeg", "-v", "error", "-re", "-f", "lavfi", "-i",
                             "testsrc2=size=160x120:rate=10:duration=40", "-c:v", "libx264", "-g", "10",
                             "-f", "mpegts", "-listen", "1", url])
    try:
        time.sleep(1.0)  # the listener is up
        c = client(server)
        first = c.chat.completions.create(model="vidmini", messages=video_message(url, "What is shown?"),
                                          max_tokens=4)
        seen = first.model_extra["vidmini"]
        assert first.choices[0].message.content and seen["frames"] >= 1
        assert seen["timestamps"] == sorted(seen["timestamps"]) and seen["timestamps"][0] == 0.0
        time.sleep(6.0)
        later = c.chat.completions.create(model="vidmini", messages=video_message(url, "What is shown?"),
                                          max_tokens=4).model_extra["vidmini"]
        assert later["video_id"] == seen["video_id"] and later["frames"] > seen["frames"]
    finally:
        feed.kill()
        feed.wait()


def test_a_stream_url_that_cannot_be_read_is_a_400_naming_it(server):
    url = f"http://127.0.0.1:{free_port()}/nothing.ts"  # nobody listens there
    with pytest.raises(openai.BadRequestError) as info:
        client(server).chat.completions.create(model="vidmini", messages=video_message(url, "What is shown?"))
    assert url in info.value.message and "\n" not in info.value.message


def test_stop_and_length_end_an_answer(server):
    c = client(server)
    q = reliable_questions(server["timeline"], seed=3, per_family=1)[0]
    msgs = video_message(f"vidmini://{server['video_id']}", q.question)
    full = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=16,
                                     extra_body={"start": q.start_s, "end": q.end_s}).choices[0].message.content
    assert full
    short = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=1,
                                      extra_body={"start": q.start_s, "end": q.end_s})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1
    cut = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=16, stop=[full[-1]],
                                    extra_body={"start": q.start_s, "end": q.end_s})
    assert cut.choices[0].message.content == full[: full.index(full[-1])]


def test_a_file_under_a_media_root_is_ingested_and_answered(server):
    got = client(server).chat.completions.create(
        model="vidmini", messages=video_message(str(server["inside"]), "What colour is the background?"),
        max_tokens=8)
    assert got.choices[0].message.content and got.model_extra["vidmini"]["video_id"]


def test_errors_have_openais_types_and_statuses(server):
    msgs = video_message(f"vidmini://{server['video_id']}", "What word is shown?")
    for key in (None, "sk-wrong"):
        with pytest.raises(openai.AuthenticationError) as info:
            client(server, key).chat.completions.create(model="vidmini", messages=msgs)
        assert info.value.status_code == 401
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="vidmini", messages=video_message("vidmini://0123456789abcdef", "What?"))
    outside = server["tmp"] / "world-seed12-24s.mp4"
    assert outside.exists()
    with pytest.raises(openai.PermissionDeniedError) as info:
        c.chat.completions.create(model="vidmini", messages=video_message(str(outside), "What word is shown?"))
    assert "media root" in info.value.message
    bad_bodies = [
        [{"role": "user", "content": "What word is shown?"}],  # no video
        video_message(f"vidmini://{server['video_id']}", "   "),  # no question
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                      {"type": "video_url", "video_url": {"url": "vidmini://x"}}]}],
    ]
    for messages in bad_bodies:
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="vidmini", messages=messages)
        assert info.value.status_code == 400 and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="vidmini", messages=msgs, extra_body={"start": 20, "end": 5})
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="vidmini", messages=msgs, extra_body={"policy": "everything"})


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue", "yellow", "white", "purple", "black", "gray", "navy", "brown",
                            "teal"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 9},
        "word": {"type": "string", "maxLength": 8},
        "seen": {"type": "boolean"},
        "kinds": {"type": "array", "items": {"enum": ["circle", "square", "triangle", "star"]}, "maxItems": 3},
    },
    "required": ["colour", "count", "word", "seen", "kinds"],
    "additionalProperties": False,
}


def test_a_json_schema_response_format_gives_valid_json_plain_and_streamed(server):
    c = client(server)
    msgs = video_message(f"vidmini://{server['video_id']}", "What colour is the background?")
    fmt = {"type": "json_schema", "json_schema": {"name": "scene_answer", "schema": ANSWER_SCHEMA, "strict": True}}
    for extra in ({}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.8, "top_p": 0.9, "seed": 4}):
        got = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=120, response_format=fmt, **extra)
        content = got.choices[0].message.content
        jsonschema.validate(json.loads(content), ANSWER_SCHEMA)
        assert got.choices[0].finish_reason == "stop"
        stream = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=120, response_format=fmt,
                                           stream=True, **extra)
        pieces = [ch.delta.content or "" for chunk in stream for ch in chunk.choices]
        assert "".join(pieces) == content  # the same seed: the same answer
    plain = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=120).choices[0].message.content
    with pytest.raises(ValueError):  # the same question without a format is the model's usual short answer
        json.loads(plain)


def test_a_json_object_response_format_gives_an_object(server):
    c = client(server)
    msgs = video_message(f"vidmini://{server['video_id']}", "What word is shown?")
    got = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=200,
                                    response_format={"type": "json_object"})
    if got.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(got.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert got.choices[0].message.content.startswith("{")
    text = c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=16, response_format={"type": "text"})
    assert text.choices[0].message.content


def test_a_malformed_response_format_or_schema_is_a_400(server):
    c = client(server)
    msgs = video_message(f"vidmini://{server['video_id']}", "What word is shown?")
    malformed = [
        {"type": "xml"},
        {"format": "json"},
        "json",
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": "x"},
        {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},  # no name
        {"type": "json_schema", "json_schema": {"name": "has space", "schema": {"type": "object"}}},
        {"type": "json_schema", "json_schema": {"name": "n" * 65, "schema": {"type": "object"}}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": [1, 2]}},
        {"type": "json_schema", "json_schema": {"name": "a", "schema": {}, "strict": "yes"}},
    ]
    for fmt in malformed:
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=8, response_format=fmt)
        assert info.value.status_code == 400 and info.value.body["param"] == "response_format", fmt
    for schema in ({"type": "nonsense"}, {"type": "string", "pattern": "(("}, {"$ref": "#/nowhere"}):
        with pytest.raises(openai.BadRequestError) as info:
            c.chat.completions.create(model="vidmini", messages=msgs, max_tokens=8, response_format={
                "type": "json_schema", "json_schema": {"name": "bad", "schema": schema}})
        assert info.value.status_code == 400 and "schema" in info.value.message, schema


def test_the_library_over_rest_needs_the_key(server):
    req = urllib.request.Request(server["base"] + "/v1/videos", headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        ids = [v["id"] for v in json.load(r)["data"]]
    assert server["video_id"] in ids
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(server["base"] + "/v1/videos", timeout=10)
    assert info.value.code == 401 and json.load(info.value)["error"]["code"] == "invalid_api_key"


def test_a_network_address_without_keys_is_refused(tmp_path):
    env = {**os.environ, "VIDMINI_HOME": str(tmp_path)}
    res = cli(["serve", "--host", "0.0.0.0", "--port", str(free_port())], env)
    assert res.returncode == 2 and "needs --api-key-file" in res.stderr


def test_a_client_that_disconnects_cancels_its_generation(tmp_path, tiny_ckpt):
    """A tiny random model with no end-of-sequence id runs on until its token limit; a streamed request dropped after its first chunk must
    stop generating at once, or the next question on the same video would wait behind it."""
    import shutil

    model = tmp_path / "no-eos"
    shutil.copytree(tiny_ckpt, model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": []}))  # never stops on its own
    home = tmp_path / "home"
    env = {**os.environ, "VIDMINI_HOME": str(home), "VIDMINI_MODEL": str(model)}
    path, _ = world_video(tmp_path, seed=14, seconds=8)
    res = cli(["ingest", str(path), "--json"], env)
    assert res.returncode == 0, res.stderr
    video_id = json.loads(res.stdout)["id"]
    proc, base = start_server([], env)
    try:
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        msgs = video_message(f"vidmini://{video_id}", "What word is shown?")
        t0 = time.perf_counter()
        probe = c.chat.completions.create(model="m", messages=msgs, max_tokens=300)
        per_token = (time.perf_counter() - t0) / max(1, probe.usage.completion_tokens)
        assert probe.choices[0].finish_reason == "length" and probe.usage.completion_tokens == 300
        long_tokens = 200_000  # minutes of generation at this rate
        assert long_tokens * per_token > 60
        stream = c.chat.completions.create(model="m", messages=msgs, max_tokens=long_tokens, stream=True)
        for chunk in stream:  # generation is under way once text arrives
            if any(ch.delta.content for ch in chunk.choices):
                break
        stream.close()  # the client goes away
        t1 = time.perf_counter()
        after = c.with_options(timeout=60).chat.completions.create(model="m", messages=msgs, max_tokens=1)
        assert after.usage.completion_tokens == 1
        assert time.perf_counter() - t1 < 30  # not queued behind 200,000 tokens
    finally:
        stop(proc)


def test_a_model_that_does_not_load_is_reported_not_hidden(tmp_path):
    env = {**os.environ, "VIDMINI_HOME": str(tmp_path), "VIDMINI_MODEL": str(tmp_path / "no-such-model")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vidmini.cli.main", "serve", "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, health = time.time() + 60, None
        while health is None or health.get("status") == "ok":
            assert time.time() < deadline, f"no load error reported: {health}"
            time.sleep(0.3)
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    health = json.load(r)
            except urllib.error.HTTPError as e:
                assert e.code == 500
                health = json.load(e)
            except OSError:
                continue
        assert health["status"] == "error" and "no-such-model" in health["error"]
        c = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.InternalServerError) as info:
            c.chat.completions.create(model="m", messages=video_message("vidmini://x", "What word is shown?"))
        assert "failed to load" in info.value.message
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "vidmini: error: the model failed to load" in proc.stderr.read()
