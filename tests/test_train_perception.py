"""The perception stage trains the token the product uses: `perceive` (c' from [patches, c] alone) gives the
engine's own fused compressed token."""

from __future__ import annotations

import pytest
import torch

from app.models import SHIPPED_MODEL_DIR, choose_model, open_engine
from engine.fusion import prefuse_prefix
from engine.prompt import build_prompt
from synth.train import load_video, normalize, perceive

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
