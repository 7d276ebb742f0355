"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.hf_cache import offline_hub  # noqa: F401 - a fixture for every test module


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A complete tiny random LLaVA-Mini checkpoint (reference layout), built once per session.

    Treat it as read-only: tests that change files copy it first (shutil.copytree).
    """
    from vidmini.demo.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), seed=7)
