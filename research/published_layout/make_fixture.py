"""Write a tiny LLaVA-Mini checkpoint in the layout of the published ``ICTNLP/llava-mini-llama-3.1-8b``.

Run ONLY under transformers 4.43.1 (the version the reference code pins and trained with), e.g.::

    /tmp/tf443/bin/python research/published_layout/make_fixture.py [--out tests/fixtures/published]

Every file that transformers writes in the real checkpoint is written here by transformers 4.43.1's own
``save_pretrained`` (config.json, generation_config.json, the safetensors shards + index, tokenizer files;
CLIP's config.json, pytorch_model.bin, tokenizer files). The few edits made by hand afterwards are listed in
README.md next to this script. This script must not import the project's ``engine`` package (transformers 5).

Output (under ``--out``):

* ``llava-mini-llama-3.1-8b/``      the LLaVA-Mini checkpoint (Llama-3.1 LLM + pre-fusion layers + compressor +
                                     projector, plus the frozen CLIP vision tower's weights as DeepSpeed saves them)
* ``clip-vit-large-patch14-336/``   the vision tower, laid out like ``openai/clip-vit-large-patch14-336``
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizerFast,
    CLIPVisionModel,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    PreTrainedTokenizerFast,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

if transformers.__version__ != "4.43.1":
    raise SystemExit(f"run this under transformers 4.43.1 (found {transformers.__version__}); see README.md")

SEED = 0
MAIN_NAME = "llava-mini-llama-3.1-8b"
TOWER_NAME = "clip-vit-large-patch14-336"

# --- sizes ---------------------------------------------------------------------------------------------------
REGULAR_VOCAB = 512  # + 11 special tokens = 523 = vocab_size
HIDDEN = 64
INTERMEDIATE = 128
LAYERS = 2
HEADS = 4
KV_HEADS = 2
PREFUSION_LAYERS = 2  # the reference's default (and the published value) is 4
COMPRESSOR_SIZE = 1
COMPRESSOR_HEADS = 8  # hard-coded in the reference's build_compressor
MM_HIDDEN = 32  # = CLIP vision hidden size (1024 in the real tower)
MAX_SHARD = "200KB"

# CLIP tower (ViT-L/14-336 in reality)
CLIP_IMAGE, CLIP_PATCH = 28, 7
CLIP_HIDDEN, CLIP_INTER, CLIP_LAYERS, CLIP_HEADS, CLIP_PROJ = 32, 64, 3, 4, 32
CLIP_TEXT_HIDDEN, CLIP_TEXT_INTER, CLIP_TEXT_LAYERS, CLIP_TEXT_HEADS, CLIP_TEXT_POS = 32, 64, 2, 4, 77

# --- values the reference training leaves in config.json (llavamini/train/train.py, scripts/llavamini/train.sh) -
BASE_MODEL = "ICTNLP/llava-mini-llama-3-8b"  # --model_name_or_path in scripts/llavamini/train.sh
VISION_TOWER = "openai/clip-vit-large-patch14-336"
MODEL_MAX_LENGTH = 4096  # --model_max_length in train.sh
PAD_OFFSET = 4  # train.py: tokenizer.pad_token_id = 128004 (<|finetune_right_pad_id|>) for llava_llama_3_1

# --- Llama-3.1-Instruct-style tokenizer: the project's own recipe (vidmini/demo/tokenizer.py), loaded by path so that
# the project's engine package (transformers 5) is not imported; that module needs only tokenizers + transformers.
_spec = importlib.util.spec_from_file_location(
    "tokenizer_tiny", Path(__file__).resolve().parents[2] / "vidmini" / "demo" / "tokenizer.py")
tokenizer_tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tokenizer_tiny)
BOS_TOKEN, EOS_TOKEN = tokenizer_tiny.BOS_TOKEN, tokenizer_tiny.EOS_TOKEN

# --- CLIP text tokenizer corpus (a tiny BPE over CLIP's byte alphabet) -----------------------------------------
CLIP_CORPUS = "a photo of a red circle . a blue square and a green triangle . a red square on a black background"
CLIP_MERGES = 40


# ==================================================================================================================
# Model classes (the parameter layout of llavamini/model/llavamini_arch.py + language_model/llavamini_llama.py)
# ==================================================================================================================
class LlavaMiniConfig(LlamaConfig):
    model_type = "llava_mini_llama"


class Compressor(nn.Module):
    """Parameter layout of the reference's ``Resampler`` (grid_size**2 queries, no kv_proj)."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int):
        super().__init__()
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid_size), requires_grad=False)
        self.query = nn.Parameter(torch.zeros(grid_size**2, embed_dim))
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(embed_dim)
        self.ln_kv = nn.LayerNorm(embed_dim)


class VisionTowerHolder(nn.Module):
    """``model.vision_tower`` in the reference is a CLIPVisionTower whose ``.vision_tower`` is a CLIPVisionModel."""

    def __init__(self, vision_model: CLIPVisionModel):
        super().__init__()
        self.vision_tower = vision_model


