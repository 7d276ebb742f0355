"""The engine's option names, importable without torch or transformers (command lines build their parsers
from them before any model is needed)."""

from __future__ import annotations

DTYPE_NAMES = ("fp32", "bf16", "fp16")
PROMPT_STYLES = ("reference", "corrected")
DEFAULT_REPO = "ICTNLP/llava-mini-llama-3.1-8b"
CLIP_REPO = "openai/clip-vit-large-patch14-336"
RANDOM_BANNER = (
    "NOTE: running a tiny RANDOM-WEIGHT model (the shipped demo model is missing from this install): "
    "its answers are meaningless. Use --model or VIDMINI_MODEL for a real checkpoint."
)
