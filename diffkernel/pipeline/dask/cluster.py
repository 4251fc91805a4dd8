"""Where a pair runs: the Dask client, its workers' environment and the tile size."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import dask

from ...errors import InputError

__all__ = [
    "LOCAL_HOST",
    "QUIET_WORKERS_ENV",
    "WORKER_ENVIRON",
    "connect",
    "default_tile_size",
    "worker_environ",
]

log = logging.getLogger("diffkernel")

#: Environment of LocalCluster workers. It replaces Dask's default, which also sets
#: MALLOC_TRIM_THRESHOLD_=65536 and with it switches off glibc's adaptive mmap
#: threshold (tasks undo that anyway, see :mod:`diffkernel.pipeline.dask.taskproc`).
#: BLAS, OpenMP and Zarr's codec thread pool stay single-threaded: one task per core,
#: and no worker borrowing its neighbour's core.
#: Environment variable (set to "1") that keeps a LocalCluster worker's failed-task
#: tracebacks out of the user's terminal; the driver reports the failure itself.
QUIET_WORKERS_ENV = "DIFFKERNEL_QUIET_WORKERS"

WORKER_ENVIRON = {
    "OMP_NUM_THREADS": 1,
    "MKL_NUM_THREADS": 1,
    "OPENBLAS_NUM_THREADS": 1,
    "ZARR_THREADING__MAX_WORKERS": 1,
}


#: Scheduler settings of the clusters diffkernel starts, and of the ones it recommends.
#: The run broadcasts small shared objects (cell plan, readers, kernels) to every
#: worker; Dask's active memory manager, on by default, soon drops those copies to
#: one, and a worker lost while holding the only copy takes data with it that can't
#: be recomputed: the run then fails instead of recovering.
SCHEDULER_CONFIG = {"distributed.scheduler.active-memory-manager.start": False}

#: Dask preload of every LocalCluster worker (:mod:`.taskproc`'s ``dask_setup`` and
#: ``dask_teardown``): the task modules are imported as the worker starts (a second or
#: more, which the first tasks would pay otherwise, after the cluster is up, where a
#: caller that starts the cluster alongside other work, as the command line does while
#: it reads its inputs, cannot hide it), and the worker exits promptly when closed.
WORKER_PRELOAD = ("diffkernel.pipeline.dask.taskproc",)


def default_tile_size(chunks: tuple[int, int], shape: tuple[int, int] | None = None) -> int:
    """Subtraction tile side: a multiple of the chunk side, at most 1024.

    The largest such tile, unless the image would then have fewer than four tiles
    (too few to keep two workers busy), when the largest one that gives four is taken.
    """
    c = max(int(chunks[0]), int(chunks[1]))
    tile = c * max(1, 1024 // c)
    if shape is not None:
        while tile > c and -(-shape[0] // tile) * -(-shape[1] // tile) < 4:
            tile -= c
    return tile


#: Where the LocalCluster's scheduler, workers and dashboard listen: this machine
#: only. The dashboard shows paths and task names, and whoever can reach a scheduler
#: can run code on its workers (Dask's trust model), so nothing is opened to the
#: network unless a scheduler is started on purpose (see the README).
LOCAL_HOST = "127.0.0.1"


def worker_environ() -> dict[str, Any]:
    """:data:`WORKER_ENVIRON`, and quiet workers unless the ``diffkernel`` logger is at
    DEBUG (``-v``): a failed task's traceback then stays in the worker."""
    environ = dict(WORKER_ENVIRON)
    if not log.isEnabledFor(logging.DEBUG):
        environ[QUIET_WORKERS_ENV] = "1"
    return environ


@contextlib.contextmanager
def connect(
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: bool = False,
) -> Iterator[Any]:
    """A ``distributed.Client``: the one given, one to ``scheduler``, the active one, or a
    LocalCluster.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as is (not closed). When neither it, ``scheduler`` nor ``n_workers`` is
        given, the active client (``distributed.default_client()``, e.g. one a notebook
        made) is used as is, rather than a new LocalCluster beside it.
    scheduler : str, optional
        Address such as ``tcp://host:8786`` of a running scheduler.
    n_workers : int, optional
        Worker processes of the LocalCluster started when neither is given
        (default: one per core), each single-threaded. It listens on
        :data:`LOCAL_HOST` only, dashboard included.
    progress : bool
        Unused: the scheduler and its dashboard link are logged (logger ``diffkernel``,
        INFO) whatever its value.

    Raises
    ------
    InputError
        If ``n_workers`` is below 1, or ``scheduler`` is not a reachable Dask scheduler
        (a malformed address, nothing listening, or another kind of service).
    """
    from distributed import Client, LocalCluster, default_client

    if n_workers is not None and int(n_workers) < 1:
        raise InputError(f"workers must be at least 1, got {n_workers}")
    if client is None and scheduler is None and n_workers is None:
        with contextlib.suppress(ValueError):  # no active client
            client = default_client()
            log.info("using the active Dask client, dashboard %s", client.dashboard_link)
    if client is not None:
        yield client
        return
    if scheduler is not None:
        own = _client_of(scheduler)
        try:
            log.info("scheduler %s, dashboard %s", scheduler, own.dashboard_link)
            yield own
        finally:
            own.close()
        return
    workers = n_workers or os.cpu_count() or 1
    with (
        dask.config.set(
            {"distributed.nanny.pre-spawn-environ": worker_environ(), **SCHEDULER_CONFIG}
        ),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            host=LOCAL_HOST,
            dashboard_address=f"{LOCAL_HOST}:0",
            preload=list(WORKER_PRELOAD),
        ) as cluster,
        Client(cluster) as own,
    ):
        log.info("LocalCluster of %d workers, dashboard %s", workers, own.dashboard_link)
        yield own


def _client_of(scheduler: str):
    """A client of the scheduler at ``scheduler``; one line naming the cause if not."""
    from distributed import Client

    hint = "give the address of a running Dask scheduler, like tcp://host:8786"
    try:
        try:
            return Client(scheduler, timeout="20s")
        except BaseException:
            _forget_failed_client()
            raise
    except (ValueError, TypeError) as err:
        raise InputError(f"scheduler {scheduler!r} is not a Dask address: {err}; {hint}") from None
    except (OSError, TimeoutError) as err:
        raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {err}; {hint}") from None
    except MemoryError:
        # Dask reads a length prefix first: another protocol's bytes read as exabytes.
        raise InputError(
            f"the service at {scheduler} does not speak Dask's protocol (is it another "
            f"kind of server?); {hint}"
        ) from None
    except Exception as err:
        raise InputError(
            f"cannot connect to a Dask scheduler at {scheduler}: {type(err).__name__}: {err}; "
            f"{hint}"
        ) from None


def _forget_failed_client() -> None:
    """Close a client left as the process's default by a failed connection.

    distributed registers a client before it has connected; one that then fails stays
    the default, and the next run without an address would use it (in one process:
    the Python API, the tests).
    """
    from distributed import default_client

    with contextlib.suppress(Exception):
        client = default_client()
        if client.status != "running":
            client.close()
