"""Check the fixture under transformers 4.43.1 (the reference's version): every file loads with 4.43's own readers.

    /tmp/tf443/bin/python research/published_layout/check_fixture_443.py [--out tests/fixtures/published]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
)
from transformers.utils import logging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixture import MAIN_NAME, TOWER_NAME, LlavaMiniConfig, LlavaMiniLlamaForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/published"))
    args = parser.parse_args()
    out = Path(args.out)
    main_dir, tower_dir = out / MAIN_NAME, out / TOWER_NAME
    print("transformers", transformers.__version__, "torch", torch.__version__)

    total = 0
    for d in (main_dir, tower_dir):
        for f in sorted(d.iterdir()):
            total += f.stat().st_size
            print(f"{f.stat().st_size:>9}  {f.relative_to(out)}")
    print(f"{total:>9}  total")

    # --- main checkpoint ---
    llama_cfg = LlamaConfig.from_pretrained(main_dir)
    assert llama_cfg.vocab_size == 523 and llama_cfg.rope_scaling["rope_type"] == "llama3"
    AutoConfig.register("llava_mini_llama", LlavaMiniConfig)
    cfg = AutoConfig.from_pretrained(main_dir)
    assert type(cfg) is LlavaMiniConfig and cfg.compressor_size == 1 and cfg.mm_hidden_size == 32
    gen = GenerationConfig.from_pretrained(main_dir)
    assert gen.eos_token_id == [513, 520, 521] and gen.do_sample and gen.temperature == 0.6

    tok = AutoTokenizer.from_pretrained(main_dir)
    tok_slow_request = AutoTokenizer.from_pretrained(main_dir, use_fast=False)  # what the reference's builder does
    assert type(tok_slow_request).__name__ == "PreTrainedTokenizerFast"
    assert len(tok) == 523, len(tok)
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|begin_of_text|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|finetune_right_pad_id|>")
    assert tok.pad_token_id == 516 and tok.model_max_length == 4096 and tok.padding_side == "right"
    text = "What colour is the circle? The circle is red."
    ids = tok(text).input_ids
    assert ids[0] == 512 and tok.decode(ids[1:]) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "<image>\nDescribe the video."}], tokenize=False,
                                   add_generation_prompt=True)
    print("chat:", repr(chat))

    with safe_open(str(next(main_dir.glob("model-00001-*.safetensors"))), "pt") as f:
        print("shard metadata:", f.metadata())
    index = json.loads((main_dir / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    vision_keys = {k for k in keys if k.startswith("model.vision_tower.vision_tower.")}
    print(f"{len(keys)} tensors, {len(vision_keys)} of them under model.vision_tower.vision_tower.")
    logging.set_verbosity_error()
    model, info = LlavaMiniLlamaForCausalLM.from_pretrained(main_dir, output_loading_info=True,
                                                               torch_dtype="auto")
    assert not info["missing_keys"], info["missing_keys"]
    assert set(info["unexpected_keys"]) == vision_keys, info["unexpected_keys"]
    assert model.dtype == torch.float16
    pe = model.model.compressor.pos_embed.detach().float()
    assert torch.equal(pe, torch.cat([torch.zeros(8), torch.ones(8), torch.zeros(8), torch.ones(8)])[None]), pe
    with torch.no_grad():
        logits = model.float()(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all() and logits[0, -1].std() > 0.1

    # --- vision tower ---
    vision = CLIPVisionModel.from_pretrained(tower_dir)
    clip, clip_info = CLIPModel.from_pretrained(tower_dir, output_loading_info=True)
    print("CLIPModel loading info:", clip_info)
    assert not clip_info["missing_keys"]
    proc = CLIPImageProcessor.from_pretrained(tower_dir)
    pixels = proc(images=np.zeros((40, 50, 3), dtype=np.uint8), return_tensors="pt").pixel_values
    assert pixels.shape == (1, 3, 28, 28), pixels.shape
    clip_tok = AutoTokenizer.from_pretrained(tower_dir)
    enc = clip_tok("a red circle")
    print("CLIP tokenizer:", type(clip_tok).__name__, enc.input_ids, clip_tok.convert_ids_to_tokens(enc.input_ids))
    assert enc.input_ids[0] == clip_tok.bos_token_id and enc.input_ids[-1] == clip_tok.eos_token_id
    with torch.no_grad():
        hs = vision(pixels, output_hidden_states=True).hidden_states
        out = clip(input_ids=torch.tensor([enc.input_ids]), pixel_values=pixels)
    assert hs[-2].shape == (1, 17, 32)
    assert torch.isfinite(out.logits_per_image).all()
    # the vision weights inside the main checkpoint are the tower's (cast to fp16)
    sd = torch.load(tower_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    assert sd["vision_model.embeddings.position_ids"].dtype == torch.int64
    assert sd["text_model.embeddings.position_ids"].shape == (1, 77)
    if vision_keys:
        shards = {}
        for k in vision_keys:
            shards.setdefault(index["weight_map"][k], []).append(k)
        for shard, ks in shards.items():
            with safe_open(str(main_dir / shard), "pt") as f:
                for k in ks:
                    ref = sd[k.removeprefix("model.vision_tower.vision_tower.")].half()
                    assert torch.equal(f.get_tensor(k), ref), k
    print("OK")


if __name__ == "__main__":
    main()
