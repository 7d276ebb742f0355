"""Tiny random-weight LLaVA-Mini checkpoints, in the reference format, for tests, benchmarks and the
fallback `make run` (their answers are meaningless)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig

from vidmini.demo.tokenizer import build_llama3_style_tokenizer, generation_eos_ids
from vidmini.engine.checkpoint import save_checkpoint
from vidmini.engine.config import LlavaMiniConfig
from vidmini.engine.model import LlavaMiniModel
from vidmini.engine.vision import VisionTower, make_image_processor

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def tiny_llama_config(vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      intermediate: int = 128, bos: int | None = None, eos: int | list[int] | None = None
                      ) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=131072,
        rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), rms_norm_eps=1e-5, bos_token_id=bos,
        eos_token_id=eos, tie_word_embeddings=False,
    )


def tiny_clip(image_size: int = 28, patch: int = 7, width: int = 32, layers: int = 3, seed: int = 0
              ) -> CLIPVisionModel:
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch, projection_dim=width)
    return CLIPVisionModel(cfg).eval()


def randomize_(model: LlavaMiniModel, seed: int, std: float = 0.2) -> None:
    """Weights with enough spread that different inputs give clearly different logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.vision_tower.") or name.endswith("pos_embed"):
                continue
            if "norm" in name or name.split(".")[-2].startswith("ln_"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen) if name.endswith("weight")
                        else 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def build_tiny_checkpoint(directory: str | Path, seed: int = 0, resolution_ratio: int = 1,
                          tokenizer_model_max_length: int | None = None, hidden: int = 64,
                          layers: int = 2, prefusion_layers: int = 2) -> Path:
    """Write a complete tiny checkpoint (weights, config, tokenizer, CLIP tower in `vision_tower/`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_llama3_style_tokenizer(tmp)
    clip = tiny_clip(seed=seed)
    vision_dir = directory / "vision_tower"
    clip.save_pretrained(str(vision_dir))
    make_image_processor(clip.config.image_size).save_pretrained(str(vision_dir))
    eos = list(generation_eos_ids(tok))
    cfg = LlavaMiniConfig(
        llama=tiny_llama_config(len(tok), hidden=hidden, layers=layers, bos=tok.bos_token_id, eos=eos),
        compressor_size=1, prefusion_layer_num=prefusion_layers, resolution_ratio=resolution_ratio,
        mm_vision_tower="vision_tower", mm_hidden_size=clip.config.hidden_size,
        tokenizer_model_max_length=tokenizer_model_max_length,
    )
    torch.manual_seed(seed)
    model = LlavaMiniModel(cfg, VisionTower(clip))
    randomize_(model, seed)
    save_checkpoint(model, tok, directory, eos_ids=tuple(eos))
    return directory
