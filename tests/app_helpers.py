"""Shared set-up for the app's tests: short synthetic-world videos and questions the demo model answers reliably
(the scene and text families), with their exact answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

RELIABLE = ("scene", "text")  # ~100% on the shipped demo model; the other families are weak


def world_video(folder: Path, seed: int, seconds: int = 30):
    """(path, timeline) of a synthetic-world mp4 (its truth JSON beside it)."""
    from vidmini.synth.render import write_video
    from vidmini.synth.world import generate_timeline

    timeline = generate_timeline(seed, seconds)
    return write_video(timeline, Path(folder) / f"world-seed{seed}-{seconds}s.mp4"), timeline


def reliable_questions(timeline, seed: int = 0, per_family: int = 3) -> list:
    from vidmini.synth.questions import make_questions

    qs = make_questions(timeline, np.random.default_rng(seed), per_family=per_family)
    return [q for q in qs if q.family in RELIABLE]


def corrupt_file(path: Path) -> Path:
    """An .mp4 name over bytes that are not a video (an mp4 signature, then noise)."""
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42" + np.random.default_rng(0).bytes(40_000))
    return path
