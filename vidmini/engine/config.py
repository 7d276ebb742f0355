"""One config object for a LLaVA-Mini checkpoint: the Llama keys plus the LLaVA-Mini ones."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from vidmini.engine.rope import RopeSpec

MODEL_TYPE = "llava_mini_llama"
ROPE_KEYS = ("rope_parameters", "rope_scaling", "rope_theta")

# Keys that belong to LLaVA-Mini (everything else in config.json is the Llama text model's).
_MINI_KEYS = (
    "compressor_size",
    "prefusion_layer_num",
    "resolution_ratio",
    "mm_vision_tower",
    "mm_projector_type",
    "mm_hidden_size",
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "image_aspect_ratio",
    "mm_use_im_start_end",
    "tokenizer_model_max_length",
)


@dataclass
class LlavaMiniConfig:
    """Everything needed to build the model; `llama` configures both the LLM and the pre-fusion layers."""

    llama: LlamaConfig
    compressor_size: int = 1
    prefusion_layer_num: int = 4
    resolution_ratio: int = 1
    mm_vision_tower: str = "openai/clip-vit-large-patch14-336"
    mm_projector_type: str = "mlp2x_gelu"
    mm_hidden_size: int = 1024
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_aspect_ratio: str = "pad"
    mm_use_im_start_end: bool = False
    tokenizer_model_max_length: int | None = None
    # Not a reference key: the reference hard-codes 8 heads for the compressor's cross-attention.
    compressor_num_heads: int = 8
    extra: dict[str, Any] = field(default_factory=dict)
    # The rope recipe; None = read from `llama` (a config built in code), from_dict passes the file's.
    rope: RopeSpec | None = None

    def __post_init__(self) -> None:
        if self.rope is None:
            self.rope = RopeSpec.from_config(self.llama.to_dict())

    @property
    def hidden_size(self) -> int:
        return self.llama.hidden_size

    @property
    def num_queries(self) -> int:
        return self.compressor_size**2

    @property
    def head_dim(self) -> int:
        return getattr(self.llama, "head_dim", None) or self.llama.hidden_size // self.llama.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> LlavaMiniConfig:
        """Read config.json's keys, whichever transformers wrote them (4.x `rope_scaling` or 5.x
        `rope_parameters`); never through transformers' registry, which does not know `llava_mini_llama`."""
        raw = dict(raw)
        model_type = raw.pop("model_type", None)
        if model_type != MODEL_TYPE:
            raise ValueError(f"model_type {model_type!r} is not a LLaVA-Mini checkpoint (expected {MODEL_TYPE!r})")
        rope = RopeSpec.from_config(raw)
        for key in ROPE_KEYS:
            raw.pop(key, None)
        mini = {k: raw.pop(k) for k in _MINI_KEYS if k in raw}
        heads = raw.pop("compressor_num_heads", 8)
        llama_keys = set(LlamaConfig().to_dict()) - set(ROPE_KEYS)
        llama_kwargs = {k: v for k, v in raw.items() if k in llama_keys}
        extra = {k: v for k, v in raw.items() if k not in llama_keys}
        cfg = cls(llama=llama_config(rope, **llama_kwargs), compressor_num_heads=heads, extra=extra, rope=rope,
                  **mini)
        cfg.validate()
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> LlavaMiniConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        out = self.llama.to_dict()
        for k in ROPE_KEYS:
            out.pop(k, None)
        out.update(self.rope.legacy_keys())  # the published checkpoint's (4.x) form, which both 4.x and 5.x read
        for k in ("id2label", "label2id", "problem_type", "return_dict", "output_attentions",
                  "output_hidden_states", "chunk_size_feed_forward", "is_encoder_decoder"):
            out.pop(k, None)
        out.update(self.extra)
        out["model_type"] = MODEL_TYPE
        out["architectures"] = ["LlavaMiniLlamaForCausalLM"]
        for f in fields(self):
            if f.name in _MINI_KEYS:
                out[f.name] = getattr(self, f.name)
        if self.compressor_num_heads != 8:
            out["compressor_num_heads"] = self.compressor_num_heads
        return out

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    def validate(self) -> None:
        if self.mm_projector_type not in ("linear", "identity") and not (
            self.mm_projector_type.startswith("mlp") and self.mm_projector_type.endswith("x_gelu")
        ):
            raise ValueError(f"unsupported mm_projector_type {self.mm_projector_type!r}")
        if self.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise ValueError(f"unsupported mm_vision_select_feature {self.mm_vision_select_feature!r}")
        if self.compressor_size < 1 or self.resolution_ratio < 1 or self.prefusion_layer_num < 0:
            raise ValueError("compressor_size and resolution_ratio must be >= 1, prefusion_layer_num >= 0")
        if self.mm_hidden_size % self.compressor_num_heads:
            raise ValueError("mm_hidden_size must be divisible by compressor_num_heads")


def llama_config(rope: RopeSpec, **kwargs: Any) -> LlamaConfig:
    """A LlamaConfig carrying `rope` in the form the installed transformers takes (so its own modules, used in
    tests as references, agree with `engine.rope`)."""
    if "rope_parameters" in LlamaConfig().to_dict():
        return LlamaConfig(rope_parameters=rope.rope_parameters(), **kwargs)
    return LlamaConfig(**rope.legacy_keys(), **kwargs)  # pragma: no cover - transformers 4.x
