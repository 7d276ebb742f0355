"""The CLIP vision tower and the reference's image/frame preprocessing."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from vidmini.engine.frames import resize_nearest

try:  # transformers 5 names the PIL-backed processor (the reference's "slow" one) explicitly
    from transformers import CLIPImageProcessorPil as ClipProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import CLIPImageProcessor as ClipProcessor
_ClipProcessor = ClipProcessor


class VisionTower(nn.Module):
    """CLIP ViT; features = hidden state of layer `select_layer`, CLS dropped for `patch`.

    Nested as `vision_tower.vision_tower` so parameter names match the reference checkpoints.
    """

    def __init__(self, clip: CLIPVisionModel, select_layer: int = -2, select_feature: str = "patch") -> None:
        super().__init__()
        self.vision_tower = clip
        self.select_layer = select_layer
        self.select_feature = select_feature

    @property
    def config(self) -> CLIPVisionConfig:
        return self.vision_tower.config

    @property
    def num_patches(self) -> int:
        return (self.config.image_size // self.config.patch_size) ** 2

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalized pixels → (B, patches, width) features."""
        return self.features_and_pooled(pixels)[0]

    def features_and_pooled(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and, from the same pass, the final layer's pooled output (CLS after post-layernorm):
        the input of CLIP's `visual_projection`, for retrieval embeddings."""
        out = self.vision_tower(pixel_values=pixels.to(self.vision_tower.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.select_layer]
        return (feats[:, 1:] if self.select_feature == "patch" else feats), out.pooler_output


def make_image_processor(image_size: int) -> _ClipProcessor:
    """A CLIP processor for a tower of the given input size (CLIP's mean/std, bicubic)."""
    return _ClipProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def processor_size(processor: _ClipProcessor) -> int:
    crop = processor.crop_size
    return int(crop["height"] if isinstance(crop, dict) else crop.height)


def expand_to_square(image: Image.Image, fill: tuple[int, ...]) -> Image.Image:
    """Pad to a square, the image centred (the reference's `expand2square`)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def split_grid(image: Image.Image, n: int) -> list[Image.Image]:
    """n×n crops in row-major order, then the whole image; [image] for n = 1."""
    if n == 1:
        return [image]
    w, h = image.size
    bw, bh = w // n, h // n
    crops = [image.crop((j * bw, i * bh, (j + 1) * bw, (i + 1) * bh)) for i in range(n) for j in range(n)]
    return [*crops, image]


def _pixels(processor: _ClipProcessor, images: list[Image.Image]) -> torch.Tensor:
    return torch.as_tensor(np.stack(processor(images=images, return_tensors="np")["pixel_values"]))


def preprocess_image(
    image: Image.Image, processor: _ClipProcessor, resolution_ratio: int = 1, aspect: str = "pad"
) -> torch.Tensor:
    """An image → (parts, 3, S, S); with `pad`, each part is padded to square with the processor's mean."""
    parts = split_grid(image.convert("RGB"), resolution_ratio)
    if aspect == "pad":
        fill = tuple(int(x * 255) for x in processor.image_mean)
        parts = [expand_to_square(p, fill) for p in parts]
    return _pixels(processor, parts)


def preprocess_frames(
    frames: list[np.ndarray] | np.ndarray, processor: _ClipProcessor, resolution_ratio: int = 1
) -> torch.Tensor:
    """Video frames (H, W, 3 uint8) → (F, parts, 3, S, S): nearest resize to S×S (no aspect kept), then the
    processor, as the reference does for video."""
    size = processor_size(processor)
    out = []
    for frame in frames:
        arr = resize_nearest(np.asarray(frame), size)
        parts = split_grid(Image.fromarray(arr), resolution_ratio)
        out.append(_pixels(processor, parts))
    return torch.stack(out)
