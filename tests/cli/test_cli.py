"""`vidmini ask` end to end as a subprocess, on real video files and a tiny checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.inference import Engine
from vidmini.ingest.simple_decode import sample_frames

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "videos"
REPO = Path(__file__).resolve().parents[2]
QUESTION = "What colour is the square?"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("cli_ckpt"), seed=5)


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "vidmini-home"))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)


def vidmini(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "vidmini.cli.main", *args], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=300)


def test_ask_video_json_matches_the_engine(ckpt):
    video = FIXTURES / "safari.mp4"
    # --no-speech: the file's audio is transcribed, and its heard speech would join the question's text
    res = vidmini("ask", str(video), QUESTION, "--model", str(ckpt), "--json", "--max-new-tokens", "6",
                  "--logprobs", "2", "--no-speech")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["speech"] == [] and out["frames"] == 11  # 10.51 s of video at 1 fps: t = 0 … 10
    assert out["timestamps"] == [float(t) for t in range(11)]
    assert set(out) >= {"answer", "token_ids", "frames", "ttft_ms", "tokens_per_s", "logprobs"}
    assert out["ttft_ms"] > 0
    assert len(out["logprobs"]) == len(out["token_ids"])
    for step, token in zip(out["logprobs"], out["token_ids"], strict=True):
        assert len(step) == 2 and step[0]["id"] == token  # greedy: the chosen token is the most likely
        assert step[0]["logprob"] >= step[1]["logprob"]
        assert isinstance(step[0]["token"], str)

    # the same frames through the paper's one pass give the same greedy tokens
    loaded = load_checkpoint(ckpt)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids)
    pixels = engine.frame_pixels(sample_frames(video).frames)
    expected = [e.token_id for e in engine.forward_full(
        pixels, QUESTION, SamplingConfig(max_new_tokens=6, stop_ids=engine.eos_ids))]
    assert out["token_ids"] == expected
    first = engine.first_logits_full(pixels, QUESTION)
    assert out["logprobs"][0][0]["logprob"] == pytest.approx(torch.log_softmax(first, -1).max().item(), abs=1e-4)


def test_ask_with_a_json_schema_answers_json_that_validates(ckpt, tmp_path):
    """A bounded schema (every value an enum or a small integer): even a random-weight model's answer must end
    complete and valid, because decoding is held to the schema's grammar."""
    import jsonschema

    schema = {"type": "object", "required": ["colour", "count"], "additionalProperties": False,
              "properties": {"colour": {"enum": ["red", "green", "blue"]},
                             "count": {"type": "integer", "minimum": 0, "maximum": 9}}}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    for seed in ("1", "2"):
        res = vidmini("ask", str(FIXTURES / "safari.mp4"), QUESTION, "--model", str(ckpt), "--json-schema",
                      str(path), "--max-new-tokens", "64", "--temperature", "1.0", "--seed", seed)
        assert res.returncode == 0, res.stderr
        jsonschema.validate(json.loads(res.stdout), schema)
    (tmp_path / "bad.json").write_text("[1, 2]")
    bad = vidmini("ask", str(FIXTURES / "safari.mp4"), QUESTION, "--model", str(ckpt), "--json-schema",
                  str(tmp_path / "bad.json"))
    assert bad.returncode == 2 and "must hold a JSON object" in bad.stderr


def test_ask_image_and_prompt_styles_differ(ckpt, tmp_path):
    from PIL import Image

    img = tmp_path / "pic.png"
    Image.new("RGB", (50, 30), (200, 30, 30)).save(img)
    ref = vidmini("ask", str(img), QUESTION, "--model", str(ckpt), "--json", "--max-new-tokens", "4",
                  "--logprobs", "1")
    cor = vidmini("ask", str(img), QUESTION, "--model", str(ckpt), "--json", "--max-new-tokens", "4",
                  "--logprobs", "1", "--prompt-style", "corrected")
    assert ref.returncode == 0 and cor.returncode == 0, ref.stderr + cor.stderr
    a, b = json.loads(ref.stdout), json.loads(cor.stdout)
    assert a["frames"] == b["frames"] == 1
    assert a["logprobs"][0][0]["logprob"] != b["logprobs"][0][0]["logprob"]


