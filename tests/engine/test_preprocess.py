"""Frame preprocessing equals the reference's (torch nearest resize to S×S, then the CLIP processor)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidmini.engine.frames import nearest_index
from vidmini.engine.vision import make_image_processor, preprocess_frames, resize_nearest


@pytest.mark.parametrize("h,w,size", [(1080, 1920, 336), (720, 1280, 224), (241, 321, 28), (17, 5, 336),
                                      (336, 336, 336), (2160, 3840, 336), (1081, 1919, 336)])
def test_nearest_gather_equals_torch_interpolate(h, w, size):
    frame = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    expected = F.interpolate(torch.from_numpy(frame).permute(2, 0, 1)[None].float(), size=(size, size))
    expected = expected.to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(resize_nearest(frame, size), expected)


def test_nearest_index_equals_torch_over_many_sizes():
    """The numpy index (what the decoding child uses, without torch) is torch's pick for every size tried."""
    sizes = [*range(1, 700), *range(700, 4400, 37)]
    for dst in (14, 28, 80, 224, 336, 384, 448, 672):
        for src in sizes:
            picked = F.interpolate(torch.arange(src, dtype=torch.float32)[None, None], size=dst, mode="nearest")
            assert np.array_equal(nearest_index(src, dst), picked[0, 0].long().numpy()), (src, dst)


def test_preprocess_frames_matches_the_reference_pipeline():
    proc = make_image_processor(28)
    frames = np.random.default_rng(1).integers(0, 256, (3, 50, 70, 3), dtype=np.uint8)
    got = preprocess_frames(frames, proc)
    small = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(28, 28)).to(torch.uint8)
    expected = proc(images=list(small.permute(0, 2, 3, 1).numpy()), return_tensors="np")["pixel_values"]
    assert got.shape == (3, 1, 3, 28, 28)
    assert np.allclose(got[:, 0].numpy(), expected, atol=1e-6)
