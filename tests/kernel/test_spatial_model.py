"""Tests of diffkernel.kernel.spatial_model: the basis choice (BIC) of the spatial step."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.config import PsfMatchConfigAL
from diffkernel.kernel.basis import alard_lupton_basis
from diffkernel.kernel.candidate import convolve_basis
from diffkernel.kernel.moments import compute_stats
from diffkernel.kernel.spatial_model import bic_truncation

STAMP = 21
KERNEL = 11


def star_stats(rng, basis, coeffs, n=12, noise=1.0):
    """Statistics of ``n`` noise-free Gaussian stars (random fluxes and sub-pixel
    centres) convolved with the kernel ``coeffs`` of ``basis``, plus white noise."""
    side = STAMP + KERNEL - 1
    yy, xx = np.mgrid[0:side, 0:side] - side // 2
    dx, dy = rng.uniform(-0.5, 0.5, (2, n))
    flux = rng.uniform(2e3, 2e4, n)
    template = flux[:, None, None] * np.exp(
        -0.5 * ((xx - dx[:, None, None]) ** 2 + (yy - dy[:, None, None]) ** 2) / 1.5**2
    )
    conv = convolve_basis(basis, template)
    science = np.einsum("j,njyx->nyx", coeffs, conv) + rng.normal(0, noise, (n, STAMP, STAMP))
    variance = np.full_like(science, noise**2)
    return compute_stats(
        conv, science, variance, background_order=None, constant_variance_weighting=False
    )


@pytest.fixture
def basis():
    # Groups of 6 (sigma 1, degree 2) and 1 (sigma 2.5, degree 0) kernels.
    b = alard_lupton_basis(KERNEL, (1.0, 2.5), (2, 0))
    assert b.groups == (6, 1)
    return b


def test_bic_drops_kernels_that_only_fit_noise(basis):
    """A kernel in the span of the first group: the second group only fits noise
    (chi² lower by ~1 per candidate, less than ln(npix) ~ 6), so the BIC keeps 6."""
    rng = np.random.default_rng(1)
    coeffs = np.zeros(basis.size)
    coeffs[0], coeffs[3] = 1.3, 0.2
    stats = star_stats(rng, basis, coeffs)
    assert bic_truncation(stats, basis, PsfMatchConfigAL()) == 6


def test_bic_keeps_kernels_the_data_need(basis):
    """A kernel with a clear part along the last kernel keeps the whole basis."""
    rng = np.random.default_rng(2)
    coeffs = np.zeros(basis.size)
    coeffs[0], coeffs[6] = 1.3, 0.3
    stats = star_stats(rng, basis, coeffs)
    assert bic_truncation(stats, basis, PsfMatchConfigAL()) == basis.size
