"""`vidmini summarize --ray / --ray-address`: the same per-file work (`vidmini.summaries.work.process_file`) on Ray actors.

One model per actor (loaded once, reused for every file it is given; one GPU each when the cluster has GPUs).
Ray does the scheduling and the fault tolerance: an actor whose process dies is restarted (`max_restarts`) and
the file it was working on is retried on it (`max_task_retries`); the retry resumes the ingest from the store's
last committed chunk. Workers read and write the stores under the driver's `$VIDMINI_HOME` (on several machines:
a shared file system, see the README); outputs come back to the driver, which alone writes the output folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from vidmini.summaries.work import BatchOptions, FileResult, LibraryMaker

MAX_RESTARTS = 3
MAX_TASK_RETRIES = 2


class SummarizerWorker:
    """Runs inside a Ray actor process: one library (one model) for all the files it is handed."""

    def __init__(self, home: str, options: BatchOptions, threads: int, make_library: LibraryMaker) -> None:
        import torch

        os.environ["VIDMINI_HOME"] = home
        torch.set_num_threads(max(1, threads))
        device = options.device
        if device == "cpu" and torch.cuda.is_available():
            device = "cuda"  # a GPU actor uses its GPU
        self.library = make_library(options, home, device)
        self.library.engine  # noqa: B018 - load the model now, not inside the first file's time

    def pid(self) -> int:
        return os.getpid()

    def process(self, source: str, stem: str, options: BatchOptions) -> FileResult:
        from vidmini.summaries.work import process_file

        return process_file(self.library, source, stem, options)


def _init(address: str | None, workers: int | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (and so shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    return True


def run_on_ray(sources: list[str], stems: dict[str, str], options: BatchOptions, finished: Callable[[FileResult], None],
               make_library: LibraryMaker, address: str | None = None, workers: int | None = None,
               on_dispatch: Callable[[str, int], None] | None = None) -> None:
    """Process `sources` on Ray actors, calling `finished(result)` on the driver as each file completes.
    `on_dispatch(source, actor_pid)` is called as a file is handed to an actor (progress, tests)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("Ray is not installed: pip install 'vidmini[ray]'") from None
    from vidmini.common.paths import data_home

    if not sources:
        return
    started = _init(address, workers)
    try:
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        count = workers or (gpus if gpus else max(1, int(resources.get("CPU", 1))))
        count = min(count, len(sources))
        cpus = max(1, int(resources.get("CPU", 1)) // count) if not gpus else 1
        actor_cls = ray.remote(SummarizerWorker).options(
            num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES)
        home = str(data_home())

        def spawn():
            return actor_cls.remote(home, options, cpus if not gpus else 1, make_library)

        actors = [spawn() for _ in range(count)]
        queue = list(sources)
        running: dict = {}  # future → (actor slot, source)

        def dispatch(slot: int) -> None:
            source = queue.pop(0)
            if on_dispatch is not None:
                try:
                    pid = ray.get(actors[slot].pid.remote())
                except ray.exceptions.RayError:
                    pid = -1
                on_dispatch(source, pid)
            running[actors[slot].process.remote(source, stems[source], options)] = (slot, source)

        for slot in range(count):
            if queue:
                dispatch(slot)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            slot, source = running.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except ray.exceptions.RayError as e:  # retries used up: this file fails, the others go on
                from vidmini.common.errors import one_line

                result = FileResult(source, stems[source], False, error=f"worker failed: {one_line(e)}")
                if isinstance(e, ray.exceptions.RayActorError):
                    actors[slot] = spawn()  # the old one is gone for good
            finished(result)
            if queue:
                dispatch(slot)
    finally:
        if started:
            ray.shutdown()
