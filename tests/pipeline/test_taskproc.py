"""Task-process settings: single-threaded BLAS and glibc's memory thresholds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from diffkernel.pipeline.dask.taskproc import MMAP_THRESHOLD, TRIM_THRESHOLD, malloc_settings

RAISED = {"mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}


def reused_allocation_faults(cycles: int = 20, nbytes: int = 2**20) -> tuple[int, int]:
    """Page faults of ``cycles`` rounds of allocating, filling and freeing an array.

    Returns the faults and the number of pages one array spans. Where glibc maps
    every such array afresh, each round faults in all its pages; where it reuses
    freed heap memory, only the first does.
    """
    import resource

    import numpy as np

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        values = np.empty(nbytes // 8)
        values.fill(1.0)
        del values
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, nbytes // 4096


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),  # glibc's adaptive thresholds are on: nothing to do
        ({"MALLOC_TRIM_THRESHOLD_": "65536"}, RAISED),  # Dask's nanny default
        ({"MALLOC_TRIM_THRESHOLD_": "0"}, RAISED),
        ({"MALLOC_TRIM_THRESHOLD_": "junk"}, RAISED),
        ({"MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}, None),  # already high enough
        ({"MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_MMAP_THRESHOLD_": "131072"}, None),
    ],
)
def test_malloc_settings_only_where_the_adaptive_rule_is_off(environ, expected):
    assert malloc_settings(environ) == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_prepared_process_reuses_freed_arrays():
    """Under Dask's MALLOC_TRIM_THRESHOLD_, every 1 MB array faults in afresh; not after."""
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_taskproc import reused_allocation_faults
        from diffkernel.pipeline.dask.taskproc import prepare_task_process
        before = reused_allocation_faults()
        changed = prepare_task_process()
        again = prepare_task_process()
        after = reused_allocation_faults()
        print(json.dumps([before, changed, again, after]))
        """
    )
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    (before, pages), changed, again, (after, _) = json.loads(out.stdout.splitlines()[-1])
    if before < 10 * pages:
        pytest.skip(f"this libc does not map each array afresh ({before} faults)")
    assert changed is True and again is False
    assert after < 3 * pages, (before, after)
