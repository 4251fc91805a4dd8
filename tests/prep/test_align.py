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


def _drawn_on(template, science, flags, kernel):
    """Science pixels whose ``kernel`` interpolation uses a True pixel of ``flags``,
    from the template coordinates of each science pixel and scipy's spline supports."""
    ny, nx = science.shape
    yy, xx = np.mgrid[0:ny, 0:nx]
    world = science.wcs.pixel_to_world_values(xx.ravel().astype(float), yy.ravel().astype(float))
    tx, ty = (np.asarray(v) for v in template.wcs.world_to_pixel_values(*world))
    first, width = {
        "nearest-neighbor": (lambda t: np.floor(t + 0.5), 1),
        "bilinear": (np.floor, 2),
        "biquadratic": (lambda t: np.floor(t + 0.5) - 1, 3),
        "bicubic": (lambda t: np.floor(t) - 1, 4),
    }[kernel]
    x0, y0 = first(tx).astype(int), first(ty).astype(int)
    hit = np.zeros(tx.size, dtype=bool)
    for dy in range(width):
        for dx in range(width):
            u, v = x0 + dx, y0 + dy
            inside = (u >= 0) & (u < flags.shape[1]) & (v >= 0) & (v < flags.shape[0])
            hit[inside] |= flags[v[inside], u[inside]]
    return hit.reshape(ny, nx)


@pytest.mark.parametrize("mask_kernel", ["nearest-neighbor", "bilinear"])
@pytest.mark.parametrize("kernel", ["nearest-neighbor", "bilinear", "biquadratic", "bicubic"])
def test_grow_full_mask_covers_the_image_kernel(rotated, kernel, mask_kernel):
    """A growFullMask plane is set on exactly the pixels whose image interpolation draws on
    a flagged template pixel, whatever the mask kernel (with nearest-neighbour mask warping
    it used to be the plain warp: growFullMask did nothing)."""
    template, science = rotated
    mi = template.masked_image.copy()
    flags = np.zeros(mi.shape, dtype=bool)
    flags[80:84, 100:103] = True
    flags[30, 40] = True
    mi.set_plane("CR", flags)
    cr = Exposure(mi, template.wcs, template.psf_fwhm)
    config = WarpingConfig()
    config.warpingKernelName = kernel
    config.maskWarpingKernelName = mask_kernel
    config.growFullMask = ("NO_DATA", "CR")
    grown = align.warp_exposure(cr, science, config).masked_image
    config.growFullMask = ("NO_DATA",)
    plain = align.warp_exposure(cr, science, config).masked_image
    covered = ~grown.plane("NO_DATA")
    expected = _drawn_on(template, science, flags, kernel) & covered
    np.testing.assert_array_equal(grown.plane("CR") & covered, expected | plain.plane("CR"))
    if kernel != "nearest-neighbor":
        assert grown.plane("CR").sum() > plain.plane("CR").sum()
