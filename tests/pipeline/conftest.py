"""Fixtures shared by the fault tests: a small stored pair and a cluster with nannies."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.io.zarr.write import write_image
from diffkernel.simulate import make_pair

#: Side of the fault tests' pair: a few cells and tiles, seconds per run.
FAULT_SHAPE = (320, 320)


@pytest.fixture(scope="module")
def fault_pair(tmp_path_factory):
    """(Zarr store of a float32 template/science pair in 32-px chunks, its sources)."""
    sim = make_pair(FAULT_SHAPE, seed=41, template_depth=4)
    store = tmp_path_factory.mktemp("faults") / "pair.zarr"
    for name, exposure in (("template", sim.template), ("science", sim.science)):
        write_image(store, exposure.astype(np.float32), group=name, chunks=32)
    return store, sim.truth.sources


@pytest.fixture(scope="module")
def nanny_cluster():
    """Two single-threaded worker processes whose nannies restart a killed worker, as on
    a real deployment; the scheduler keeps broadcast copies (SCHEDULER_CONFIG)."""
    import dask
    import distributed

    from diffkernel.pipeline.dask.cluster import SCHEDULER_CONFIG

    with (
        dask.config.set(SCHEDULER_CONFIG),
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address="127.0.0.1:0"
        ) as cl,
    ):
        yield cl
