"""LLaVA-Mini engine: model pieces, checkpoint loading, the ingest/question cache split, generation.

Knows nothing of files beyond checkpoints, nor of videos or UI.
"""

from vidmini.engine.config import LlavaMiniConfig

__all__ = ["LlavaMiniConfig"]
