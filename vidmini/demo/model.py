"""The shipped demo model's shape, tokenizer and freshly initialized weights (training is `research.training.train`).

It is the full LLaVA-Mini architecture at a small size, built from the engine's own classes, plus a CLIP
text tower trained contrastively with the vision tower (text → frame search; the real model uses CLIP's).
The CLIP pair is saved as one `CLIPModel` in `vision_tower/`, the layout the real checkpoint's
`openai/clip-vit-large-patch14-336` has, so the engine loads the vision half exactly as it loads the real one.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPVisionModel, PreTrainedTokenizerFast

from vidmini.demo.tiny import tiny_llama_config
from vidmini.demo.tokenizer import DEFAULT_CORPUS, build_llama3_style_tokenizer, generation_eos_ids
from vidmini.demo.world import BACKGROUNDS, KINDS, SHAPE_COLOURS, WORDS
from vidmini.engine.checkpoint import save_checkpoint
from vidmini.engine.config import LlavaMiniConfig
from vidmini.engine.hf_files import load_tokenizer
from vidmini.engine.model import LlavaMiniModel
from vidmini.engine.prompt import SYSTEM_PROMPT
from vidmini.engine.vision import VisionTower, make_image_processor

DEMO_NAME = "vidmini-demo"
DEMO_NOTICE = "vidmini-demo: a small DEMO model trained only on a synthetic world of shapes, words and colours"


@dataclass(frozen=True)
class DemoSpec:
    """Sizes of the demo model (about 6 M parameters, 24 MB in float32)."""

    image_size: int = 80
    patch_size: int = 10
    vision_width: int = 128
    vision_layers: int = 4
    text_width: int = 128
    text_layers: int = 3
    embed_dim: int = 128  # joint CLIP space for search
    hidden: int = 256
    intermediate: int = 640
    llm_layers: int = 4
    prefusion_layers: int = 2  # built with two; question fusion (research.training.qfusion) adds a third
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 1024  # regular BPE entries; specials and the system prompt come after
    max_tokens: int = 32768


def world_corpus() -> list[str]:
    """Text the tokenizer learns merges from: the prompt, every question template and answer, captions."""
    lines = [SYSTEM_PROMPT] * 4 + list(DEFAULT_CORPUS)
    for kind in KINDS:
        lines += [f"What colour is the {kind}?", f"How many {kind}s are there?"] * 3
        for colour in SHAPE_COLOURS:
            lines += [f"Is there a {colour} {kind}?", f"a {colour} {kind}"] * 2
        for other in KINDS:
            if other != kind:
                lines.append(f"Which appears first, the {kind} or the {other}?")
    lines += ["What word is shown?", "What colour is the background?"] * 4
    for bg in BACKGROUNDS:
        lines += [f"on a {bg} background", bg] * 3
    lines += [f"the word {w}" for w in WORDS] * 3 + list(WORDS) * 3
    answers = ["yes", "no", *[str(i) for i in range(10)], *KINDS, *SHAPE_COLOURS, *BACKGROUNDS, *WORDS]
    lines += answers * 40  # bare answers (no leading space) become single tokens
    return lines


def build_tokenizer(out_dir: str | Path, spec: DemoSpec = DemoSpec()) -> PreTrainedTokenizerFast:
    """Llama-3-style tokenizer for the world. The fixed system prompt is one added token, so each frame's
    pre-fusion pass carries a dozen prompt tokens instead of fifty."""
    with tempfile.TemporaryDirectory() as tmp:
        build_llama3_style_tokenizer(tmp, vocab_size=spec.vocab_size, corpus=world_corpus())
        tok = AutoTokenizer.from_pretrained(tmp)
    tok.add_tokens([AddedToken(SYSTEM_PROMPT, normalized=False, special=False, single_word=False)])
    tok.save_pretrained(str(out_dir))
    return load_tokenizer(Path(out_dir))


def build_clip(spec: DemoSpec, tok: PreTrainedTokenizerFast) -> CLIPModel:
    eot = generation_eos_ids(tok)[0]
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=spec.text_width, intermediate_size=4 * spec.text_width,
                         num_hidden_layers=spec.text_layers, num_attention_heads=4, max_position_embeddings=32,
                         eos_token_id=eot, bos_token_id=tok.bos_token_id, pad_token_id=eot),
        vision_config=dict(hidden_size=spec.vision_width, intermediate_size=4 * spec.vision_width,
                           num_hidden_layers=spec.vision_layers, num_attention_heads=4,
                           image_size=spec.image_size, patch_size=spec.patch_size),
        projection_dim=spec.embed_dim,
    )
    return CLIPModel(cfg)


def vision_half(clip: CLIPModel) -> CLIPVisionModel:
    """The CLIPModel's vision transformer, shared (trained together, saved once). transformers 5 builds
    `CLIPModel.vision_model` as a `CLIPVisionModel`; 4.x built the bare transformer."""
    vis = clip.vision_model
    if not isinstance(vis, CLIPVisionModel):
        raise RuntimeError("this transformers version nests CLIP differently; the demo model needs transformers 5")
    return vis


def build_demo_model(spec: DemoSpec, tok: PreTrainedTokenizerFast, seed: int) -> tuple[LlavaMiniModel, CLIPModel]:
    torch.manual_seed(seed)
    clip = build_clip(spec, tok)
    eos = generation_eos_ids(tok)
    llama = tiny_llama_config(len(tok), hidden=spec.hidden, layers=spec.llm_layers, heads=spec.heads,
                              kv_heads=spec.kv_heads, intermediate=spec.intermediate, bos=tok.bos_token_id,
                              eos=eos)
    llama.initializer_range = 0.02
    cfg = LlavaMiniConfig(
        llama=llama, compressor_size=1, prefusion_layer_num=spec.prefusion_layers, resolution_ratio=1,
        mm_vision_tower="vision_tower", mm_hidden_size=spec.vision_width, mm_projector_type="mlp2x_gelu",
        tokenizer_model_max_length=spec.max_tokens, compressor_num_heads=8,
        extra={"vidmini_demo": True, "vidmini_notice": DEMO_NOTICE},
    )
    model = LlavaMiniModel(cfg, VisionTower(vision_half(clip)))
    _init_(model, seed)
    return model, clip


def _init_(model: LlavaMiniModel, seed: int) -> None:
    """Llama-style init: normal(0.02) for matrices and embeddings, ones for norms (nn defaults elsewhere)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.vision_tower.") or name.endswith("pos_embed") or "compressor" in name:
                continue
            if "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 2:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))


