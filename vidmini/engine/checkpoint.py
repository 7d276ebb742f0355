"""Loading and saving checkpoints in the reference LLaVA-Mini format.

A checkpoint is a directory: config.json (Llama keys + LLaVA-Mini keys), safetensors weights (one file or
shards with `model.safetensors.index.json`), tokenizer files, optionally generation_config.json. The vision
tower comes from `mm_vision_tower` (a path, a path relative to the checkpoint, or a Hugging Face id found in
the local cache); weights under `model.vision_tower.vision_tower.*` in the checkpoint override it.
Safetensors are preferred; `.bin` files are read only with `weights_only=True`; no remote code ever runs.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel

from vidmini.engine.config import LlavaMiniConfig
from vidmini.engine.hf_files import (
    FileFormatError,
    clip_vision_config,
    load_image_processor,
    load_tokenizer,
    read_json,
)
from vidmini.engine.model import LlavaMiniModel
from vidmini.engine.names import DTYPE_NAMES
from vidmini.engine.rope import RotaryEmbedding
from vidmini.engine.vision import VisionTower

DTYPES = dict(zip(DTYPE_NAMES, (torch.float32, torch.bfloat16, torch.float16), strict=True))
VISION_PREFIX = "model.vision_tower.vision_tower."


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names what is wrong."""


def _names(keys: list[str] | set[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory as is; otherwise a Hugging Face repo id looked up in the local cache only."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; a model is a directory with config.json")
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"model directory {name} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - the hub raises several kinds for "not cached"
        raise CheckpointError(
            f"{name} is neither a directory nor in the Hugging Face cache; run `vidmini download {name}` on a "
            "machine with network, or pass --model with a local path"
        ) from None


def _read_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"{path.name} needs full unpickling (arbitrary code) and is refused; only "
                                  f"tensors are accepted: {' '.join(str(e).split())[:200]}") from None
        raise CheckpointError(f"{path.name} is not a readable .bin file: {' '.join(str(e).split())[:200]}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not a readable .bin file: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path.name} holds a {type(state).__name__}, not a dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path.name}: entries that are not tensors: {_names([str(k) for k in bad])}")
    return state


def weight_files(directory: Path) -> list[Path]:
    """Weight files in load order: safetensors (single or sharded) first, then .bin."""
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.exists():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({type(e).__name__}: {e})") from None
            missing = [s for s in shards if not (directory / s).exists()]
            if missing:
                raise CheckpointError(f"{directory}: shard files missing: {_names(missing)}")
            return [directory / s for s in shards]
        if (directory / single).exists():
            return [directory / single]
    raise CheckpointError(f"{directory} holds no model weights (model.safetensors or pytorch_model.bin)")


