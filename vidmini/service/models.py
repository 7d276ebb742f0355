"""Opening the model a face asked for, and fetching the real one. On a trimmed install without the shipped
demo model the choice is a tiny random-weight model, built here on first use (its builder belongs to the demo,
not to the engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from vidmini.common.errors import UsageError
from vidmini.engine.names import CLIP_REPO

if TYPE_CHECKING:
    from vidmini.engine.inference import Engine
    from vidmini.engine.load import ModelChoice


def open_model(choice: ModelChoice, **options) -> Engine:
    """`open_engine(choice, **options)`, building the random fallback first when it is the choice."""
    from vidmini.engine.load import open_engine

    if choice.is_random and not (Path(choice.location) / "config.json").exists():
        from vidmini.demo.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(Path(choice.location), seed=0)
    return open_engine(choice, **options)


def download(model_id: str, vision_tower: str | None = None) -> Path:
    """A checkpoint and its vision tower (`vision_tower`, else the checkpoint's `mm_vision_tower`) into the
    Hugging Face cache; returns the checkpoint's folder. Needs the network: any failure is one UsageError."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(model_id))
        tower = vision_tower or json.loads((path / "config.json").read_text()).get("mm_vision_tower", CLIP_REPO)
        if not Path(tower).is_dir():
            snapshot_download(tower)
    except Exception as e:  # noqa: BLE001 - network, auth and not-found errors all end here
        raise UsageError(f"download of {model_id} failed (network needed): {type(e).__name__}: {e}") from None
    return path
