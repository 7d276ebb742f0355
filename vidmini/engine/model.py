"""The LLaVA-Mini network: vision tower, compressor, projector, pre-fusion layers and the Llama LLM.

Module names follow the reference state dict (`model.*`, `lm_head`). The forward passes live in
`engine.fusion` (pre-fusion, full and split) and `engine.llama` (the LLM with an explicit KV cache).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm

from vidmini.engine.config import LlavaMiniConfig
from vidmini.engine.modules import Compressor, build_projector
from vidmini.engine.rope import RotaryEmbedding
from vidmini.engine.vision import VisionTower


class LlavaMiniBody(nn.Module):
    """Everything under the reference's `model.` prefix."""

    def __init__(self, config: LlavaMiniConfig, vision: VisionTower | None) -> None:
        super().__init__()
        llama = config.llama
        self.embed_tokens = nn.Embedding(llama.vocab_size, llama.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(llama, i) for i in range(llama.num_hidden_layers))
        self.norm = LlamaRMSNorm(llama.hidden_size, eps=llama.rms_norm_eps)
        self.prefusion_layers = nn.ModuleList(
            LlamaDecoderLayer(llama, i) for i in range(config.prefusion_layer_num)
        )
        self.compressor = Compressor(config.compressor_size, config.mm_hidden_size, config.compressor_num_heads)
        self.mm_projector = build_projector(config.mm_projector_type, config.mm_hidden_size, llama.hidden_size)
        if vision is not None:
            self.vision_tower = vision


class LlavaMiniModel(nn.Module):
    """Parameters and the per-piece computations; see `engine.fusion` for how they compose."""

    def __init__(self, config: LlavaMiniConfig, vision: VisionTower | None = None, attn: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.attn_impl = attn
        config.llama._attn_implementation = "sdpa" if attn == "flash_attention_2" else attn
        self.model = LlavaMiniBody(config, vision)
        self.lm_head = nn.Linear(config.llama.hidden_size, config.llama.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)

    @property
    def vision(self) -> VisionTower:
        tower = getattr(self.model, "vision_tower", None)
        if tower is None:
            raise RuntimeError("this model has no vision tower loaded")
        return tower

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for integer positions (any shape (B, T)), in the model's dtype."""
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        return self.rotary(probe, positions.to(self.device))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings; ids <= 0 (placeholders, padding) embed as id 0, as the reference does."""
        return self.model.embed_tokens(ids.clamp(min=0).to(self.device))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(hidden)).float()

    @torch.no_grad()
    def encode_visual(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, parts, 3, S, S) → projected patch tokens (B, Nv, d) and compressed tokens (B, q, d).

        parts = 1: 576 patch tokens. parts = n² + 1 (crops, then the whole image): the crops' tokens stitched
        into one (n·24)² grid, then the whole image's 576; the compressor runs over the stitched grid.
        """
        return self.encode_visual_pooled(pixels)[:2]

    @torch.no_grad()
    def encode_visual_pooled(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`encode_visual` plus the vision tower's pooled output of the whole image (B, width), from the same
        forward pass (retrieval embeddings come from it)."""
        b, parts = pixels.shape[:2]
        feats, pooled = self.vision.features_and_pooled(pixels.flatten(0, 1).to(self.device))
        pooled = pooled.view(b, parts, -1)[:, -1]
        n_patch, width = feats.shape[1], feats.shape[2]
        feats = feats.view(b, parts, n_patch, width)
        if parts == 1:
            whole = feats[:, 0]
            compressed = self.model.compressor(whole.to(self.dtype))
            patches = self.model.mm_projector(whole.to(self.dtype))
        else:
            n = int(round((parts - 1) ** 0.5))
            if n * n != parts - 1:
                raise ValueError(f"{parts} image parts is not n² crops + 1 whole image")
            g = int(round(n_patch**0.5))
            stitched = (
                feats[:, : n * n].reshape(b, n, n, g, g, width).transpose(2, 3).reshape(b, n * n * n_patch, width)
            )
            compressed = self.model.compressor(stitched.to(self.dtype))
            crops = self.model.mm_projector(feats[:, : n * n].to(self.dtype))
            crops = crops.reshape(b, n, n, g, g, -1).transpose(2, 3).reshape(b, n * n * n_patch, -1)
            patches = torch.cat([crops, self.model.mm_projector(feats[:, -1].to(self.dtype))], dim=1)
        return patches, self.model.mm_projector(compressed), pooled
