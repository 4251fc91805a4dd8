"""The Python API takes what the command line takes, names its images, and refuses nonsense.

* ``MakeKernelTask.run`` and ``subtract_images`` read FITS paths, Zarr stores,
  NDData/CCDData and ``(array, WCS)`` (one dispatch: ``diffkernel.io.inputs.read_input``),
  and take ``science=``/``template=`` by name in any order;
* ``subtract_images`` returns the difference with the science image's WCS;
* the kernel is not evaluated off the image it was fitted on;
* ``run_pair`` uses the active Dask client instead of starting a LocalCluster.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from astropy.nddata import CCDData, StdDevUncertainty

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.errors import InputError
from diffkernel.image import MaskedImage
from diffkernel.io.fits import read_exposure, write_exposure
from diffkernel.io.inputs import read_input
from diffkernel.io.nddata import from_nddata
from diffkernel.io.zarr.image import ZarrImage
from diffkernel.io.zarr.write import write_image
from diffkernel.pipeline.serial import DifferenceImage
from diffkernel.simulate import make_pair


@pytest.fixture(scope="module")
def pair():
    return make_pair((192, 192), seed=8, template_depth=4, wcs=True, n_stars=40)


@pytest.fixture(scope="module")
def fitted(pair):
    task = MakeKernelTask(MakeKernelConfig.default_subtraction())
    return task.run(pair.template, pair.science, pair.truth.sources)


def test_run_by_name_equals_run_by_position(pair, fitted):
    task = MakeKernelTask(MakeKernelConfig.default_subtraction())
    named = task.run(science=pair.science, template=pair.template, kernelSources=pair.truth.sources)
    np.testing.assert_array_equal(
        named.spatialSolution.kernel_coeffs, fitted.spatialSolution.kernel_coeffs
    )
    with pytest.raises(TypeError):  # options after kernelSources are keyword-only
        task.run(pair.template, pair.science, pair.truth.sources, False)


def test_subtract_images_returns_the_science_wcs(pair, fitted):
    diff = subtract_images(science=pair.science, template=pair.template, result=fitted)
    assert isinstance(diff, DifferenceImage) and isinstance(diff, MaskedImage)
    assert diff.wcs is pair.science.wcs
    positional = subtract_images(pair.template, pair.science, fitted)
    np.testing.assert_array_equal(diff.image, positional.image)
    exposure = diff.to_exposure()
    assert exposure.wcs is pair.science.wcs and exposure.shape == (192, 192)
    with pytest.raises(InputError, match="science="):
        subtract_images(template=pair.template, result=fitted)
    with pytest.raises(InputError, match="result must be the MakeKernelResult"):
        subtract_images(science=pair.science, template=pair.template)


def test_inputs_as_the_cli_takes_them(tmp_path, pair, fitted):
    """Paths, Zarr stores, CCDData and (array, WCS) give the fit of the Exposures."""
    sci_mi, tmpl_mi = pair.science.masked_image, pair.template.masked_image
    write_exposure(tmp_path / "sci.fits", pair.science)
    write_image(tmp_path / "tmpl.zarr", pair.template)
    ccd = CCDData(
        tmpl_mi.image,
        unit="adu",
        uncertainty=StdDevUncertainty(np.sqrt(tmpl_mi.variance)),
        wcs=pair.template.wcs,
    )
    task = MakeKernelTask(MakeKernelConfig.default_subtraction())
    sources = pair.truth.sources
    # What the files hold, read back explicitly: the dispatch must give the same fit.
    science_back = read_exposure(tmp_path / "sci.fits")
    template_back = ZarrImage.open(tmp_path / "tmpl.zarr").to_exposure()
    for science, template, reference in (
        (tmp_path / "sci.fits", tmp_path / "tmpl.zarr", (science_back, template_back)),
        (str(tmp_path / "sci.fits"), ccd, (science_back, from_nddata(ccd))),
    ):
        result = task.run(science=science, template=template, kernelSources=sources)
        expected = task.run(science=reference[0], template=reference[1], kernelSources=sources)
        np.testing.assert_array_equal(
            result.spatialSolution.kernel_coeffs, expected.spatialSolution.kernel_coeffs
        )
        assert result.spatialSolution.kernel_coeffs[0, 0] == pytest.approx(1.0, abs=0.05)
        diff = subtract_images(science=science, template=template, result=result)
        assert diff.wcs is not None
    # (array, WCS): a plain image; its variance is estimated from the sky, as for FITS.
    plain = read_input((sci_mi.image, pair.science.wcs), name="science", gain=2.0)
    assert plain.wcs is not None and plain.masked_image.variance.min() > 0
    header = fits.Header({"GAIN": 2.0})
    assert read_input((sci_mi.image, header)).meta["GAIN"] == 2.0
    with pytest.raises(InputError, match=r"template: .*got dict"):
        task.run(science=pair.science, template={"image": 1})
    with pytest.raises(InputError, match="WCS or a FITS header"):
        read_input((sci_mi.image, "not a wcs"))


def test_kernel_is_not_extrapolated_off_the_image(fitted):
    kernel = fitted.psfMatchingKernel
    assert kernel.image_at(0, 191).shape == (kernel.kernel_size,) * 2
    assert np.isfinite(kernel.sum_at(191.4, 0))
    with pytest.raises(InputError, match=r"\(1000, 2000\) is outside .*x in 0\.\.191"):
        kernel.image_at(1000, 2000)
    with pytest.raises(InputError, match="outside"):
        kernel.sum_at(-3, 10)
    with pytest.raises(InputError, match="outside"):
        kernel.coefficients_at(np.array([10.0, 500.0]), np.array([10.0, 10.0]))


def test_run_pair_uses_the_active_client(tmp_path, pair, client, monkeypatch):
    import distributed

    from diffkernel.pipeline.dask.driver import run_pair

    store = tmp_path / "pair.zarr"
    write_image(store, pair.template, group="template", chunks=64)
    write_image(store, pair.science, group="science", chunks=64)

    def no_cluster(*args, **kwargs):
        raise AssertionError("run_pair started a LocalCluster beside the active client")

    monkeypatch.setattr(distributed, "LocalCluster", no_cluster)
    assert distributed.default_client() is client
    run = run_pair(
        (store, "science"), (store, "template"), tmp_path / "d.zarr", sources=pair.truth.sources
    )
    assert run.quality["verdict"] in ("pass", "warn")
    assert not client.status == "closed"  # used, not closed
