"""CLIP's joint text–image space, for moment search.

Frames get their embedding from the vision forward pass ingest already runs: the final layer's pooled (CLS,
post-layernorm) output through `visual_projection`. Queries go through the text tower that sits beside the
vision tower in its Hugging Face directory (CLIP ViT-L/14-336 for the real model; the demo model's own small
one). A vision directory without a text tower gives no space: ingest and answers still work, search says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class SearchUnavailable(RuntimeError):
    """The model has no text tower, or the video was ingested without retrieval embeddings."""


def _read_tensor(directory: Path, key: str) -> torch.Tensor | None:
    """One tensor from a Hugging Face directory's weights, without loading the rest."""
    from safetensors import safe_open

    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            if key in f.keys():
                return f.get_tensor(key)
    for path in sorted(directory.glob("pytorch_model*.bin")):
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if key in state:
            return state[key]
    return None


@dataclass
class RetrievalSpace:
    """Unit-norm embeddings of frames (from pooled vision features) and of text queries, comparable by dot."""

    visual_projection: nn.Linear
    text_model: nn.Module  # CLIPTextModelWithProjection
    tokenizer: object
    eos_id: int
    max_tokens: int
    name: str

    @property
    def dim(self) -> int:
        return self.visual_projection.out_features

    @classmethod
    def load(cls, vision_dir: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32
             ) -> RetrievalSpace | None:
        """The space of a CLIP directory, or None when it holds no text tower or projection."""
        from transformers import CLIPTextModelWithProjection

        from vidmini.engine.checkpoint import load_clip_part
        from vidmini.engine.hf_files import FileFormatError, clip_text_config, load_tokenizer, read_json

        directory = Path(vision_dir)
        try:
            text_config = clip_text_config(directory)
            projection_dim = read_json(directory / "config.json").get("projection_dim")
        except (FileFormatError, TypeError, ValueError):
            return None
        if text_config is None:
            return None  # a vision-only tower (CLIPVisionConfig): no text tower to search with
        weight = _read_tensor(directory, "visual_projection.weight")
        if weight is None:
            return None
        if projection_dim is not None:
            text_config.projection_dim = projection_dim  # the joint space's width lives on the pair
        try:
            text = load_clip_part(CLIPTextModelWithProjection, text_config, directory, "text_model.", dtype, device,
                                  "text tower")
            tokenizer = load_tokenizer(directory, classes=None)
        except (OSError, ValueError):
            return None
        projection = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            projection.weight.copy_(weight)
        # CLIP's legacy configs say eos 2 and pool at the largest id; the tokenizer knows the real one.
        eos = text_config.eos_token_id
        if eos is None or eos == 2:
            eos = tokenizer.eos_token_id
        return cls(projection.eval(), text, tokenizer, int(eos), int(text_config.max_position_embeddings),
                   directory.name)

    def token_ids(self, text: str) -> list[int]:
        """The ids the text tower was trained on: the tokenizer's own specials when they end in the pooled
        end-of-text token (CLIP's BPE), else the bare text plus that token (the demo model's Llama-style one)."""
        ids = self.tokenizer(text, add_special_tokens=True).input_ids
        if not ids or ids[-1] != self.eos_id:
            ids = self.tokenizer(text, add_special_tokens=False).input_ids + [self.eos_id]
        if len(ids) > self.max_tokens:
            ids = ids[: self.max_tokens - 1] + [self.eos_id]
        return ids

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), dim) float32, unit norm."""
        if not texts:
            raise ValueError("no text to embed")
        ids = [self.token_ids(t) for t in texts]
        width = max(map(len, ids))
        input_ids = torch.tensor([i + [self.eos_id] * (width - len(i)) for i in ids], device=self.device)
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=self.device)
        out = self.text_model(input_ids=input_ids, attention_mask=mask).text_embeds
        return F.normalize(out.float(), dim=-1).cpu()

    @torch.no_grad()
    def embed_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled vision outputs (B, width) → (B, dim) float32, unit norm."""
        out = self.visual_projection(pooled.to(self.visual_projection.weight))
        return F.normalize(out.float(), dim=-1).cpu()

    @property
    def device(self) -> torch.device:
        return self.visual_projection.weight.device
