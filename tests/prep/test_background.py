"""Tests of diffkernel.prep.background: the mesh background under stars."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.config import AfwBackgroundConfig
from diffkernel.image import MaskedImage
from diffkernel.prep.background import mesh_background, sky_mesh

NY, NX = 192, 256


def gradient():
    yy, xx = np.mgrid[0:NY, 0:NX]
    return 100.0 + 0.1 * xx + 0.05 * yy


@pytest.fixture(scope="module")
def starry():
    """A gradient sky with noise and 30 bright stars; the star pixels are also returned."""
    rng = np.random.default_rng(70)
    yy, xx = np.mgrid[0:NY, 0:NX]
    stars = np.zeros((NY, NX))
    for _ in range(30):
        x0, y0 = rng.uniform(5, NX - 5), rng.uniform(5, NY - 5)
        stars += 500.0 * np.exp(-0.5 * ((xx - x0) ** 2 + (yy - y0) ** 2) / 1.5**2)
    image = gradient() + rng.normal(0.0, 1.0, (NY, NX)) + stars
    return MaskedImage.from_image(image, variance=1.0), stars > 0.5


@pytest.mark.parametrize(
    "statistic, mask_stars", [("MEANCLIP", False), ("MEDIAN", False), ("MEAN", True)]
)
@pytest.mark.parametrize("filter_size, margin", [(1, 16), (3, 48)])
def test_mesh_background_recovers_gradient_under_stars(
    starry, statistic, mask_stars, filter_size, margin
):
    """The mesh background follows a gradient to < 0.7 ADU (noise 1, stars 500) inside.

    The plain mean needs the stars masked (DETECTED is an ignored plane); the clipped
    mean and the median ignore them by themselves. A 3x3 median filter of the mesh bends
    a gradient in the outer boxes, so it is checked 1.5 boxes in from the edges.
    """
    mi, star_pix = starry
    mi = mi.copy()
    if mask_stars:
        mi.set_plane("DETECTED", star_pix)
    cfg = AfwBackgroundConfig(binSize=32, statistic=statistic, filterSize=filter_size)
    bkg = mesh_background(mi, cfg)
    assert bkg.shape == (NY, NX) and bkg.dtype == np.float64
    err = np.abs(bkg - gradient())[margin:-margin, margin:-margin]
    assert err.max() < 0.7


def test_mesh_background_plain_mean_is_biased_by_unmasked_stars(starry):
    """Without masking, the plain mean is pulled up by the stars: the mask matters."""
    mi, _ = starry
    bkg = mesh_background(mi, AfwBackgroundConfig(binSize=32, statistic="MEAN", filterSize=1))
    assert (bkg - gradient())[32:-32, 32:-32].max() > 5.0


def test_mesh_background_ignores_masked_and_nonfinite_pixels():
    """Pixels in ignored planes or non-finite do not enter the estimate."""
    image = gradient()
    image[50:60, 50:60] = np.nan
    image[100:110, 100:140] = 1e6
    mi = MaskedImage.from_image(image, variance=1.0)
    mi.set_plane("SAT", np.isin(np.arange(NY), np.arange(100, 110))[:, None] & (image > 1e5))
    mi.set_plane("NO_DATA", np.isnan(image))
    for statistic in ("MEANCLIP", "MEDIAN", "MEAN"):
        cfg = AfwBackgroundConfig(binSize=32, statistic=statistic, filterSize=1)
        bkg = mesh_background(mi, cfg)
        assert np.isfinite(bkg).all()
        assert np.abs(bkg - gradient())[32:-32, 32:-32].max() < 0.5


def test_mesh_background_meanclip_follows_gradient_to_edges():
    """The sep (MEANCLIP) background follows a noise-free gradient up to the image edge."""
    mi = MaskedImage.from_image(gradient(), variance=1.0)
    bkg = mesh_background(mi, AfwBackgroundConfig(binSize=32, statistic="MEANCLIP", filterSize=1))
    assert np.abs(bkg - gradient()).max() < 0.1


@pytest.mark.parametrize("statistic", ["MEDIAN", "MEAN"])
def test_mesh_background_plain_statistics_follow_gradient_to_edges(statistic):
    """MEDIAN and MEAN should follow a noise-free gradient to the edge, as MEANCLIP does."""
    mi = MaskedImage.from_image(gradient(), variance=1.0)
    bkg = mesh_background(mi, AfwBackgroundConfig(binSize=32, statistic=statistic, filterSize=1))
    assert np.abs(bkg - gradient()).max() < 0.1


def test_mesh_background_single_row_of_boxes():
    """An image one box high falls back to linear interpolation along x."""
    xx = np.arange(240, dtype=float)
    image = np.tile(10.0 + 0.2 * xx, (20, 1))
    mi = MaskedImage.from_image(image, variance=1.0)
    bkg = mesh_background(mi, AfwBackgroundConfig(binSize=32, statistic="MEDIAN", filterSize=1))
    assert bkg.shape == image.shape
    # The box side is clipped to the image height (20); between box centres it is exact.
    np.testing.assert_allclose(bkg[:, 10:-10], image[:, 10:-10], atol=1e-9)


def test_mesh_background_partial_last_box():
    """With 80 columns and 32-pixel boxes the last box (16 px) is centred on x = 71.5."""
    xx = np.arange(80, dtype=float)
    image = np.tile(10.0 + 0.1 * xx, (64, 1))
    mi = MaskedImage.from_image(image, variance=1.0)
    bkg = mesh_background(mi, AfwBackgroundConfig(binSize=32, statistic="MEDIAN", filterSize=1))
    assert np.abs(bkg - image)[16:48, 16:].max() < 0.1


def test_mesh_background_everything_masked_is_zero():
    """With every pixel ignored the plain statistics give a zero background."""
    mi = MaskedImage.from_image(gradient(), variance=1.0)
    mi.set_plane("BAD", np.ones((NY, NX), bool))
    bkg = mesh_background(mi, AfwBackgroundConfig(binSize=64, statistic="MEDIAN"))
    np.testing.assert_array_equal(bkg, 0.0)


@pytest.mark.parametrize("statistic", ["MEANCLIP", "MEDIAN", "MEAN"])
def test_sky_mesh_is_the_mesh_background(starry, statistic):
    """sky_mesh, on arrays, is the background mesh_background computes from a config."""
    mi, star_pix = starry
    mi = mi.copy()
    mi.set_plane("DETECTED", star_pix)
    cfg = AfwBackgroundConfig(binSize=32, statistic=statistic, filterSize=3)
    ignore = (mi.mask & mi.bitmask(cfg.ignoredPixelMask)) != 0
    sky = sky_mesh(mi.image, ignore, bin_size=32, filter_size=3, statistic=statistic)
    np.testing.assert_array_equal(sky, mesh_background(mi, cfg))
