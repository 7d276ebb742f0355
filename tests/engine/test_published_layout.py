"""The published LLaVA-Mini checkpoint layout, loaded through every door.

`tests/fixtures/published/` was written by transformers 4.43.1 itself (research/published_layout/make_fixture.py):
config.json with `model_type: llava_mini_llama` and the 4.x rope keys, a Llama-3-style BPE saved as
`PreTrainedTokenizerFast`, float16 weights in three safetensors shards with an index (the CLIP tower's weights
included, as in the published checkpoint), and the tower as its own directory shaped like
openai/clip-vit-large-patch14-336 (old-style config, `pytorch_model.bin`, int `size`/`crop_size`). The tower is
reached the way a user's machine reaches it: `mm_vision_tower` names the hub id, found in the local HF cache.

Expected values come from the files (safetensors, `tokenizers`, json read directly) or from transformers' own
classes, never from the loader under test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures.hf_cache import fake_hf_cache, hub_env
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer

from vidmini.engine.checkpoint import CheckpointError, load_checkpoint

REPO = Path(__file__).resolve().parents[2]
PUBLISHED = REPO / "tests" / "fixtures" / "published"
MAIN, TOWER = PUBLISHED / "llava-mini-llama-3.1-8b", PUBLISHED / "clip-vit-large-patch14-336"
MAIN_ID, TOWER_ID = "ICTNLP/llava-mini-llama-3.1-8b", "openai/clip-vit-large-patch14-336"
VIDEOS = REPO.parent / "shared" / "fixtures" / "videos"
VISION = "model.vision_tower.vision_tower."
QUESTION = "What is shown?"
TEXTS = ["What is shown in this video?", "A red circle, then the word ZEBRA at 1:05.", "  spaces\tand\nlines  "]


# ---------------------------------------------------------------------------------------------- helpers


def file_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded safetensors checkpoint, read through its index with safetensors alone."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(directory / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index)
    return out


def to_5x_layout(directory: Path, tokenizer_class: str) -> None:
    """Rewrite config.json as transformers 5 writes it (one `rope_parameters` carrying θ) and name another
    tokenizer class; the weights and tokenizer.json stay as they are."""
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_scaling"))
    rope["rope_theta"] = cfg.pop("rope_theta")
    cfg.update(rope_parameters=rope, transformers_version="5.25.0", dtype=cfg.pop("torch_dtype"))
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    edit_json(directory / "tokenizer_config.json", tokenizer_class=tokenizer_class)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))


@pytest.fixture
def published(tmp_path: Path, offline_hub: Path) -> Path:
    """A writable copy of the main checkpoint; its tower (a hub id) in the offline HF cache."""
    fake_hf_cache(offline_hub, TOWER_ID, TOWER)
    return Path(shutil.copytree(MAIN, tmp_path / "llava-mini"))


def first_logits(loaded, image: Image.Image, question: str = QUESTION) -> torch.Tensor:
    from vidmini.engine.inference import Engine

    engine = Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids)
    return engine.first_logits_full(engine.image_pixels(image), question)


def test_image(seed: int = 0, size: tuple[int, int] = (40, 28)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


test_image.__test__ = False  # a helper, not a test


# ---------------------------------------------------------------------------------------------- loading


def test_published_layout_loads_exactly_what_the_files_hold(published):
    loaded = load_checkpoint(published)
    stored = file_tensors(MAIN)
    state = loaded.model.state_dict()
    llm = {k: v for k, v in stored.items() if not k.startswith(VISION)}
    assert len(llm) == 53
    for key, value in llm.items():
        assert value.dtype == torch.float16
        assert torch.equal(state[key], value.float()), key
    # the tower's weights stored in the main checkpoint (as the published one has them) are the ones used;
    # transformers 4.x named them `vision_model.*`, 5.x's CLIPVisionModel drops that level
    tower = {k[len(VISION + "vision_model."):]: v for k, v in stored.items() if k.startswith(VISION)}
    tower_state = loaded.model.model.vision_tower.vision_tower.state_dict()
    assert tower and all(torch.equal(tower_state[k], v.float()) for k, v in tower.items())

    config = json.loads((MAIN / "config.json").read_text())
    assert config["transformers_version"] == "4.43.1" and "rope_parameters" not in config
    rope = loaded.model.config.rope
    assert (rope.kind, rope.theta, rope.factor) == ("llama3", config["rope_theta"], config["rope_scaling"]["factor"])
    assert loaded.eos_ids == tuple(json.loads((MAIN / "generation_config.json").read_text())["eos_token_id"])
    assert loaded.vision_dir.resolve().parent.parent.name == "models--openai--clip-vit-large-patch14-336"


def test_the_tokenizer_is_the_one_in_tokenizer_json(published):
    tok = load_checkpoint(published).tokenizer
    rust = Tokenizer.from_file(str(MAIN / "tokenizer.json"))
    settings = json.loads((MAIN / "tokenizer_config.json").read_text())
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast"
    for text in TEXTS:
        assert tok(text).input_ids == rust.encode(text).ids
        assert tok.decode(rust.encode(text, add_special_tokens=False).ids) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        settings["bos_token"], settings["eos_token"], settings["pad_token"])
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")


def test_the_old_style_preprocessor_config_is_read_as_written(published):
    """openai's file: ints for size/crop_size, `CLIPFeatureExtractor`. A 28×28 image is neither resized nor
    cropped, so the pixels are (x/255 − mean)/std with the file's mean and std."""
    processor = load_checkpoint(published).processor
    raw = json.loads((TOWER / "preprocessor_config.json").read_text())
    assert raw["feature_extractor_type"] == "CLIPFeatureExtractor" and raw["crop_size"] == 28
    image = test_image(3, (28, 28))
    got = processor(images=[image], return_tensors="np")["pixel_values"][0]
    arr = np.asarray(image, dtype=np.float64) / 255.0
    expected = ((arr - np.array(raw["image_mean"])) / np.array(raw["image_std"])).transpose(2, 0, 1)
    assert got.shape == (3, 28, 28)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_rope_is_llama31s_as_transformers_computes_it(published):
    """The loaded model's cos/sin tables against transformers' LlamaRotaryEmbedding on a LlamaConfig that
    transformers itself builds from the file's 4.x keys."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    raw = json.loads((MAIN / "config.json").read_text())
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rope_theta",
            "rope_scaling")
    reference = LlamaRotaryEmbedding(LlamaConfig(**{k: raw[k] for k in keys}))
    model = load_checkpoint(published).model
    positions = torch.tensor([[0, 1, 2047, 8191, 8192, 40000, 131071]])
    x = torch.zeros(1, dtype=torch.float32)
    for got, want in zip(model.rotary(x, positions), reference(x, positions), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("tokenizer_class", ["TokenizersBackend", "LlamaTokenizerFast", "PreTrainedTokenizerFast"])
def test_the_5x_layout_gives_the_same_model(published, tmp_path, tokenizer_class):
    image = test_image(1)
    loaded = load_checkpoint(published)
    expected = first_logits(loaded, image)
    other = Path(shutil.copytree(published, tmp_path / "as-5x"))
    to_5x_layout(other, tokenizer_class)
    again = load_checkpoint(other)
    assert again.model.config.rope == loaded.model.config.rope
    assert torch.equal(first_logits(again, image), expected)
    for text in TEXTS:
        assert again.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids


def test_a_saved_config_is_in_the_published_form_and_reads_back(published, tmp_path):
    from vidmini.engine.config import LlavaMiniConfig

    config = load_checkpoint(published).model.config
    config.save(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    original = json.loads((MAIN / "config.json").read_text())
    assert written["rope_scaling"] == original["rope_scaling"] and written["rope_theta"] == original["rope_theta"]
    assert "rope_parameters" not in written and written["model_type"] == "llava_mini_llama"
    assert LlavaMiniConfig.from_dict(written).rope == config.rope


# ------------------------------------------------------------------------------------------ bad checkpoints


def _damage(directory: Path, tower: Path, case: str) -> None:
    if case == "rope_type":
        edit_json(directory / "config.json", rope_scaling={"rope_type": "longrope2", "factor": 8.0})
    elif case == "rope_5x_type":
        to_5x_layout(directory, "TokenizersBackend")
        cfg = json.loads((directory / "config.json").read_text())
        edit_json(directory / "config.json", rope_parameters={**cfg["rope_parameters"], "rope_type": "spiral"})
    elif case == "rope_factor":
        cfg = json.loads((directory / "config.json").read_text())
        del cfg["rope_scaling"]["factor"]
        edit_json(directory / "config.json", rope_scaling=cfg["rope_scaling"])
    elif case == "no_tokenizer_json":
        (directory / "tokenizer.json").unlink()
    elif case == "no_tokenizer_config":
        (directory / "tokenizer_config.json").unlink()
    elif case == "slow_tokenizer":
        edit_json(directory / "tokenizer_config.json", tokenizer_class="LlamaTokenizer")
    elif case == "other_architecture":
        edit_json(directory / "config.json", model_type="llava_llama")
    elif case == "clip_as_main":
        shutil.copy(tower / "config.json", directory / "config.json")
    elif case == "tower_without_weights":
        (tower / "pytorch_model.bin").unlink()
    elif case == "tower_not_clip":
        shutil.copy(directory / "config.json", tower / "config.json")


BAD = [
    ("rope_type", ["config.json", "rope_scaling.rope_type", "longrope2"]),
    ("rope_5x_type", ["config.json", "rope_parameters.rope_type", "spiral"]),
    ("rope_factor", ["config.json", "rope_scaling.factor", "missing"]),
    ("no_tokenizer_json", ["tokenizer.json", "missing"]),
    ("no_tokenizer_config", ["tokenizer_config.json", "missing"]),
    ("slow_tokenizer", ["tokenizer_config.json", "tokenizer_class", "LlamaTokenizer"]),
    ("other_architecture", ["config.json", "model_type", "llava_llama"]),
    ("clip_as_main", ["config.json", "model_type", "clip"]),
    ("tower_without_weights", ["no vision tower weights", "mm_vision_tower"]),
    ("tower_not_clip", ["config.json", "model_type", "llava_mini_llama", "CLIP"]),
]


@pytest.mark.parametrize("case,needles", BAD, ids=[c for c, _ in BAD])
def test_a_bad_checkpoint_is_one_line_naming_the_file_and_key(tmp_path, offline_hub, case, needles):
    tower = Path(shutil.copytree(TOWER, tmp_path / "tower"))
    directory = Path(shutil.copytree(MAIN, tmp_path / "llava-mini"))
    edit_json(directory / "config.json", mm_vision_tower=str(tower))
    _damage(directory, tower, case)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(directory)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, message


# ------------------------------------------------------------------------------------------------- doors


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory) -> Path:
    """An HF home whose cache holds the published checkpoint and its tower under their hub ids."""
    home = tmp_path_factory.mktemp("hf-home")
    fake_hf_cache(home / "hub", MAIN_ID, MAIN)
    fake_hf_cache(home / "hub", TOWER_ID, TOWER)
    return home


def vidmini(*args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "VIDMINI_MODEL"}
    return subprocess.run([sys.executable, "-m", "vidmini.cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          env={**full, **env}, timeout=600)


def in_process_tokens(directory: Path, image: Path, tokens: int) -> list[int]:
    from vidmini.engine.generate import SamplingConfig
    from vidmini.engine.inference import Engine

    loaded = load_checkpoint(directory)
    engine = Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids)
    steps = engine.forward_full(engine.image_pixels(Image.open(image)), QUESTION,
                                SamplingConfig(max_new_tokens=tokens, stop_ids=engine.eos_ids))
    return [s.token_id for s in steps]


def test_cli_ask_an_image_with_model_a_path_a_hub_id_and_vidmini_model(hub_home, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    image = tmp_path / "picture.png"
    test_image(5, (64, 48)).save(image)
    env = {**hub_env(hub_home), "VIDMINI_HOME": str(tmp_path / "home")}
    ask = ("ask", str(image), QUESTION, "--json", "--max-new-tokens", "5")
    by_path = vidmini(*ask, "--model", str(MAIN), env=env)
    assert by_path.returncode == 0, by_path.stderr
    by_id = vidmini(*ask, "--model", MAIN_ID, env=env)
    by_env = vidmini(*ask, env={**env, "VIDMINI_MODEL": MAIN_ID})
    assert by_id.returncode == 0 and by_env.returncode == 0, by_id.stderr + by_env.stderr
    tokens = [json.loads(r.stdout)["token_ids"] for r in (by_path, by_id, by_env)]
    assert tokens[0] == tokens[1] == tokens[2]

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert tokens[0] == in_process_tokens(MAIN, image, 5)[: len(tokens[0])]


def test_cli_ask_the_hd_variant_and_a_video(hub_home, tmp_path):
    """HD: the same files with `resolution_ratio: 2` (each image as a 2×2 grid plus the whole)."""
    hd = Path(shutil.copytree(MAIN, tmp_path / "llava-mini-hd"))
    edit_json(hd / "config.json", resolution_ratio=2)
    image = tmp_path / "picture.png"
    test_image(6, (80, 60)).save(image)
    env = {**hub_env(hub_home), "VIDMINI_HOME": str(tmp_path / "home")}
    res = vidmini("ask", str(image), QUESTION, "--model", str(hd), "--json", "--max-new-tokens", "4", env=env)
    assert res.returncode == 0, res.stderr
    plain = vidmini("ask", str(image), QUESTION, "--model", str(MAIN), "--json", "--max-new-tokens", "4",
                    "--logprobs", "1", env=env)
    hd_logprobs = vidmini("ask", str(image), QUESTION, "--model", str(hd), "--json", "--max-new-tokens", "4",
                          "--logprobs", "1", env=env)
    assert plain.returncode == 0 and hd_logprobs.returncode == 0, plain.stderr + hd_logprobs.stderr
    first = [json.loads(r.stdout)["logprobs"][0][0]["logprob"] for r in (plain, hd_logprobs)]
    assert first[0] != first[1]  # the HD grid reaches the model

    video = VIDEOS / "realshort.mp4"
    res = vidmini("ask", str(video), QUESTION, "--model", str(MAIN), "--json", "--max-new-tokens", "4", env=env)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["frames"] >= 2 and len(out["token_ids"]) >= 1


def test_summarize_with_model(hub_home, tmp_path):
    import jsonschema

    from vidmini.summaries.formats import JSON_SCHEMA

    folder = tmp_path / "videos"
    folder.mkdir()
    shutil.copy(VIDEOS / "realshort.mp4", folder / "clip.mp4")
    env = {**hub_env(hub_home), "VIDMINI_HOME": str(tmp_path / "home")}
    res = vidmini("summarize", str(folder), "--model", str(MAIN), "--out", str(tmp_path / "out"), "--format",
                  "json", "--window", "5", "--quiet", env=env)
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "out" / "clip.json").read_text())
    jsonschema.validate(summary, JSON_SCHEMA)
    assert str(MAIN) in json.dumps(summary)  # the summary says which model wrote it


def test_the_apps_load_another_model(tmp_path, offline_hub, monkeypatch):
    from streamlit.testing.v1 import AppTest

    fake_hf_cache(offline_hub, TOWER_ID, TOWER)
    monkeypatch.setenv("VIDMINI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    at = AppTest.from_file(str(REPO / "vidmini" / "ui" / "main.py"), default_timeout=180).run()
    assert not at.exception
    field = [t for t in at.text_input if t.label == "Load another model"][0]
    field.set_value(str(MAIN))
    [b for b in at.button if b.label == "Load model"][0].click().run()
    assert not at.exception
    assert not [e.value for e in at.error], [e.value for e in at.error]
    assert any(str(MAIN) in str(s.value) for s in at.success), [s.value for s in at.success]


def test_the_openai_style_tower_gives_a_search_space():
    """The text tower beside the vision tower (old-style config, .bin weights, CLIP's BPE) for moment search."""
    from vidmini.engine.retrieval import RetrievalSpace

    space = RetrievalSpace.load(TOWER)
    assert space is not None
    raw = json.loads((TOWER / "config.json").read_text())
    assert space.dim == raw["projection_dim"] and space.max_tokens == 77  # CLIP's (4.43 omits the default)
    rust = Tokenizer.from_file(str(TOWER / "tokenizer.json"))
    assert space.token_ids("a red circle") == rust.encode("a red circle").ids
    assert space.eos_id == rust.token_to_id("<|endoftext|>")
    vectors = space.embed_text(["a red circle", "a blue square"])
    assert vectors.shape == (2, raw["projection_dim"])
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(vectors[0], vectors[1])
