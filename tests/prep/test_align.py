"""Tests of diffkernel.prep.align: tiled warping equals one whole-image reproject."""

from __future__ import annotations

import numpy as np
import pytest
from reproject import reproject_interp

from diffkernel.config import WarpingConfig
from diffkernel.errors import InputError
from diffkernel.image import Exposure, MaskedImage
from diffkernel.prep import align
from diffkernel.simulate import make_pair


@pytest.fixture(scope="module")
def rotated():
    """A 200x230 template and a science WCS shifted by a few pixels and rotated 1 degree."""
    pair = make_pair((200, 230), seed=21, wcs=True)
    template = pair.template
    science_wcs = template.wcs.deepcopy()
    theta = np.deg2rad(1.0)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    science_wcs.wcs.pc = rot @ science_wcs.wcs.get_pc()
    science_wcs.wcs.crpix = science_wcs.wcs.crpix + np.array([3.3, -2.6])
    mi = MaskedImage(np.zeros(template.shape), np.ones(template.shape))
    return template, Exposure(mi, science_wcs)


@pytest.mark.parametrize("kernel", ["bilinear", "bicubic"])
def test_tiled_warp_equals_whole_image_warp(rotated, kernel, monkeypatch):
    """Warping in 64-pixel tiles gives the pixels of one reproject over the whole image."""
    template, science = rotated
    config = WarpingConfig()
    config.warpingKernelName = kernel
    monkeypatch.setattr(align, "WARP_TILE", 64)
    tiled = align.warp_exposure(template, science, config).masked_image
    whole, footprint = reproject_interp(
        (template.masked_image.image, template.wcs),
        science.wcs,
        shape_out=science.shape,
        order=kernel,
    )
    good = (footprint > 0) & np.isfinite(whole)
    assert good.mean() > 0.9
    np.testing.assert_allclose(tiled.image[good], whole[good], rtol=1e-10, atol=1e-9)
    missing = ~good
    assert np.isnan(tiled.image[missing]).all()
    assert (tiled.plane("NO_DATA") == missing).all() and (tiled.plane("EDGE") == missing).all()


def test_warp_without_overlap_or_wcs_is_refused(rotated):
    """No overlap on the sky, or a missing WCS, is a clear InputError."""
    template, science = rotated
    far = science.wcs.deepcopy()
    far.wcs.crval = far.wcs.crval + np.array([40.0, 10.0])
    with pytest.raises(InputError, match="do not overlap"):
        align.warp_exposure(template, Exposure(science.masked_image, far), WarpingConfig())
    with pytest.raises(InputError, match="the science has none"):
        align.warp_exposure(template, Exposure(science.masked_image), WarpingConfig())


def test_bicubic_warp_of_a_template_with_no_data(rotated):
    """NaN (NO_DATA) template pixels stay local: the spline prefilter must not spread them
    over the tile (it used to make the whole warp NaN and report no overlap)."""
    template, science = rotated
    mi = template.masked_image.copy()
    mi.image[50:60, 70:90] = np.nan
    mi.set_plane("NO_DATA", ~np.isfinite(mi.image))
    holed = Exposure(mi, template.wcs, template.psf_fwhm)
    config = WarpingConfig()
    config.warpingKernelName = "bicubic"
    warped = align.warp_exposure(holed, science, config).masked_image
    missing = ~np.isfinite(warped.image)
    assert 0 < missing.mean() < 0.1
    assert (warped.plane("NO_DATA") == missing).all()
    full = align.warp_exposure(template, science, config).masked_image
    far = ~missing & np.isfinite(full.image)
    assert far.mean() > 0.85
