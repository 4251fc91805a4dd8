"""Settings of the processes that run diffkernel's Dask tasks.

Every task that :mod:`diffkernel.pipeline.dask.driver` submits runs :func:`prepare_task_process`
first; it acts once per process, whatever started the worker (a LocalCluster, SSH,
dask-jobqueue, Kubernetes).

Two settings matter for speed:

- BLAS runs single-threaded (:func:`diffkernel.pipeline.cells.single_threaded_blas`): one
  task per core, and bit-identical candidate statistics on every machine;
- glibc keeps freed memory for reuse. Dask's nanny starts workers with
  ``MALLOC_TRIM_THRESHOLD_=65536``, and glibc then switches off its adaptive mmap
  threshold: every array over 128 kB (a cell's basis-convolved stamps, an FFT
  block) is mapped afresh and page-faulted in, and returned to the system when
  freed. On a 4096² pair that made the whole run 1.6-1.9 times slower. Where that
  variable is set lower than :data:`TRIM_THRESHOLD`, the thresholds are raised
  with ``mallopt`` to what glibc's adaptive rule would reach at most: arrays up to
  :data:`MMAP_THRESHOLD` come from the heap, and up to :data:`TRIM_THRESHOLD` of
  free heap is kept per process.

The LocalClusters diffkernel starts also load this module as a Dask *preload*
(:data:`diffkernel.pipeline.dask.cluster.WORKER_PRELOAD`): :func:`dask_setup` imports
the task modules while the worker starts, and :func:`dask_teardown` makes the process
quick to exit once the worker has closed (see there).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
from collections.abc import Mapping

from ..cells import single_threaded_blas
from .cluster import QUIET_WORKERS_ENV

__all__ = [
    "MMAP_THRESHOLD",
    "TRIM_THRESHOLD",
    "dask_setup",
    "dask_teardown",
    "malloc_settings",
    "prepare_task_process",
]

#: Allocations at least this large are mmapped (glibc's adaptive ceiling on 64-bit).
MMAP_THRESHOLD = 32 * 2**20
#: Free memory at the top of the heap kept rather than returned (twice the above,
#: as glibc's adaptive rule sets it).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD

# glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

_PREPARED = False


def malloc_settings(environ: Mapping[str, str]) -> dict[str, int] | None:
    """The ``mallopt`` settings a process with this environment needs, or None.

    glibc's adaptive thresholds serve array code well; they are off when
    ``MALLOC_TRIM_THRESHOLD_`` (or ``MALLOC_MMAP_THRESHOLD_``) is set. Settings are
    returned only when the trim threshold is set below :data:`TRIM_THRESHOLD` and
    the mmap threshold is not set by hand (a choice that is left alone).

    Parameters
    ----------
    environ : mapping
        The process environment.

    Returns
    -------
    dict or None
        ``{"mmap_threshold": bytes, "trim_threshold": bytes}``, or None to change
        nothing.
    """
    if "MALLOC_MMAP_THRESHOLD_" in environ:
        return None
    trim = environ.get("MALLOC_TRIM_THRESHOLD_")
    if trim is None:
        return None
    try:
        if int(trim) >= TRIM_THRESHOLD:
            return None
    except ValueError:
        pass  # set, though to nothing glibc can read: the adaptive rule is still off
    return {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}


def _apply_malloc_settings(settings: dict[str, int]) -> bool:
    """Set glibc's thresholds; False where this is not glibc on Linux."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success.
    ok = mallopt(_M_MMAP_THRESHOLD, settings["mmap_threshold"]) == 1
    return ok and mallopt(_M_TRIM_THRESHOLD, settings["trim_threshold"]) == 1


def prepare_task_process() -> bool:
    """Make this process ready for diffkernel's tasks, once.

    Returns
    -------
    bool
        Whether glibc's thresholds were changed (on the call that acted).
    """
    global _PREPARED
    if _PREPARED:
        return False
    _PREPARED = True
    single_threaded_blas()
    settings = malloc_settings(os.environ)
    return settings is not None and _apply_malloc_settings(settings)


def dask_setup(worker) -> None:
    """Dask preload hook, as a worker starts: import the modules the tasks run.

    A second or more of numpy, scipy, astropy and zarr imports, which the first tasks
    would otherwise pay after the cluster is up.
    """
    from . import tasks  # noqa: F401

    if os.environ.get(QUIET_WORKERS_ENV) == "1":
        # The driver reports a failed task in one line; the worker's own "Compute
        # Failed" traceback is for -v.
        logging.getLogger("distributed.worker").setLevel(logging.CRITICAL)


def dask_teardown(worker) -> None:
    """Dask preload hook, as a worker closes: exclude every object from the last GCs.

    Interpreter finalization runs full garbage collections over every object the
    imported libraries hold (astropy's units alone are hundreds of thousands), which
    took 1-3 s per worker on a loaded 2-core machine: past Dask's grace of 4 s for two
    of them, when the nanny kills the process with a warning. Frozen objects are
    skipped by those collections; the process is exiting, so nothing is left to
    reclaim that the exit does not.
    """
    gc.freeze()
