"""Submitting one run's tasks and waiting for them, stage by stage."""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import CancelledError
from typing import Any

from ...errors import ClusterError, ConfigError
from .tasks import in_task_process

__all__ = ["TaskRunner", "SCATTER_TIMEOUT"]

#: Seconds one broadcast of a run's small shared objects may take before it is tried
#: again: a worker lost mid-broadcast can leave it waiting forever.
SCATTER_TIMEOUT = 120.0
#: Attempts of a broadcast before the run fails.
SCATTER_ATTEMPTS = 3

log = logging.getLogger("diffkernel")


class TaskRunner:
    """The tasks of one run on one client, with their stages' wall times.

    Parameters
    ----------
    client : distributed.Client
        Where the tasks run.
    progress : bool
        Show dask's progress bar for each stage.
    timeout : float, optional
        Seconds the whole run may wait for its tasks; past it, the wait in progress
        raises :class:`~diffkernel.errors.ClusterError` (none by default).

    Attributes
    ----------
    timings : dict
        Wall seconds per stage (see :meth:`wait`).
    """

    def __init__(self, client, progress: bool = False, timeout: float | None = None) -> None:
        self.client = client
        self.progress = progress
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + float(timeout)
        # Task keys carry it: concurrent runs on one client (a batch) never share one.
        self.token = uuid.uuid4().hex[:8]
        self.timings: dict[str, float] = {}

    def submit(self, fn, *args, name: str, **kwargs):
        """A future of ``fn(*args)`` run in a prepared task process, keyed ``name``."""
        return self.client.submit(
            in_task_process, fn, *args, key=f"{name}-{self.token}", pure=False, **kwargs
        )

    def limit(self, timeout: float | None) -> None:
        """Give the run ``timeout`` seconds from now (None: no limit)."""
        if timeout is not None and not float(timeout) > 0:
            raise ConfigError(f"timeout must be a positive number of seconds, got {timeout}")
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + float(timeout)

    def remaining(self, default: float | None = None) -> float | None:
        """Seconds left before the run's deadline (``default`` when there is none).

        Raises
        ------
        ClusterError
            If the deadline has passed.
        """
        if self.deadline is None:
            return default
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out()
        return left if default is None else min(left, default)

    def timed_out(self) -> ClusterError:
        return ClusterError(
            f"the run took longer than its timeout of {self.timeout:g} s and was stopped "
            "(a larger timeout, or more workers)"
        )

    def scatter(self, value) -> Any:
        """``value`` sent once to every worker; tried again if a worker is lost meanwhile.

        Raises
        ------
        ClusterError
            If every attempt failed (no worker left) or the run's time ran out.
        """
        from distributed.client import FutureCancelledError

        failure: BaseException | None = None
        for _ in range(SCATTER_ATTEMPTS):
            try:
                # hash=False: a content-hashed key would be shared by concurrent
                # identical runs on one client (a batch), and one run releasing it
                # loses the other's.
                # The whole broadcast is bounded (callback_timeout): scatter's own
                # timeout only bounds the wait for workers, and the scheduler's
                # replication to a worker that died meanwhile can retry forever
                # (distributed 2026.8), which hung runs for over 10 minutes.
                return self.client.sync(
                    self.client._scatter,
                    value,
                    broadcast=True,
                    hash=False,
                    callback_timeout=self.remaining(SCATTER_TIMEOUT),
                )
            except (KeyError, FutureCancelledError, OSError, TimeoutError) as err:
                # A worker lost mid-broadcast: the scheduler forgets the half-sent
                # keys (a KeyError, a cancelled future) or the send never returns.
                failure = err
                self.wait_for_a_worker()
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise self.timed_out() from failure
        raise ClusterError(
            f"could not send the run's shared data to the workers ({SCATTER_ATTEMPTS} "
            f"attempts; workers lost?): {type(failure).__name__}: {failure}"
        ) from failure

    def wait_for_a_worker(self) -> None:
        """Wait until the cluster has a worker again (a nanny restarts a lost one).

        Raises
        ------
        ClusterError
            If none comes back in time.
        """
        try:
            self.client.wait_for_workers(1, timeout=self.remaining(SCATTER_TIMEOUT))
        except (TimeoutError, OSError) as err:
            raise ClusterError(f"the Dask cluster has no worker left: {err}") from err

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
        try:
            if self.deadline is not None:
                try:
                    wait(futures, timeout=self.remaining())
                except TimeoutError:
                    raise self.timed_out() from None
            if gather:
                values = self.client.gather(futures)
            else:
                wait(futures)
                for future in futures:
                    if future.status == "error":
                        future.result()  # raises the task's exception here
        except CancelledError as err:  # distributed's Future(s)CancelledError
            # The scheduler gave up on a task (its workers all lost, or its inputs
            # gone): one line, not distributed's internals.
            raise ClusterError(
                f"the Dask cluster cancelled the {stage} stage's tasks (workers lost?): {err}"
            ) from err
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
                if self.deadline is None:
                    return self.client.gather(future)
                return future.result(timeout=self.remaining())
            except TimeoutError:
                raise self.timed_out() from None
            except FutureCancelledError as err:
                if attempt == attempts:
                    raise ClusterError(
                        f"the Dask cluster lost a task's result {attempts} times (workers "
                        f"lost?): {err}"
                    ) from err
                future = redo(attempt)
        raise AssertionError("unreachable")  # pragma: no cover
