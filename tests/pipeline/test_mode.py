"""Direction of the convolution: convolveTemplate, convolveScience, auto (by FWHM)."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.errors import ConfigError, InputError
from diffkernel.image import Exposure, MaskedImage
from diffkernel.pipeline.stages import choose_mode
from diffkernel.simulate import make_pair

distributed = pytest.importorskip("distributed")

TRANSIENT = (150, 170)


@pytest.fixture(scope="module")
def reversed_pair():
    """A pair whose template is the blurrier image, with a new source in the science one.

    The simulation's sharp deep image plays the science image and its blurred image
    the template, so matching the template to the science would need deconvolution.
    """
    sim = make_pair((320, 320), seed=23, template_depth=4)
    sharp, blurred = sim.template, sim.science
    image = sharp.masked_image.image.copy()
    yy, xx = np.mgrid[:320, :320]
    sigma = sim.truth.template_fwhm / 2.3548
    bump = 20000.0 * np.exp(-((xx - TRANSIENT[0]) ** 2 + (yy - TRANSIENT[1]) ** 2) / (2 * sigma**2))
    image += bump / (2 * np.pi * sigma**2)
    mi = sharp.masked_image
    science = Exposure(
        MaskedImage(image.astype(np.float32), mi.variance.astype(np.float32), mi.mask),
        psf_fwhm=sharp.psf_fwhm,
    )
    bmi = blurred.masked_image
    template = Exposure(
        MaskedImage(bmi.image.astype(np.float32), bmi.variance.astype(np.float32), bmi.mask),
        psf_fwhm=blurred.psf_fwhm,
    )
    return template, science, sim.truth.sources


def config() -> MakeKernelConfig:
    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    cfg.kernel.active.spatialKernelOrder = 1
    return cfg


def sky_stats(diff):
    z = diff.image / np.sqrt(diff.variance)
    clean = np.isfinite(z) & (diff.mask == 0)
    yy, xx = np.mgrid[: z.shape[0], : z.shape[1]]
    clean &= np.hypot(xx - TRANSIENT[0], yy - TRANSIENT[1]) > 15
    median = np.median(z[clean])
    return median, 1.4826 * np.median(np.abs(z[clean] - median))


def test_auto_convolves_the_sharper_image(reversed_pair):
    """auto picks convolveScience when the template is wider; the difference is honest and
    a new source in the science image is positive, as in convolveTemplate mode."""
    template, science, sources = reversed_pair
    auto = MakeKernelTask(config()).run(template, science, sources, mode="auto")
    assert auto.mode == "convolveScience" == auto.metadata["mode"]
    assert auto.metadata["template_fwhm"] > auto.metadata["science_fwhm"]
    diff = subtract_images(template, science, auto)
    median, robust_std = sky_stats(diff)
    assert abs(median) < 0.1 and 0.9 < robust_std < 1.1
    ty, tx = TRANSIENT[1], TRANSIENT[0]
    assert diff.image[ty, tx] / np.sqrt(diff.variance[ty, tx]) > 10
    forced = MakeKernelTask(config()).run(template, science, sources, mode="convolveTemplate")
    assert forced.mode == "convolveTemplate"
    other = subtract_images(template, science, forced)
    assert other.image[TRANSIENT[1], TRANSIENT[0]] > 0
    # Deconvolving is the worse choice: its residuals are further from unit variance.
    assert abs(sky_stats(other)[1] - 1) >= abs(robust_std - 1) - 0.01


def test_choose_mode_rules():
    """auto compares FWHMs; a missing FWHM is a clear error; other modes pass through."""
    assert choose_mode("auto", 3.0, 4.0) == "convolveTemplate"
    assert choose_mode("auto", 4.0, 3.0) == "convolveScience"
    assert choose_mode("convolveTemplate", 5.0, 3.0) == "convolveTemplate"
    with pytest.raises(InputError, match="science FWHM could not be measured"):
        choose_mode("auto", 3.0, None)
    with pytest.raises(ConfigError, match="mode must be one of"):
        MakeKernelTask(config()).run(None, None, mode="sideways")


def test_distributed_auto_mode_equals_serial(reversed_pair, tmp_path):
    """run_pair in auto mode makes the same choice and kernel as MakeKernelTask."""
    from diffkernel.io.zarr.write import write_image
    from diffkernel.pipeline.dask.driver import run_pair

    template, science, sources = reversed_pair
    store = tmp_path / "pair.zarr"
    write_image(store, template, group="template", chunks=64)
    write_image(store, science, group="science", chunks=64)
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        run = run_pair(
            (store, "science"), (store, "template"), tmp_path / "out.zarr",
            config=config(), sources=sources, client=client, mode="auto",
        )  # fmt: skip
    serial = MakeKernelTask(config()).run(template, science, sources, mode="auto")
    assert run.result.metadata["mode"] == "convolveScience"
    np.testing.assert_array_equal(
        run.result.solution.kernel_coeffs, serial.spatialSolution.kernel_coeffs
    )
    diff = subtract_images(template, science, serial, decorrelate=True)
    stored = run.result.difference.read(0, 320, 0, 320)
    finite = np.isfinite(diff.image)
    sigma = np.sqrt(diff.variance[finite])
    assert np.max(np.abs(stored.image[finite] - diff.image[finite]) / sigma) < 1e-4
    np.testing.assert_array_equal(stored.mask, diff.mask)


def test_unmeasurable_fwhm_is_a_clear_error(reversed_pair):
    """scaleByFwhm with no PSF model and too few stars to measure one: a clear error."""
    template, science, sources = reversed_pair
    bare_t = Exposure(template.masked_image)
    bare_s = Exposure(science.masked_image)
    with pytest.raises(InputError, match="template PSF FWHM could not be measured"):
        MakeKernelTask(config()).run(bare_t, bare_s, sources[:2])
    cfg = config()
    cfg.kernel.active.scaleByFwhm = False
    with pytest.raises(InputError, match="mode='auto' needs both PSF widths"):
        MakeKernelTask(cfg).run(bare_t, bare_s, sources[:2], mode="auto")
