"""Tests of diffkernel.prep.selection: candidate placement, vetting, ranking and cells."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from diffkernel.errors import InputError
from diffkernel.image import Exposure, MaskedImage
from diffkernel.prep.selection import (
    _flat_rows,
    aperture_flux_snr,
    assign_cells,
    core_flux_snr,
    source_positions,
    vet_positions,
)
from diffkernel.simulate import make_pair

NY, NX = 60, 80
HS, HK = 5, 3  # stamp half-width, kernel half-width: template cutout half-width 8
BAD = ("NO_DATA", "EDGE", "SAT")


def images():
    t = MaskedImage.from_image(np.zeros((NY, NX)), variance=1.0)
    s = MaskedImage.from_image(np.zeros((NY, NX)), variance=1.0)
    return t, s


def vet(t, s, x, y, bad=BAD):
    return vet_positions(t, s, np.asarray(x, float), np.asarray(y, float), HS, HK, bad)


def test_vet_positions_clean_and_rounding():
    """Usable sources get '' and their centres are rounded to the nearest pixel."""
    t, s = images()
    xc, yc, reason = vet(t, s, [20.4, 40.6, 30.0], [20.2, 30.5001, 29.49])
    assert list(reason) == ["", "", ""]
    np.testing.assert_array_equal(xc, [20, 41, 30])
    np.testing.assert_array_equal(yc, [20, 31, 29])
    assert xc.dtype == np.intp


def test_vet_positions_edge_limits():
    """The whole template cutout (half-width hs + hk = 8) must lie inside the image."""
    t, s = images()
    x = [8, 7, NX - 1 - 8, NX - 8, 30, 30]
    y = [30, 30, 30, 30, 8, NY - 8]
    _, _, reason = vet(t, s, x, y)
    assert list(reason) == ["", "edge", "", "edge", "", "edge"]


def test_vet_positions_not_finite():
    """NaN or infinite positions are 'not finite' (and do not raise)."""
    t, s = images()
    xc, yc, reason = vet(t, s, [np.nan, 30.0, np.inf], [30.0, np.nan, 30.0])
    assert list(reason) == ["not finite"] * 3
    np.testing.assert_array_equal(xc, 0)


def test_vet_positions_masked_template_border():
    """A SAT pixel in the border of the template cutout (outside the stamp) masks it."""
    t, s = images()
    t.set_plane("SAT", np.zeros((NY, NX), bool))
    t.mask[20, 30 + 8] |= 1 << t.mask_planes["SAT"]  # corner column of the cutout
    _, _, reason = vet(t, s, [30.0, 30.0 - 1, 30.0 + 9], [20.0, 20.0, 40.0])
    # (29, 20): the pixel is 9 columns away, outside its cutout; (39, 40): far away.
    assert list(reason) == ["masked", "", ""]


def test_vet_positions_masked_science_stamp_only():
    """A SAT science pixel masks a source only inside the science stamp (half-width 5)."""
    t, s = images()
    s.mask[40, 20] |= 1 << s.mask_planes["SAT"]
    x = [20.0 + 5, 20.0 + 6, 50.0]
    y = [40.0, 40.0, 40.0]
    _, _, reason = vet(t, s, x, y)
    assert list(reason) == ["masked", "", ""]


def test_vet_positions_only_bad_planes_count():
    """A plane outside bad_planes (here CR) does not mask; adding it to the list does."""
    t, s = images()
    s.mask[30, 30] |= 1 << s.mask_planes["CR"]
    assert vet(t, s, [30.0], [30.0])[2][0] == ""
    assert vet(t, s, [30.0], [30.0], BAD + ("CR",))[2][0] == "masked"
    # Unknown plane names are ignored, not an error.
    assert vet(t, s, [30.0], [30.0], ("NOT_A_PLANE",))[2][0] == ""


def test_vet_positions_duplicate():
    """Two sources rounding to one pixel: the first is kept, the second is 'duplicate'."""
    t, s = images()
    x = [30.2, 50.0, 29.8, 30.4, 50.0]
    y = [30.1, 30.0, 29.9, 30.3, 30.0]
    _, _, reason = vet(t, s, x, y)
    assert list(reason) == ["", "", "duplicate", "duplicate", "duplicate"]


def test_vet_positions_first_reason_wins():
    """An edge source is 'edge' even when masked; a masked one does not claim the pixel."""
    t, s = images()
    s.mask[30, 30] |= 1 << s.mask_planes["SAT"]
    _, _, reason = vet(t, s, [2.0, 30.0, 30.0], [2.0, 30.0, 30.0])
    # Both at (30, 30) are masked: masking comes before the duplicate test.
    assert list(reason) == ["edge", "masked", "masked"]


def test_assign_cells():
    """Cell index = row * n_cells_x + column with ceil(nx / size_x) cells per row."""
    xc = np.array([0, 127, 128, 0, 299, 255, 256])
    yc = np.array([0, 0, 0, 128, 299, 127, 129])
    cells = assign_cells(xc, yc, (300, 300), 128, 128)
    np.testing.assert_array_equal(cells, [0, 0, 1, 3, 8, 1, 5])
    # Rectangular cells and image.
    np.testing.assert_array_equal(
        assign_cells(np.array([99, 100]), np.array([49, 50]), (200, 250), 100, 50), [0, 4]
    )


def gaussian_stamps(fluxes, sigma, sky, size=41):
    c = size // 2
    yy, xx = np.mgrid[0:size, 0:size] - c
    g = np.exp(-0.5 * (xx**2 + yy**2) / sigma**2)
    g /= g.sum()
    return np.array([f * g + sky for f in fluxes])


def test_core_flux_snr_known_gaussian():
    """Aperture flux of a Gaussian star on a flat sky, and flux / sqrt(sum of variance)."""
    fluxes = np.array([1000.0, 5e4])
    stamps = gaussian_stamps(fluxes, 1.5, 200.0)
    variances = np.full_like(stamps, 4.0)
    flux, snr = core_flux_snr(stamps, variances, 8.0)
    np.testing.assert_allclose(flux, fluxes, rtol=1e-6)
    yy, xx = np.mgrid[0:41, 0:41] - 20
    n_ap = int((np.hypot(xx, yy) <= 8.0).sum())
    assert n_ap == 197
    np.testing.assert_allclose(snr, flux / np.sqrt(4.0 * n_ap), rtol=1e-12)


def test_core_flux_snr_partial_aperture():
    """A 1-sigma-radius aperture holds the pixels within it (about 39% of the flux)."""
    stamps = gaussian_stamps([1e4], 3.0, 0.0)
    flux, _ = core_flux_snr(stamps, np.ones_like(stamps), 3.0)
    c = 20
    yy, xx = np.mgrid[0:41, 0:41] - c
    expected = stamps[0][np.hypot(xx, yy) <= 3.0].sum()
    assert flux[0] == pytest.approx(expected)
    assert 0.3 < flux[0] / 1e4 < 0.5


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_aperture_flux_snr_in_place_equals_cut_stamps(dtype):
    """Gathering apertures from a plane gives exactly the numbers of cut float64 stamps."""
    rng = np.random.default_rng(7)
    image = rng.normal(100.0, 10.0, (90, 120)).astype(dtype)
    variance = rng.uniform(50.0, 150.0, (90, 120)).astype(dtype)
    xc, yc, half = np.array([13, 60, 106, 40]), np.array([13, 45, 76, 70]), 13
    boxes = [
        np.s_[y - half : y + half + 1, x - half : x + half + 1]
        for x, y in zip(xc, yc, strict=True)
    ]
    stamps = np.array([image[box] for box in boxes])
    variances = np.array([variance[box] for box in boxes])
    expected = core_flux_snr(stamps.astype(np.float64), variances.astype(np.float64), 5.0)
    # Contiguous planes, and views of a larger array (as the in-memory path gives).
    padded = np.zeros((100, 140, 2), dtype=dtype)
    padded[5:95, 10:130, 0] = image
    padded_var = np.ones_like(padded)
    padded_var[5:95, 10:130, 0] = variance
    views = padded[5:95, 10:130, 0], padded_var[5:95, 10:130, 0]
    assert not views[0].flags.c_contiguous
    # Region views with contiguous rows (as a cell task's block gives): flat indexing.
    big = np.full((110, 150), np.nan, dtype=dtype)
    big_var = np.full_like(big, np.nan)
    big[7:97, 20:140], big_var[7:97, 20:140] = image, variance
    regions = big[7:97, 20:140], big_var[7:97, 20:140]
    assert _flat_rows(regions[0])[1] == 150 and _flat_rows(views[0]) is None
    for planes in [(image, variance), views, regions]:
        got = aperture_flux_snr(*planes, xc, yc, half, 5.0)
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == np.float64
            np.testing.assert_array_equal(g, e)


# --- source positions ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def wcs_pair():
    return make_pair((64, 64), seed=5, n_stars=5, noise=False, wcs=True)


def test_source_positions_from_xy(wcs_pair):
    """x/y columns (any case) are used directly, as float pixels."""
    table = Table({"X": [1, 2], "Y": [3.5, 4.5], "flux": [1.0, 2.0]})
    x, y = source_positions(table, wcs_pair.science)
    np.testing.assert_array_equal(x, [1.0, 2.0])
    np.testing.assert_array_equal(y, [3.5, 4.5])
    assert x.dtype == np.float64


def test_source_positions_xy_preferred_over_radec(wcs_pair):
    """With both x/y and ra/dec columns, x/y win (no WCS conversion)."""
    table = Table({"x": [10.0], "y": [20.0], "ra": [0.0], "dec": [0.0]})
    x, y = source_positions(table, wcs_pair.science)
    assert (x[0], y[0]) == (10.0, 20.0)


def test_source_positions_from_radec(wcs_pair):
    """ra/dec are placed through the science WCS (0-based pixels)."""
    truth = wcs_pair.truth.sources
    wcs = wcs_pair.science.wcs
    ra, dec = wcs.pixel_to_world_values(np.asarray(truth["x"]), np.asarray(truth["y"]))
    table = Table({"RA": ra, "Dec": dec})
    x, y = source_positions(table, wcs_pair.science)
    np.testing.assert_allclose(x, truth["x"], atol=1e-6)
    np.testing.assert_allclose(y, truth["y"], atol=1e-6)


def test_source_positions_radec_without_wcs():
    """ra/dec without a science WCS raise InputError."""
    exp = Exposure(MaskedImage.from_image(np.zeros((8, 8)), variance=1.0))
    with pytest.raises(InputError, match="science exposure has no WCS"):
        source_positions(Table({"ra": [1.0], "dec": [2.0]}), exp)


def test_source_positions_missing_columns(wcs_pair):
    """A table with neither x/y nor ra/dec raises InputError listing its columns."""
    with pytest.raises(InputError, match=r"needs columns x, y or ra, dec; it has \['x', 'flux'\]"):
        source_positions(Table({"x": [1.0], "flux": [2.0]}), wcs_pair.science)


@pytest.mark.parametrize("width", [1, 2, 7, 8, 387, 388])
@pytest.mark.parametrize("storage", [np.float32, np.float64])
def test_row_medians_equal_numpy_median(width, storage):
    """The fast ring median is numpy's median, for float32-exact pixels and others."""
    from diffkernel.prep.selection import _row_medians

    rng = np.random.default_rng(width)
    values = rng.normal(1000.0, 30.0, size=(40, width)).astype(storage).astype(np.float64)
    values[3, 0] = values[3, -1]  # ties
    np.testing.assert_array_equal(_row_medians(values), np.median(values, axis=1))
    values[5, 0] = np.nan
    np.testing.assert_array_equal(_row_medians(values), np.median(values, axis=1))
