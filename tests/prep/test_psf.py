"""Tests of diffkernel.prep.psf: PSF widths from models and from star stamps."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.image import Exposure, MaskedImage
from diffkernel.kernel.basis import SIGMA_TO_FWHM
from diffkernel.prep.psf import exposure_fwhm, measure_fwhm


def gaussian_stamps(sigmas, size=31, sky=100.0, peak=1000.0):
    c = size // 2
    yy, xx = np.mgrid[0:size, 0:size] - c
    return np.array([peak * np.exp(-0.5 * (xx**2 + yy**2) / s**2) + sky for s in sigmas])


def test_measure_fwhm_gaussians_within_two_percent():
    """Adaptive moments give the FWHM of Gaussian stars to 2% on a flat sky."""
    sigmas = np.array([1.0, 1.3, 2.0, 3.0, 4.0])
    fwhm = measure_fwhm(gaussian_stamps(sigmas))
    assert fwhm.shape == (5,)
    np.testing.assert_allclose(fwhm, sigmas * SIGMA_TO_FWHM, rtol=0.02)


def test_measure_fwhm_noisy_gaussian():
    """A bright star with noise is still measured to 2%."""
    rng = np.random.default_rng(60)
    stamps = gaussian_stamps([1.7, 2.4], peak=5e4) + rng.normal(0.0, 10.0, size=(2, 31, 31))
    np.testing.assert_allclose(
        measure_fwhm(stamps), np.array([1.7, 2.4]) * SIGMA_TO_FWHM, rtol=0.02
    )


def test_measure_fwhm_no_star_is_nan():
    """A flat stamp has no measurable width (NaN); its batch neighbour is unaffected."""
    stamps = np.stack([np.full((31, 31), 5.0), gaussian_stamps([1.5])[0]])
    fwhm = measure_fwhm(stamps)
    assert np.isnan(fwhm[0])
    assert fwhm[1] == pytest.approx(1.5 * SIGMA_TO_FWHM, rel=0.02)


def exposure(psf_fwhm, shape=(101, 201)):
    return Exposure(MaskedImage.from_image(np.zeros(shape), variance=1.0), psf_fwhm=psf_fwhm)


def test_exposure_fwhm_constant_and_missing():
    """A constant PSF width is returned as is; no PSF gives None."""
    assert exposure_fwhm(exposure(3.25), 10, 0.05) == 3.25
    assert isinstance(exposure_fwhm(exposure(3), 10, 0.05), float)
    assert exposure_fwhm(exposure(None), 10, 0.05) is None


def test_exposure_fwhm_callable_grid_mean_with_buffer():
    """A PSF model is averaged over a grid x grid lattice inset by buffer on every side."""

    def model(x, y):
        return 2.0 + 1e-4 * x**2 + 1e-3 * y

    ny, nx = 101, 201
    grid, buffer = 5, 0.1
    xs = np.linspace(0.1 * 200, 0.9 * 200, grid)  # 20, 60, 100, 140, 180
    ys = np.linspace(0.1 * 100, 0.9 * 100, grid)  # 10, 30, 50, 70, 90
    expected = np.mean([model(x, y) for y in ys for x in xs])
    got = exposure_fwhm(exposure(model, (ny, nx)), grid, buffer)
    assert got == pytest.approx(expected, rel=1e-12)
    assert got == pytest.approx(2.0 + 1e-4 * np.mean(xs**2) + 1e-3 * 50.0)
    # Without the buffer the corners count, and the mean of x^2 is larger.
    assert exposure_fwhm(exposure(model, (ny, nx)), grid, 0.0) > got


def test_exposure_fwhm_points_visited():
    """The model is called exactly grid^2 times, at points inside the buffered box."""
    calls = []

    def model(x, y):
        calls.append((x, y))
        return 3.0

    assert exposure_fwhm(exposure(model), 4, 0.25) == 3.0
    pts = np.array(calls)
    assert len(pts) == 16
    assert pts[:, 0].min() == pytest.approx(50.0) and pts[:, 0].max() == pytest.approx(150.0)
    assert pts[:, 1].min() == pytest.approx(25.0) and pts[:, 1].max() == pytest.approx(75.0)
