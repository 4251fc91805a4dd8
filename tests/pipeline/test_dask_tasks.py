"""The Dask tasks' region reader, and what the detection task reads."""

from __future__ import annotations

import numpy as np

from diffkernel.config import MakeKernelConfig
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
    write_image(store, pair.template, group="template")
    write_image(store, pair.science, group="science")
    template, science = ZarrImage.open(store, "template"), ZarrImage.open(store, "science")
    cfg = MakeKernelConfig.default_subtraction()

    both = ZarrPair(template, science)
    t, s = both(0, 256, 0, 256)
    np.testing.assert_array_equal(both.one(True, 10, 50, 20, 90).image, t.image[10:50, 20:90])
    np.testing.assert_array_equal(both.one(False, 10, 50, 20, 90).image, s.image[10:50, 20:90])

    found = detect_task(ZarrPair(template, Unreadable(science)), True, cfg, None)
    expected = detect_kernel_sources(template.read(0, 256, 0, 256), cfg, None)
    np.testing.assert_array_equal(found["x"], expected["x"])
    on_science = detect_task(ZarrPair(Unreadable(template), science), False, cfg, None)
    assert len(on_science) > 0
