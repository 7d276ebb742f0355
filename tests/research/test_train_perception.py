"""The perception stage's shortcuts and targets: `perceive` gives the engine's own c', and the per-cell pair
targets name exactly the shape each cell holds."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from research.training.train import PAIRS, cell_pairs, fuse_batch, load_video, normalize, perceive
from vidmini.demo.world import CELLS, truth_at
from vidmini.engine.fusion import prefuse_prefix
from vidmini.engine.llama import attention, finish_layer, project_qkv
from vidmini.engine.load import SHIPPED_MODEL_DIR, choose_model, open_engine
from vidmini.engine.prompt import build_prompt

shipped = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").exists(), reason="no shipped demo model")


@shipped
def test_perceive_gives_the_engines_fused_compressed_token():
    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    model, tok = engine.model, engine.tokenizer
    video = load_video(4242, 6, model.vision.vision_tower.config.image_size)
    pixels = normalize(video.pixels)
    with torch.no_grad():
        c, _, _ = perceive(model, pixels)
        patches, compressed = model.encode_visual(pixels[:, None])
        states = prefuse_prefix(model, patches, compressed, build_prompt(tok, "").prefix)
    expected = states.compressed.reshape(len(video.pixels), -1).float()
    assert c.shape == expected.shape
    torch.testing.assert_close(c.float(), expected, rtol=1e-4, atol=1e-4)
    # and it is not trivially equal: different frames give different tokens
    assert (c[0] - c[1:]).abs().max() > 1e-3


@pytest.mark.parametrize("seed", [3, 77, 1234])
def test_cell_pair_targets_name_each_cells_shape(seed):
    video = load_video(seed, 20, 32)
    pairs = cell_pairs(torch.from_numpy(video.probes["cells"])).numpy()
    assert pairs.shape == (20, CELLS)
    for t in range(20):
        want = np.zeros(CELLS, np.int64)
        for s in truth_at(video.timeline, t).shapes:
            want[s.cell] = 1 + PAIRS.index((s.colour, s.kind))
        np.testing.assert_array_equal(pairs[t], want)
    assert pairs.max() <= len(PAIRS) and (pairs > 0).any()


def _full_sequence(model, pixels, text_ids):
    """Every position through every pre-fusion layer (what the training shortcuts must equal)."""
    tower = model.vision
    out = tower.vision_tower(pixel_values=pixels, output_hidden_states=True)
    feats = out.hidden_states[tower.select_layer][:, 1:]
    patches = model.model.mm_projector(feats)
    x = torch.cat([patches, model.model.mm_projector(model.model.compressor(feats)), model.embed(text_ids)], 1)
    cos, sin = model.rope(torch.arange(x.shape[1])[None])
    for layer in model.model.prefusion_layers:
        q, k, v = project_qkv(layer, x, cos, sin)
        x = finish_layer(layer, x, attention(q, k, v, None, causal=True))
    n = patches.shape[1]
    return x[:, n], x[:, n + 1 :]


@shipped
def test_fuse_batch_equals_the_full_sequence():
    engine = open_engine(choose_model(str(SHIPPED_MODEL_DIR)))
    model, tok = engine.model, engine.tokenizer
    video = load_video(999, 4, model.vision.vision_tower.config.image_size)
    pixels = normalize(video.pixels)
    text_ids = torch.cat([build_prompt(tok, "").prefix, build_prompt(tok, "How many stars are there?").question])
    text_ids = text_ids[None].repeat(len(pixels), 1)
    with torch.no_grad():
        c, text, _, _ = fuse_batch(model, pixels, text_ids)
        c_full, text_full = _full_sequence(model, pixels, text_ids)
    assert text.shape == text_full.shape == (len(pixels), text_ids.shape[1], c.shape[-1])
    torch.testing.assert_close(c, c_full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(text, text_full, rtol=1e-4, atol=1e-4)


def test_bag_head_reads_only_the_plain_patch_mean_and_is_absent_when_off():
    """The bag loss asks which pairs a frame holds from the plain mean of its patch features, so where a shape sits
    cannot matter (any average of the patches keeps what it holds); with weight 0 there is no head and no loss."""
    from research.training.train import CellHeads, ProbeHeads, cell_pooling

    torch.manual_seed(0)
    cells = CellHeads(16, cell_pooling(80, 10))
    heads = ProbeHeads(32, cells, bag_weight=2.0)
    feats = torch.randn(3, 64, 16, requires_grad=True)
    present = (torch.rand(3, len(PAIRS)) < 0.2).float()
    loss = heads.bag_loss(feats, present)
    shuffled = heads.bag_loss(feats[:, torch.randperm(64)], present)
    assert torch.allclose(loss, shuffled, atol=1e-6) and loss > 0
    loss.backward()
    assert torch.allclose(feats.grad, feats.grad[:, :1].expand_as(feats.grad))  # every patch gets the same gradient
    off = ProbeHeads(32, cells)
    assert not hasattr(off, "bag") and off.bag_loss(feats, present).item() == 0.0


@pytest.mark.parametrize("cpuinfo, expected", [
    ("processor\t: 0\nflags\t\t: fpu sse2 fma avx avx2\n", False),  # this project's AMD EPYC, 2026-12-02
    ("flags\t\t: avx2 avx512f avx512bw avx512_bf16\n", True),
    ("flags\t\t: avx2 amx_bf16 amx_tile\n", True),
    ("processor\t: 0\nmodel name\t: something\n", None),  # no flags line: unknown, not "no"
])
def test_native_bf16_is_read_from_the_cpu_flags(cpuinfo, expected):
    from research.training.train import cpu_has_native_bf16

    assert cpu_has_native_bf16(cpuinfo) is expected


def test_bf16_on_a_cpu_that_emulates_it_warns_before_any_work(monkeypatch, tmp_path):
    import research.training.train as train_mod

    class Stop(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(train_mod, "build_tokenizer", stop)
    with pytest.warns(UserWarning, match="emulated"), pytest.raises(Stop):
        train_mod.train(tmp_path / "m", train_mod.TrainConfig(bf16=True))
    monkeypatch.setattr(train_mod, "cpu_has_native_bf16", lambda: True)
    with pytest.raises(Stop), warnings.catch_warnings():  # no warning where bfloat16 is native
        warnings.simplefilter("error")
        train_mod.train(tmp_path / "m2", train_mod.TrainConfig(bf16=True))


@pytest.mark.parametrize("name", ["held_out_s", "eval_bags"])
def test_held_out_settings_below_one_are_refused_before_training(name):
    from research.training.train import TrainConfig, main

    with pytest.raises(ValueError, match=f"{name} must be >= 1, got 0"):
        TrainConfig(**{name: 0})
    with pytest.raises(ValueError, match=f"{name} must be >= 1, got -3"):
        main(["--out", "/nonexistent/never-written", f"--{name.replace('_', '-')}", "-3"])
