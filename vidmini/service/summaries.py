"""Summaries through the service's door: the batch over files and folders (local or on Ray) with this
service's Library, and the names a face needs to ask for one (modes, formats, options)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from vidmini.service.library import Library
from vidmini.summaries import batch
from vidmini.summaries.batch import BatchReport
from vidmini.summaries.formats import FORMATS, SUBTITLES
from vidmini.summaries.summarize import MODES, SummarizeOptions
from vidmini.summaries.work import BatchOptions

__all__ = ["FORMATS", "MODES", "SUBTITLES", "BatchOptions", "BatchReport", "SummarizeOptions", "batch_library",
           "run_batch"]


def batch_library(options: BatchOptions, home: str | None = None, device: str | None = None) -> Library:
    """The Library a batch (or one Ray worker of it) summarizes with: the options' model, dtype and device."""
    return Library(home, model=options.model, device=device or options.device, dtype=options.dtype)


def run_batch(paths: Iterable[str], out: str | Path, options: BatchOptions, *, library: Library | None = None,
              ray: bool = False, ray_address: str | None = None, workers: int | None = None, progress: bool = True,
              log: Callable[[str], None] | None = None,
              on_dispatch: Callable[[str, int], None] | None = None) -> BatchReport:
    """Summarize every input not already done into `out` (see `vidmini.summaries.batch.run_batch`), with
    `library` or one made for the options."""
    return batch.run_batch(paths, out, options, make_library=batch_library, library=library, ray=ray,
                           ray_address=ray_address, workers=workers, progress=progress, log=log,
                           on_dispatch=on_dispatch)