@pytest.mark.parametrize("case", ["missing", "text_as_video", "empty", "bad_model", "not_a_model_id"])
def test_bad_input_one_line_exit_2(case, ckpt, tmp_path):
    media = FIXTURES / "realshort.mp4"
    model = str(ckpt)
    if case == "missing":
        media = tmp_path / "nope.mp4"
    elif case == "text_as_video":
        media = tmp_path / "notes.mp4"
        media.write_text("this is not a video\n" * 20)
    elif case == "empty":
        media = tmp_path / "empty.mp4"
        media.write_bytes(b"")
    elif case == "bad_model":
        model = str(tmp_path / "model")
        Path(model).mkdir()
        (Path(model) / "config.json").write_text("{not json")
    else:
        model = "nobody/not-cached-anywhere"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    res = vidmini("ask", str(media), QUESTION, "--model", model, env=env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vidmini: error:"), res.stderr
    assert "Traceback" not in res.stderr


def test_default_model_is_the_shipped_demo_and_says_so(tmp_path):
    env = {"VIDMINI_HOME": str(tmp_path / "home"), "VIDMINI_MODEL": ""}
    res = vidmini("ask", str(FIXTURES / "realshort.mp4"), QUESTION, "--max-new-tokens", "3", env=env)
    assert res.returncode == 0, res.stderr
    assert "vidmini-demo" in res.stderr and "demo model for the synthetic world" in res.stderr
    res = vidmini("ask", str(FIXTURES / "realshort.mp4"), QUESTION, "--max-new-tokens", "3", "--json", env=env)
    assert "demo model" in json.loads(res.stdout)["model"]


def test_random_fallback_without_a_shipped_model_has_a_banner(tmp_path, monkeypatch, capsys):
    """Without the shipped directory (a trimmed install) the fallback is a tiny random model, and it says so."""
    import vidmini.cli.main
    import vidmini.engine.load

    monkeypatch.setattr(vidmini.engine.load, "SHIPPED_MODEL_DIR", tmp_path / "missing")
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    assert vidmini.engine.load.choose_model(None).is_random
    assert vidmini.cli.main.main(["ask", str(FIXTURES / "realshort.mp4"), QUESTION, "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    assert "RANDOM-WEIGHT" in err and "meaningless" in err
    assert (tmp_path / "home" / "models" / "tiny-random" / "config.json").exists()


def test_download_without_network_fails_cleanly(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    res = vidmini("download", "ICTNLP/llava-mini-llama-3.1-8b", env=env)
    assert res.returncode == 2
    assert "download of ICTNLP/llava-mini-llama-3.1-8b failed" in res.stderr


def test_retrained_weights_in_the_same_place_never_read_the_old_states(tmp_path):
    """`make model` (or a new release) rewrites the checkpoint in place with the same config: the library must
    encode the video again for it, not answer from the old weights' stored states."""
    model = build_tiny_checkpoint(tmp_path / "model", seed=5)
    video = str(FIXTURES / "safari.mp4")

    def ingest() -> tuple[str, str]:
        res = vidmini("ingest", video, "--model", str(model), "--json")
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])["id"], res.stdout

    first, _ = ingest()
    again, _ = ingest()
    assert again == first  # unchanged weights: the same store
    config = (model / "config.json").read_text()
    build_tiny_checkpoint(tmp_path / "retrained", seed=6)
    assert (tmp_path / "retrained" / "config.json").read_text() == config  # same config, other weights
    for name in ("model.safetensors", "vision_tower/model.safetensors"):
        (model / name).write_bytes((tmp_path / "retrained" / name).read_bytes())
    retrained, _ = ingest()
    assert retrained != first
    listing = vidmini("list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert {first, retrained} <= {row["video_id"] for row in json.loads(listing.stdout)}


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["list", "--json"]])
def test_light_verbs_load_neither_torch_nor_transformers(argv, tmp_path):
    """`vidmini --help` and `vidmini list` start fast because they import no model code
    (research/bench/startup.py has the times)."""
    code = ("import sys\nfrom vidmini.cli.main import main\n"
            "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('RESULT', rc, sorted(m for m in ('torch', 'transformers', 'faiss', 'streamlit', 'ray') "
            "if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={**os.environ, "VIDMINI_HOME": str(tmp_path / "home")})
    last = res.stdout.strip().splitlines()[-1]
    assert last == "RESULT 0 []", res.stdout[-500:] + res.stderr[-500:]
