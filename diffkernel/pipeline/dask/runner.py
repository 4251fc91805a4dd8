"""Submitting one run's tasks and waiting for them, stage by stage."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from .tasks import in_task_process

__all__ = ["TaskRunner"]

log = logging.getLogger("diffkernel")


class TaskRunner:
    """The tasks of one run on one client, with their stages' wall times.

    Parameters
    ----------
    client : distributed.Client
        Where the tasks run.
    progress : bool
        Show dask's progress bar for each stage.

    Attributes
    ----------
    timings : dict
        Wall seconds per stage (see :meth:`wait`).
    """

    def __init__(self, client, progress: bool = False) -> None:
        self.client = client
        self.progress = progress
        # Task keys carry it: concurrent runs on one client (a batch) never share one.
        self.token = uuid.uuid4().hex[:8]
        self.timings: dict[str, float] = {}

    def submit(self, fn, *args, name: str, **kwargs):
        """A future of ``fn(*args)`` run in a prepared task process, keyed ``name``."""
        return self.client.submit(
            in_task_process, fn, *args, key=f"{name}-{self.token}", pure=False, **kwargs
        )

    def scatter(self, value) -> Any:
        """``value`` sent once to every worker."""
        # hash=False: a content-hashed key would be shared by concurrent identical
        # runs on one client (a batch), and one run releasing it loses the other's.
        return self.client.scatter(value, broadcast=True, hash=False)

    def wait(self, futures, stage: str, started: float, gather: bool = True) -> list | None:
        """Wait for a stage's tasks; their results, or None when ``gather`` is False.

        Results the driver does not need (the cells' statistics, which the reduction
        task fetches from the workers) stay on the workers: gathering them would
        ship and unpickle tens of MB through this process for nothing. The stage's
        wall time since ``started`` goes into :attr:`timings`.
        """
        from distributed import progress, wait

        log.info("%s (%d tasks)", stage, len(futures))
        if self.progress:
            progress(futures)
            print()
        values = None
        if gather:
            values = self.client.gather(futures)
        else:
            wait(futures)
            for future in futures:
                if future.status == "error":
                    future.result()  # raises the task's exception here
        self.timings[stage] = time.perf_counter() - started
        return values

    def wait_one(self, fn, *args, name: str) -> Any:
        """Run one task ``fn(*args)`` as the stage ``name`` and return its result."""
        return self.wait([self.submit(fn, *args, name=name)], name, time.perf_counter())[0]

    def gather_redoing(self, future, redo, attempts: int = 3):
        """The result of ``future``; ``redo(attempt)`` makes a new one if it is cancelled.

        A worker lost while a result is being fetched from it can leave the future
        cancelled ("already forgotten") instead of computed again (seen in
        distributed 2026.8 when a worker is killed during the driver's gather).
        """
        from distributed.client import FutureCancelledError

        for attempt in range(1, attempts + 1):
            try:
                return self.client.gather(future)
            except FutureCancelledError:
                if attempt == attempts:
                    raise
                future = redo(attempt)
        raise AssertionError("unreachable")  # pragma: no cover
