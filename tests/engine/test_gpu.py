"""The same equivalences on a CUDA device (skipped without one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidmini.demo.tiny import build_tiny_checkpoint
from vidmini.engine.checkpoint import load_checkpoint
from vidmini.engine.generate import SamplingConfig
from vidmini.engine.inference import Engine

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-3), ("bf16", 3e-2)])
def test_split_equals_full_on_cuda(tmp_path, dtype, tol):
    loaded = load_checkpoint(build_tiny_checkpoint(tmp_path, seed=7), dtype=dtype, device="cuda")
    eng = Engine(loaded.model, loaded.tokenizer, loaded.processor, loaded.eos_ids)
    frames = np.random.default_rng(0).integers(0, 256, (16, 40, 60, 3), dtype=np.uint8)
    pixels = eng.frame_pixels(frames)
    states = eng.encode_frames(pixels)
    assert states.keys[0].is_cuda
    full = eng.first_logits_full(pixels, "What colour is the square?")
    cached = eng.first_logits("What colour is the square?", states, eng.build_prefix_cache(states))
    assert float((cached - full).norm() / full.norm()) < tol
    one = SamplingConfig(max_new_tokens=8, stop_ids=())
    if dtype == "fp32":
        got = [e.token_id for e in eng.answer("What colour is the square?", states, one)]
        assert got == [e.token_id for e in eng.forward_full(pixels, "What colour is the square?", one)]
