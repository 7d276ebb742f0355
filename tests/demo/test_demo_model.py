"""The shipped demo model: its format, its tokenizer, its training script, and that it answers correctly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vidmini.demo.render import render_samples
from vidmini.demo.world import BACKGROUNDS, KINDS, SHAPE_COLOURS, WORDS, generate_timeline, truth_at
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.load import SHIPPED_MODEL_DIR, choose_model, open_engine
from vidmini.engine.prompt import SYSTEM_PROMPT, build_prompt

REPO = Path(__file__).resolve().parents[2]
shipped = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")


def load_eval_module():
    spec = importlib.util.spec_from_file_location("eval_default_model", REPO / "research" / "bench" / "eval_default_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@shipped
def test_shipped_checkpoint_is_small_reference_format_and_the_default(monkeypatch):
    monkeypatch.delenv("VIDMINI_MODEL", raising=False)
    files = [p for p in SHIPPED_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 30 * 1024 * 1024
    config = json.loads((SHIPPED_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "llava_mini_llama" and config["mm_vision_tower"] == "vision_tower"
    assert config["compressor_size"] == 1 and config["vidmini_demo"] is True
    names = load_file(str(SHIPPED_MODEL_DIR / "model.safetensors")).keys()
    assert {"model.compressor.query", "model.mm_projector.0.weight", "model.prefusion_layers.0.mlp.up_proj.weight",
            "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"} <= set(names)
    choice = choose_model(None)
    assert choice.is_demo and Path(choice.location) == SHIPPED_MODEL_DIR and "demo" in choice.label.lower()
    assert "synthetic" in choice.label.lower()
    monkeypatch.setenv("VIDMINI_MODEL", "/some/other/model")
    assert choose_model(None).location == "/some/other/model" and choose_model("x").location == "x"


@shipped
def test_tokenizer_is_llama3_style_with_one_token_answers():
    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    tok = engine.tokenizer
    assert tok.convert_tokens_to_ids("<|eot_id|>") in engine.eos_ids
    assert len(tok(SYSTEM_PROMPT, add_special_tokens=False).input_ids) == 1
    prompt = build_prompt(tok, "Is there a green triangle?")
    assert prompt.prefix.tolist()[:2] == [tok.bos_token_id, tok.bos_token_id]  # the reference's two BOS
    for answer in ["yes", "no", *KINDS, *SHAPE_COLOURS, *BACKGROUNDS, *WORDS, *"0123456"]:
        assert len(tok(answer, add_special_tokens=False).input_ids) == 1, answer


@shipped
def test_text_tower_finds_frames_with_the_named_thing():
    """Search on the demo model: CLIP text features of "a <colour> <kind>" rank frames showing it first."""
    from transformers import AutoTokenizer, CLIPModel

    from vidmini.engine.hf_files import load_image_processor
    from vidmini.engine.vision import preprocess_frames

    clip = CLIPModel.from_pretrained(str(SHIPPED_MODEL_DIR / "vision_tower")).eval()
    tok = AutoTokenizer.from_pretrained(str(SHIPPED_MODEL_DIR / "vision_tower"))
    processor = load_image_processor(SHIPPED_MODEL_DIR / "vision_tower")
    timeline = generate_timeline(424242, 240)
    frames = [frame for _, frame in render_samples(timeline)]
    truths = [truth_at(timeline, t) for t in range(len(frames))]
    with torch.no_grad():
        images = clip.get_image_features(pixel_values=preprocess_frames(frames, processor)[:, 0])
        images = torch.nn.functional.normalize(getattr(images, "pooler_output", images), dim=-1)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    precisions, base_rates = [], []
    for colour in SHAPE_COLOURS:
        for kind in KINDS:
            relevant = [any(s.kind == kind and s.colour == colour for s in t.shapes) for t in truths]
            if sum(relevant) < 10:
                continue
            ids = torch.tensor([tok(f"a {colour} {kind}", add_special_tokens=False).input_ids + [eot]])
            with torch.no_grad():
                text = clip.get_text_features(input_ids=ids)
                text = torch.nn.functional.normalize(getattr(text, "pooler_output", text), dim=-1)
            top = (images @ text.T)[:, 0].topk(10).indices.tolist()
            precisions.append(np.mean([relevant[i] for i in top]))
            base_rates.append(np.mean(relevant))
    assert len(precisions) >= 5
    # far better than picking frames at random (the base rate), and most of the top 10 right
    assert np.mean(precisions) >= max(0.6, 2.5 * np.mean(base_rates)), (precisions, base_rates)


@shipped
def test_sixty_question_slice_of_the_evaluation():
    """The real product path (mp4 on disk → 1 fps decode → encode → store → answer) on held-out videos."""
    ev = load_eval_module()
    results = ev.evaluate(seed=11, n=60, model=str(SHIPPED_MODEL_DIR), workdir=_tmp(), min_s=60, max_s=150,
                          log=lambda m: None, fps=4)
    assert len(results) == 60 and {r.family for r in results} == set(ev.FAMILIES)
    accuracy = sum(r.correct for r in results) / len(results)
    assert accuracy >= 0.8, [(r.question, r.expected, r.got) for r in results if not r.correct]


def _tmp() -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="vidmini-eval-test-"))


def test_training_script_is_seeded_and_writes_the_reference_format(tmp_path):
    """Two short runs with one seed give identical weights; the result loads through the engine's loader and a
    different seed gives different weights."""
    from research.training.train import TrainConfig, train

    cfg = dict(videos=4, video_s=(20, 30), long_videos=2, long_video_s=(30, 40), stage0_steps=2, stage0_batch=8,
               stage1_steps=3, qfusion_steps=2, qfusion_videos=4, stage2_steps=2, stage1_batch=4, stage2_batch=2,
               search_steps=2, search_batch=8, search_videos=2, retrieval_steps=2, retrieval_videos=1, binding_steps=2,
               binding_videos=2, binding_stage2_steps=2, held_out_s=12, eval_bags=8)
    a = train(tmp_path / "a", TrainConfig(seed=3, **cfg))
    b = train(tmp_path / "b", TrainConfig(seed=3, **cfg))
    c = train(tmp_path / "c", TrainConfig(seed=4, **cfg))
    wa, wb, wc = (load_file(str(d / "model.safetensors")) for d in (a, b, c))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    log = [json.loads(line) for line in (a / "training_log.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in log] == [0, 0, 1, 1, 1, "qfusion", "qfusion", 2, 2, "2b", "2b", "binding", "binding",
                                         "2c", "2c", 3, 3]
    assert "held_out" in [r for r in log if r["stage"] == "binding"][-1]  # its held-out heads after its last step
    assert all(r["retrieval"] > 0 for r in log if r["stage"] == "2b")
    assert "held_out" in log[6]  # question fusion's held-out head accuracy after its last step
    assert "held_out" in log[1]  # perception metrics on held-out frames after the last perception step
    loaded = load_checkpoint(a)
    assert loaded.model.config.extra.get("vidmini_demo") is True
    assert loaded.model.config.prefusion_layer_num == 4  # question fusion and binding each added one
    assert torch.equal(loaded.model.lm_head.weight, wa["lm_head.weight"])

    # stage 3 alone (search) on a copy: same weights as in the full run, and nothing an answer reads changes
    import shutil

    from research.training.train import retune_search

    d = tmp_path / "d"
    shutil.copytree(a, d)
    retune_search(d, TrainConfig(seed=3, **cfg))
    va, vd = (load_file(str(x / "vision_tower" / "model.safetensors")) for x in (a, d))
    moved = {k for k in va if not torch.equal(va[k], vd[k])}
    last = f"vision_model.encoder.layers.{len(loaded.model.vision.vision_tower.encoder.layers) - 1}."
    assert moved and all(k.startswith((last, "vision_model.post_layernorm", "visual_projection", "text_model.",
                                       "text_projection", "logit_scale")) for k in moved)
    assert any(k.startswith(last) for k in moved) and any(k.startswith("text_model.") for k in moved)
    again = load_checkpoint(d)
    pixels = torch.rand(3, 1, 3, 80, 80) * 2 - 1
    with torch.no_grad():
        before, after = loaded.model.encode_visual(pixels), again.model.encode_visual(pixels)
        pooled_before = loaded.model.encode_visual_pooled(pixels)[2]
        pooled_after = again.model.encode_visual_pooled(pixels)[2]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))  # patches, compressed: as before
    assert not torch.equal(pooled_before, pooled_after)  # the search embedding did move

    # stage 2b (retrieval), then binding (+ 2c), alone on a run without them: the full run's weights; 2b moves only
    # the LLM, binding adds the fourth pre-fusion layer
    from research.training.train import retune_llm, stage2_retrieval, stage_binding

    n = train(tmp_path / "n", TrainConfig(seed=3, **{**cfg, "retrieval_steps": 0, "binding_steps": 0}))
    assert load_checkpoint(n).model.config.prefusion_layer_num == 3
    before = load_file(str(n / "model.safetensors"))
    retune_llm(n, TrainConfig(seed=3, **cfg), stage2_retrieval)
    mid = load_file(str(n / "model.safetensors"))
    moved = {k for k in before if not torch.equal(before[k], mid[k])}
    assert moved and all(k.startswith(("model.layers.", "model.norm.", "lm_head.")) for k in moved)
    retune_llm(n, TrainConfig(seed=3, **cfg), stage_binding)
    after = load_file(str(n / "model.safetensors"))
    assert after.keys() == wa.keys() and all(torch.equal(after[k], wa[k]) for k in wa)
    assert set(after) - set(mid) and all(k.startswith("model.prefusion_layers.3.") for k in set(after) - set(mid))
    assert all(v.dtype == torch.float16 for v in after.values())  # the demo stores its weights in half precision
    vn = load_file(str(n / "vision_tower" / "model.safetensors"))
    assert all(torch.equal(vn[k], va[k]) for k in va)


@shipped
def test_demo_command_makes_the_sample_once_and_answers(tmp_path, monkeypatch):
    """`make run`'s command: a synthetic video made once under $VIDMINI_HOME, ingested, one question per family."""
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "VIDMINI_MODEL"}
    env["VIDMINI_HOME"] = str(tmp_path)
    cmd = [sys.executable, "-m", "vidmini.cli.main", "demo", "--seconds", "40", "--seed", "3"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert first.returncode == 0, first.stderr
    assert "writing the sample video" in first.stderr
    assert "demo model" in first.stdout and "synthetic" in first.stdout
    rows = [line for line in first.stdout.splitlines() if "truth:" in line]
    assert len(rows) >= 5 and all(("ok" in r) != ("WRONG" in r) for r in rows)
    assert sorted(p.suffix for p in (tmp_path / "samples").iterdir()) == [".json", ".mp4"]
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 0 and "writing the sample video" not in second.stderr
    assert [r.split("model:")[0] for r in rows] == [
        r.split("model:")[0] for r in second.stdout.splitlines() if "truth:" in r]


def test_demo_command_rejects_a_bad_length(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "VIDMINI_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-m", "vidmini.cli.main", "demo", "--seconds", "3"], capture_output=True,
                         text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 2 and res.stderr.strip() == "vidmini: error: --seconds must be between 10 and 10800"
    assert not (tmp_path / "samples").exists()


def test_training_pixels_equal_the_engines_preprocessing():
    """Training normalizes frames itself (fast, batched); it must feed the numbers inference feeds."""
    from research.training.train import normalize
    from vidmini.engine.vision import make_image_processor, preprocess_frames, resize_nearest

    frames = [frame for _, frame in render_samples(generate_timeline(77, 4))]
    ours = normalize(np.stack([resize_nearest(f, 80) for f in frames]))
    engine = preprocess_frames(frames, make_image_processor(80))[:, 0]
    assert ours.shape == engine.shape == (4, 3, 80, 80)
    assert torch.allclose(ours, engine, atol=1e-5)


@shipped
def test_binding_only_refuses_a_model_that_already_has_the_binding_layer(tmp_path, capsys):
    """`--binding-only` twice would stack a fifth pre-fusion layer on the shipped weights: it stops first."""
    import shutil

    from research.training.train import main

    target = tmp_path / "m"
    shutil.copytree(SHIPPED_MODEL_DIR, target)
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit):
        main(["--out", str(target), "--binding-only"])
    assert "already went through binding" in capsys.readouterr().err
    assert (target / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("mode", ["--binding-only", "--retrieval-only", "--search-only"])
def test_late_stage_modes_refuse_a_directory_without_a_trained_model(tmp_path, capsys, mode):
    """A wrong --out for a late stage alone: one line saying what is missing, before any work, nothing written."""
    from research.training.train import main

    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "nowhere"), mode])
    err = capsys.readouterr().err
    assert "is not a trained demo model directory" in err and "training_config.json" in err
    assert not (tmp_path / "nowhere").exists()