def read_state_dict(directory: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        try:
            part = load_file(f, device=str(device)) if f.suffix == ".safetensors" else _read_bin(f)
        except SafetensorError as e:
            raise CheckpointError(f"{f.name} is not a readable safetensors file: {e}") from None
        state.update(part)
    # the reference's (transformers 4.x) CLIP nests everything under `vision_model.`
    return {k.replace(VISION_PREFIX + "vision_model.", VISION_PREFIX): v for k, v in state.items()}


def resolve_vision_tower(config: LlavaMiniConfig, model_dir: Path) -> Path:
    name = config.mm_vision_tower
    for candidate in (Path(name).expanduser(), model_dir / name):
        if candidate.is_dir():
            return candidate
    try:
        return resolve_model_dir(name)
    except CheckpointError:
        raise CheckpointError(
            f"vision tower {name!r} (mm_vision_tower) is not a directory and not in the Hugging Face cache; "
            f"run `vidmini download` or point mm_vision_tower at a local CLIP directory"
        ) from None


def load_clip_part(cls: type, config: object, directory: Path, prefix: str, dtype: torch.dtype, device: str,
                   what: str) -> torch.nn.Module:
    """One tower of a CLIP directory as the transformers class `cls`, weights assigned here, not by
    `from_pretrained` (which first spends ~0.3 s of a cold start building renaming tables for every model family).
    A full CLIP file holds both towers and projections: this takes the keys the tower has, under its own names
    or under `prefix` (`vision_model.` / `text_model.`: the names before transformers 5, as every published CLIP
    writes them), skips the rest (old files also carry buffers that are no longer weights), names any missing."""
    from transformers.initialization import no_init_weights

    with no_init_weights():  # the weights are assigned below; initializing them first is wasted work
        model = cls(config)
    wanted = model.state_dict()

    def own_name(key: str) -> str | None:
        if key in wanted:
            return key
        bare = key[len(prefix):] if key.startswith(prefix) else None
        return bare if bare in wanted else None

    state: dict[str, torch.Tensor] = {}
    for f in weight_files(directory):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as reader:
                    state.update({name: reader.get_tensor(k) for k in reader.keys() if (name := own_name(k))})
            except SafetensorError as e:
                raise CheckpointError(f"{what}: {f} is not a readable safetensors file: {e}") from None
        else:
            try:
                state.update({name: v for k, v in _read_bin(f).items() if (name := own_name(k))})
            except CheckpointError as e:
                raise CheckpointError(f"{what}: {e}") from None
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise CheckpointError(f"{what} at {directory} lacks weights: {_names(missing)}")
    try:
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                              assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{what} at {directory} does not load: {' '.join(str(e).split())[:300]}") from None
    return model.to(device).eval()


def load_vision_tower(path: Path, config: LlavaMiniConfig, dtype: torch.dtype, device: str) -> VisionTower:
    """The CLIP tower of a HF directory (full CLIP or vision-only, any transformers vintage); its config is read
    from the file here, its weights by `load_clip_part`."""
    try:
        clip_config = clip_vision_config(path)
    except (FileFormatError, TypeError, ValueError) as e:
        raise CheckpointError(f"vision tower: {e}") from None
    try:
        weight_files(path)
    except CheckpointError:
        raise CheckpointError(f"{path}: no vision tower weights (model.safetensors or pytorch_model.bin), named "
                              f"by mm_vision_tower") from None
    clip = load_clip_part(CLIPVisionModel, clip_config, path, "vision_model.", dtype, device, "vision tower")
    return VisionTower(clip, config.mm_vision_select_layer, config.mm_vision_select_feature)


def eos_ids_of(directory: Path, config: LlavaMiniConfig) -> tuple[int, ...]:
    """End-of-sequence ids from generation_config.json, else config.json."""
    value = None
    gen = directory / "generation_config.json"
    if gen.exists():
        try:
            value = json.loads(gen.read_text()).get("eos_token_id")
        except (json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{gen}: not valid JSON ({e})") from None
    if value is None:
        value = config.llama.eos_token_id
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> None:
    """Fail with one message naming missing keys, unexpected keys and wrong shapes."""
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    shapes = [
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"wrong shapes: {_names(shapes)}")
    if problems:
        raise CheckpointError("checkpoint does not match the model: " + "; ".join(problems))


def read_config(directory: Path) -> LlavaMiniConfig:
    """config.json as either transformers wrote it; errors name the file and the key."""
    path = directory / "config.json"
    try:
        return LlavaMiniConfig.from_dict(read_json(path))
    except FileFormatError as e:
        raise CheckpointError(str(e)) from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {' '.join(str(e).split())[:300]}") from None


@dataclass
class Loaded:
    model: LlavaMiniModel
    tokenizer: object
    processor: object
    eos_ids: tuple[int, ...]
    directory: Path
    vision_dir: Path | None = None


def load_checkpoint(
    name_or_path: str | os.PathLike, dtype: str = "fp32", device: str = "cpu", attn: str = "sdpa"
) -> Loaded:
    """Build the model without initializing weights, then assign the checkpoint's tensors (fast, exact)."""
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("device cuda requested but CUDA is not available")
    directory = resolve_model_dir(name_or_path)
    config = read_config(directory)
    torch_dtype = DTYPES[dtype]
    state = read_state_dict(directory)
    vision_state = {k[len(VISION_PREFIX) :]: v for k, v in state.items() if k.startswith(VISION_PREFIX)}
    state = {k: v for k, v in state.items() if not k.startswith(VISION_PREFIX)}
    if config.llama.tie_word_embeddings and "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]

    vision_dir = resolve_vision_tower(config, directory)
    tower = load_vision_tower(vision_dir, config, torch_dtype, device)
    if vision_state:
        check_state_dict(tower.vision_tower.state_dict(), vision_state)
        tower.vision_tower.load_state_dict(vision_state)

    with torch.device("meta"):
        model = LlavaMiniModel(config, vision=None, attn=attn)
    expected = {k: v for k, v in model.state_dict().items()}
    check_state_dict(expected, state)
    model.load_state_dict({k: v.to(device=device, dtype=torch_dtype) for k, v in state.items()}, assign=True)
    model.rotary = RotaryEmbedding(config.rope, config.head_dim).to(device)  # buffers computed, not stored
    model.model.vision_tower = tower
    model.eval()
    try:
        tokenizer = load_tokenizer(directory)
        processor = load_image_processor(vision_dir, tower.config.image_size)
    except FileFormatError as e:
        raise CheckpointError(str(e)) from None
    return Loaded(model, tokenizer, processor, eos_ids_of(directory, config), directory, vision_dir)


def save_checkpoint(
    model: LlavaMiniModel,
    tokenizer,
    directory: str | os.PathLike,
    max_shard_bytes: int = 2 * 1024**3,
    include_vision: bool = False,
    eos_ids: tuple[int, ...] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the reference layout: config.json, safetensors shards + index, tokenizer, generation config.
    `dtype`: store floating-point weights in it (the loader casts to the dtype it runs in)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous().cpu()
        for k, v in model.state_dict().items()
        if include_vision or not k.startswith("model.vision_tower.")
    }
    embed = state.get("model.embed_tokens.weight")
    if embed is not None and "lm_head.weight" in state and state["lm_head.weight"].data_ptr() == embed.data_ptr():
        del state["lm_head.weight"]  # tied: the reference layout stores the embedding once
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in state.values())
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    model.config.save(directory)
    if eos_ids:
        (directory / "generation_config.json").write_text(
            json.dumps({"eos_token_id": list(eos_ids), "bos_token_id": model.config.llama.bos_token_id}, indent=2)
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    return directory
