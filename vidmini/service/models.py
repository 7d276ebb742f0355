"""Opening the model a face asked for. On a trimmed install without the shipped demo model the choice is a tiny
random-weight model, built here on first use (its builder belongs to the demo, not to the engine)."""

from __future__ import annotations

from pathlib import Path

from vidmini.engine.inference import Engine
from vidmini.engine.load import ModelChoice, open_engine


def open_model(choice: ModelChoice, **options) -> Engine:
    """`open_engine(choice, **options)`, building the random fallback first when it is the choice."""
    if choice.is_random and not (Path(choice.location) / "config.json").exists():
        from vidmini.demo.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(Path(choice.location), seed=0)
    return open_engine(choice, **options)
