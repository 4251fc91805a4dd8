"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def client():
    """A client of a LocalCluster of two single-threaded worker processes (per module)."""
    distributed = pytest.importorskip("distributed")
    import dask

    from diffkernel.pipeline.dask.cluster import SCHEDULER_CONFIG

    with (
        dask.config.set(SCHEDULER_CONFIG),
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c