class LlavaMiniLlamaModel(LlamaModel):
    config_class = LlavaMiniConfig

    def __init__(self, config: LlavaMiniConfig):
        super().__init__(config)
        self.prefusion_layers = nn.ModuleList(
            [LlamaDecoderLayer(config, layer_idx=i) for i in range(config.prefusion_layer_num)]
        )
        self.compressor = Compressor(config.compressor_size, config.mm_hidden_size, COMPRESSOR_HEADS)
        self.mm_projector = nn.Sequential(
            nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size,
                                                                                      config.hidden_size)
        )


class LlavaMiniLlamaForCausalLM(LlamaForCausalLM):
    config_class = LlavaMiniConfig

    def __init__(self, config: LlavaMiniConfig):
        super(LlamaForCausalLM, self).__init__(config)
        self.model = LlavaMiniLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table, (grid_size**2, embed_dim): [sin(h), cos(h), sin(w), cos(w)] per position."""

    def one_d(dim: int, pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1, 1).double() * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # MAE: meshgrid(grid_w, grid_h), w first
    return torch.cat([one_d(embed_dim // 2, grid_w), one_d(embed_dim // 2, grid_h)], dim=1).float()


def randomize(module: nn.Module, gen: torch.Generator, skip: tuple[str, ...] = ()) -> None:
    """std 0.2 normal for matrices/embeddings, 1 + 0.1 N(0,1) for norm weights, 0.1 N(0,1) for biases."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(skip):
                continue
            leaf = name.rsplit(".", 1)[-1]
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif leaf == "bias" or leaf.endswith("_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif "norm" in name or "ln_" in name or "layrnorm" in name:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
            else:  # e.g. CLIP's class_embedding
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


# ==================================================================================================================
# Tokenizers
# ==================================================================================================================
def build_base_llama_tokenizer(out_dir: Path) -> None:
    """A Llama-3.1-Instruct-style tokenizer directory, as Meta's repo would hold it (the training's input)."""
    tok = tokenizer_tiny.llama3_style_pipeline(REGULAR_VOCAB)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   clean_up_tokenization_spaces=True, model_max_length=131072,
                                   model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = tokenizer_tiny.LLAMA3_CHAT_TEMPLATE
    fast.save_pretrained(out_dir)


def training_tokenizer(base_dir: Path) -> PreTrainedTokenizerFast:
    """The tokenizer exactly as llavamini/train/train.py prepares it for --version llava_llama_3_1."""
    tok = AutoTokenizer.from_pretrained(base_dir, model_max_length=MODEL_MAX_LENGTH, padding_side="right",
                                        use_fast=False)
    tok.pad_token_id = REGULAR_VOCAB + PAD_OFFSET
    tok.unk_token = tok.pad_token
    tok.pad_token = tok.unk_token
    return tok


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary order: 256 byte symbols, the same with </w>, the merges, then the two specials."""
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    words: dict[tuple[str, ...], int] = {}
    for w in CLIP_CORPUS.lower().split():
        key = tuple(w[:-1]) + (w[-1] + "</w>",)
        words[key] = words.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(CLIP_MERGES):
        pairs: dict[tuple[str, str], int] = {}
        for word, freq in words.items():
            for a, b in zip(word, word[1:], strict=False):
                pairs[(a, b)] = pairs.get((a, b), 0) + freq
        if not pairs:
            break
        best = max(sorted(pairs), key=lambda p: pairs[p])
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = freq
        words = merged
        vocab_list.append(best[0] + best[1])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(vocab_list)}, merges


def build_clip_tokenizer(work: Path) -> CLIPTokenizerFast:
    vocab, merges = clip_vocab_and_merges()
    (work / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (work / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return CLIPTokenizerFast(vocab_file=str(work / "vocab.json"), merges_file=str(work / "merges.txt"),
                             pad_token="<|endoftext|>", model_max_length=CLIP_TEXT_POS)


# ==================================================================================================================
# Writers
# ==================================================================================================================
def write_tower(out: Path, work: Path, gen: torch.Generator) -> CLIPModel:
    clip_tok = build_clip_tokenizer(work)
    text_config = dict(hidden_size=CLIP_TEXT_HIDDEN, intermediate_size=CLIP_TEXT_INTER,
                       num_hidden_layers=CLIP_TEXT_LAYERS, num_attention_heads=CLIP_TEXT_HEADS,
                       max_position_embeddings=CLIP_TEXT_POS, vocab_size=len(clip_tok), projection_dim=CLIP_PROJ,
                       # the openai config's (pre-4.26 default) ids: eos 2 selects CLIP's legacy argmax pooling
                       bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision_config = dict(hidden_size=CLIP_HIDDEN, intermediate_size=CLIP_INTER, num_hidden_layers=CLIP_LAYERS,
                         num_attention_heads=CLIP_HEADS, image_size=CLIP_IMAGE, patch_size=CLIP_PATCH,
                         projection_dim=CLIP_PROJ)
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=CLIP_PROJ)
    config._name_or_path = VISION_TOWER
    model = CLIPModel(config).eval()
    randomize(model, gen, skip=("logit_scale",))
    model.save_pretrained(out, safe_serialization=False)

    # The openai file predates non-persistent position_ids buffers: add them (int64, shape (1, n)).
    bin_path = out / "pytorch_model.bin"
    state = torch.load(bin_path, map_location="cpu", weights_only=True)
    extra = {
        "text_model.embeddings.position_ids": torch.arange(CLIP_TEXT_POS, dtype=torch.int64)[None],
        "vision_model.embeddings.position_ids":
            torch.arange((CLIP_IMAGE // CLIP_PATCH) ** 2 + 1, dtype=torch.int64)[None],
    }
    new_state = {}
    for k, v in state.items():
        new_state[k] = v
        for ek, ev in extra.items():
            if k == ek.replace("position_ids", "position_embedding.weight"):
                new_state[ek] = ev
    assert all(k in new_state for k in extra)
    torch.save(new_state, bin_path)

    # Mimic the old (transformers 4.21) config: *_config_dict with the non-default values beside *_config.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["text_config_dict"] = {k: text_config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                           "num_hidden_layers", "projection_dim", "vocab_size",
                                                           "bos_token_id", "eos_token_id")}
    cfg["vision_config_dict"] = {k: vision_config[k] for k in ("hidden_size", "image_size", "intermediate_size",
                                                               "num_attention_heads", "num_hidden_layers",
                                                               "patch_size", "projection_dim")}
    cfg_path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2, sort_keys=True) + "\n")

    # The openai repo's preprocessor_config.json is the old CLIPFeatureExtractor format.
    (out / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": CLIP_IMAGE, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": CLIP_IMAGE,
    }, indent=2) + "\n")

    clip_tok.save_pretrained(out)
    return model


def write_main(out: Path, work: Path, gen: torch.Generator, tower: CLIPModel | None) -> None:
    base_dir = work / "base-tokenizer"
    build_base_llama_tokenizer(base_dir)
    tok = training_tokenizer(base_dir)
    vocab_size = len(tok)
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]

    # Llama-3.1-8B-Instruct's config.json fields (tiny sizes), then what train.py adds.
    config = LlavaMiniConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, hidden_act="silu", max_position_embeddings=131072,
        initializer_range=0.02, rms_norm_eps=1e-5, use_cache=True, bos_token_id=bos, eos_token_id=eos,
        pretraining_tp=1, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        attention_bias=False, attention_dropout=0.0, mlp_bias=False,
    )
    config._name_or_path = BASE_MODEL
    # initialize_vision_modules (llavamini_arch.py) and train() (train.py), in their order:
    config.mm_vision_tower = VISION_TOWER
    config.use_mm_proj = True
    config.mm_projector_type = "mlp2x_gelu"
    config.mm_hidden_size = MM_HIDDEN
    config.mm_vision_select_layer = -2
    config.mm_vision_select_feature = "patch"
    config.mm_patch_merge_type = "flat"
    config.image_aspect_ratio = "pad"
    config.tokenizer_padding_side = tok.padding_side
    config.tokenizer_model_max_length = tok.model_max_length
    config.tune_mm_mlp_adapter = False
    config.freeze_mm_mlp_adapter = False
    config.mm_use_im_start_end = False
    config.mm_projector_lr = None
    config.mm_use_im_patch_token = False
    config.compressor_size = COMPRESSOR_SIZE
    config.prefusion_layer_num = PREFUSION_LAYERS
    config.resolution_ratio = 1

    model = LlavaMiniLlamaForCausalLM(config).eval()
    randomize(model, gen, skip=("model.compressor.pos_embed",))
    if tower is not None:
        # DeepSpeed saves the frozen CLIP vision tower too: model.vision_tower.vision_tower.vision_model.*
        vision = CLIPVisionModel(tower.config.vision_config)
        vision.vision_model.load_state_dict(tower.vision_model.state_dict())
        model.model.vision_tower = VisionTowerHolder(vision)
    model = model.to(torch.float16)
    model.generation_config = GenerationConfig(bos_token_id=bos, eos_token_id=eos, do_sample=True, temperature=0.6,
                                               top_p=0.9)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD)
    tok.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/fixtures/published"))
    parser.add_argument("--no-tower-in-main", action="store_true",
                        help="leave model.vision_tower.vision_tower.* out of the main checkpoint (the published one "
                             "has them)")
    args = parser.parse_args()
    out = Path(args.out)
    main_dir, tower_dir = out / MAIN_NAME, out / TOWER_NAME
    for d in (main_dir, tower_dir):
        if d.exists():
            shutil.rmtree(d)
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    with tempfile.TemporaryDirectory() as tmp:
        tower = write_tower(tower_dir, Path(tmp), gen)
        write_main(main_dir, Path(tmp), gen, None if args.no_tower_in_main else tower)
    for d in (main_dir, tower_dir):
        for f in sorted(d.iterdir()):
            print(f"{f.stat().st_size:>9}  {f.relative_to(out)}")


if __name__ == "__main__":
    main()
