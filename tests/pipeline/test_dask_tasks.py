"""The Dask tasks' region reader, and what the detection task reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from diffkernel.config import MakeKernelConfig
from diffkernel.image import Exposure, MaskedImage
from diffkernel.io.zarr.image import ZarrImage
from diffkernel.io.zarr.write import write_image
from diffkernel.pipeline.dask.tasks import ZarrPair, detect_task
from diffkernel.pipeline.stages import detect_kernel_sources
from diffkernel.simulate import make_pair


class Unreadable:
    """An image whose pixels must not be read; its shape is the other's."""

    def __init__(self, like: ZarrImage) -> None:
        self.shape = like.shape

    def read(self, *args, **kwargs):
        raise AssertionError("the other image was read")

    read_stored = read


def test_detection_reads_only_the_image_it_detects_on(tmp_path):
    pair = make_pair((256, 256), seed=7, template_depth=4)
    store = tmp_path / "pair.zarr"
    for name, exposure in (("template", pair.template), ("science", pair.science)):
        mi = exposure.masked_image  # float32 pixels, as cameras give: stored as float32
        f32 = MaskedImage(
            mi.image.astype(np.float32), mi.variance.astype(np.float32), mi.mask, mi.mask_planes
        )
        write_image(store, Exposure(f32, exposure.wcs), group=name)
    template, science = ZarrImage.open(store, "template"), ZarrImage.open(store, "science")
    cfg = MakeKernelConfig.default_subtraction()

    both = ZarrPair(template, science)
    t, s = both(0, 256, 0, 256)
    np.testing.assert_array_equal(both.one(True, 10, 50, 20, 90).image, t.image[10:50, 20:90])
    np.testing.assert_array_equal(both.one(False, 10, 50, 20, 90).image, s.image[10:50, 20:90])

    assert template.dtype == np.float32
    found = detect_task(ZarrPair(template, Unreadable(science)), True, cfg, None)
    expected = detect_kernel_sources(template.read(0, 256, 0, 256), cfg, None)
    for name in ("x", "y", "flux"):  # the same as on the float64 image in memory
        np.testing.assert_array_equal(found[name], expected[name])
    on_science = detect_task(ZarrPair(Unreadable(template), science), False, cfg, None)
    expected = detect_kernel_sources(science.read(0, 256, 0, 256), cfg, None)
    np.testing.assert_array_equal(on_science["flux"], expected["flux"])


def _task_modules_loaded() -> bool:
    import sys

    return "diffkernel.pipeline.dask.tasks" in sys.modules


def test_cluster_workers_load_the_task_modules_as_they_start():
    """connect()'s LocalCluster workers import the task modules before any task runs."""
    pytest.importorskip("distributed")
    from diffkernel.pipeline.dask.cluster import connect

    with connect(n_workers=1) as client:
        assert list(client.run(_task_modules_loaded).values()) == [True]


def test_teardown_freezes_the_objects_out_of_the_exit_collections():
    code = (
        "import gc\n"
        "from diffkernel.pipeline.dask.taskproc import dask_teardown\n"
        "before = gc.get_freeze_count()\n"
        "dask_teardown(None)\n"
        "print(before == 0 and gc.get_freeze_count() > 0)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.stdout.strip() == "True", proc.stderr


def test_task_modules_leave_reproject_until_a_warp():
    """Workers import the task modules as they start; reproject (0.5 s) waits for a warp."""
    code = (
        "import sys\n"
        "import diffkernel.pipeline.dask.tasks, diffkernel.pipeline.dask.driver\n"
        "print('reproject' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.stdout.strip() == "False", proc.stderr
