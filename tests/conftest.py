"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures.hf_cache import offline_hub  # noqa: F401 - a fixture for every test module


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test` runs two workers on the two cores), each worker and the processes its tests
    start use one thread for torch: two workers with two threads each would fight over the cores, while one each
    keeps both busy, and the tests that wait on real time (live cameras, servers, browsers) overlap the others."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A complete tiny random LLaVA-Mini checkpoint (reference layout), built once per session.

    Treat it as read-only: tests that change files copy it first (shutil.copytree).
    """
    from vidmini.demo.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), seed=7)
