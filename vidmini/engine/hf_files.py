"""A checkpoint's own Hugging Face files, read without transformers' Auto* registry.

The published LLaVA-Mini checkpoint says `model_type: llava_mini_llama`, which no transformers release knows, and it
was written by transformers 4.43; its CLIP tower by an even older one. `AutoTokenizer` and friends consult
config.json and break on both (transformers 5 fails on the 4.x rope keys). So each file is read here for what it
says, and the matching transformers class is built from that explicitly. Errors are `FileFormatError`s whose
message names the file and the key.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

# tokenizer_config.json classes whose tokenizer is fully described by tokenizer.json (a `tokenizers` pipeline).
FAST_TOKENIZER_CLASSES = ("PreTrainedTokenizerFast", "LlamaTokenizerFast", "TokenizersBackend")
# Files a fast tokenizer reads besides tokenizer.json; anything else in the directory (config.json) is not shown.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                        "chat_template.jinja", "chat_template.json")
CLIP_TYPES = ("clip", "clip_vision_model")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_DEFAULT_IMAGE_SIZE = 224  # CLIPVisionConfig's image_size when a config omits it


class FileFormatError(ValueError):
    """A file that is missing or does not say what it must; the message starts with the file's path."""


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileFormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------ tokenizer


def load_tokenizer(directory: Path, classes: tuple[str, ...] | None = FAST_TOKENIZER_CLASSES):
    """A tokenizer from tokenizer.json + tokenizer_config.json, whichever transformers saved them.

    The accepted `classes` (None: any) are the same thing on disk (a `tokenizers` pipeline in tokenizer.json), so
    the generic fast class loads each; it is given only the tokenizer's files, in a private folder of links, so
    that nothing transformers does with config.json (a model type it does not know, 4.x rope keys) can
    interfere."""
    from transformers import PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    config_path = directory / "tokenizer_config.json"
    settings = read_json(config_path)
    cls = settings.get("tokenizer_class")
    if classes is not None and cls not in classes:
        raise FileFormatError(f"{config_path}: tokenizer_class {cls!r} is not supported "
                              f"(one of {', '.join(classes)}, which read tokenizer.json)")
    if not (directory / "tokenizer.json").is_file():
        raise FileFormatError(f"{directory / 'tokenizer.json'}: missing (tokenizer_config.json's tokenizer_class "
                              f"{cls} is read from it)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with tempfile.TemporaryDirectory(prefix="vidmini-tok-") as tmp:
            for name in ("tokenizer.json", *TOKENIZER_SIDE_FILES):
                if (directory / name).is_file():
                    os.symlink((directory / name).resolve(), Path(tmp, name))
            return PreTrainedTokenizerFast.from_pretrained(tmp, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - tokenizers fail with many error types
        raise FileFormatError(f"{directory / 'tokenizer.json'}: does not load: {' '.join(str(e).split())[:300]}"
                              ) from None
    finally:
        hf_logging.set_verbosity(verbosity)


# ------------------------------------------------------------------------------------------------ CLIP tower


def clip_configs(directory: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(vision settings, text settings or None) of a CLIP directory: a full CLIP (`clip`, text tower beside the
    vision one) or a vision-only one (`clip_vision_model`). Old files (transformers ≤ 4.2x, as openai's) keep
    the non-default values in `vision_config_dict` / `text_config_dict`; those win, as they did there."""
    path = directory / "config.json"
    raw = read_json(path)
    kind = raw.get("model_type")
    if kind not in CLIP_TYPES:
        raise FileFormatError(f"{path}: model_type {kind!r} is not a CLIP vision tower ({', '.join(CLIP_TYPES)})")
    if kind == "clip_vision_model":
        return raw, None
    sections = []
    for name in ("vision", "text"):
        merged = {}
        for key in (f"{name}_config", f"{name}_config_dict"):
            part = raw.get(key)
            if part is not None and not isinstance(part, dict):
                raise FileFormatError(f"{path}: {key} must be an object")
            merged.update(part or {})
        sections.append(merged)
    if not sections[0]:
        raise FileFormatError(f"{path}: vision_config is missing")
    return sections[0], sections[1] or None


def _known(cls, values: dict[str, Any]) -> dict[str, Any]:
    """The keys a transformers config class takes (file bookkeeping such as transformers_version dropped)."""
    allowed = set(cls().to_dict()) - {"model_type", "transformers_version", "architectures", "_name_or_path"}
    return {k: v for k, v in values.items() if k in allowed}


def clip_vision_config(directory: Path):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**_known(CLIPVisionConfig, clip_configs(directory)[0]))


def clip_text_config(directory: Path):
    """The text tower's config, or None for a vision-only directory."""
    from transformers import CLIPTextConfig

    text = clip_configs(directory)[1]
    return None if text is None else CLIPTextConfig(**_known(CLIPTextConfig, text))


def _square(value: Any, path: Path, key: str) -> int:
    """An int, or a {shortest_edge} / {height, width} dict with height == width, as the side in pixels."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and value.get("height") == value.get("width"):
            return int(value["height"])
    raise FileFormatError(f"{path}: {key} {value!r} is not a square size vidmini can use")


def _processor_sizes(raw: dict[str, Any], image_size: int | None, path: Path) -> tuple[int, int]:
    """(resize side, crop side) of a preprocessor_config.json, defaulting to the tower's input size."""
    size = _square(raw.get("size", image_size), path, "size")
    return size, _square(raw.get("crop_size", size), path, "crop_size")


def processor_side(directory: Path) -> int:
    """The square side `load_image_processor(directory, <the tower's image_size>)` crops to, from the JSON files
    alone (no transformers): a decoding process can shrink frames to it before the model is loaded."""
    image_size = int(clip_configs(directory)[0].get("image_size", CLIP_DEFAULT_IMAGE_SIZE))
    path = directory / "preprocessor_config.json"
    if not path.exists():
        return image_size
    return _processor_sizes(read_json(path), image_size, path)[1]


def load_image_processor(directory: Path, image_size: int | None = None):
    """CLIP's PIL processor from preprocessor_config.json in any of its historical forms (openai's has ints for
    `size`/`crop_size` and a `CLIPFeatureExtractor` type); without the file, CLIP's defaults at the tower's
    input size `image_size`."""
    from vidmini.engine.vision import ClipProcessor

    path = directory / "preprocessor_config.json"
    if not path.exists():
        if image_size is None:
            raise FileFormatError(f"{path}: missing")
        return ClipProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                             "width": image_size})
    raw = read_json(path)
    size, crop = _processor_sizes(raw, image_size, path)
    options = {k: raw[k] for k in ("do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize",
                                   "do_convert_rgb", "resample") if k in raw}
    return ClipProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop},
                         image_mean=list(raw.get("image_mean", CLIP_MEAN)),
                         image_std=list(raw.get("image_std", CLIP_STD)), **options)