STORED_DTYPE = torch.float16  # the LLaVA-Mini weights on disk (the engine loads them into its own dtype)


@torch.no_grad()
def round_to_stored(model: LlavaMiniModel) -> None:
    """Round the weights `save_demo` writes to what the file holds, so a stage that continues from them in
    memory computes what it computes after a save and a load (`--retrieval-only`, `--binding-only`)."""
    for name, p in model.named_parameters():
        if not name.startswith("model.vision_tower.") and p.is_floating_point():
            p.copy_(p.to(STORED_DTYPE).to(p.dtype))


def save_demo(model: LlavaMiniModel, clip: CLIPModel, tok: PreTrainedTokenizerFast, directory: str | Path
              ) -> Path:
    """The reference layout: LLaVA-Mini weights at the root, the CLIP pair (+ processor, tokenizer for the
    text half) in `vision_tower/`."""
    directory = Path(directory)
    vision_dir = directory / "vision_tower"
    vision_dir.mkdir(parents=True, exist_ok=True)
    clip.save_pretrained(str(vision_dir))
    make_image_processor(clip.config.vision_config.image_size).save_pretrained(str(vision_dir))
    tok.save_pretrained(str(vision_dir))
    save_checkpoint(model, tok, directory, eos_ids=tuple(generation_eos_ids(tok)), dtype=STORED_DTYPE)
    return directory
