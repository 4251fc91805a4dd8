"""Residual statistics of a delta-function basis from the pixels (ResidualPixels).

They must equal, to rounding, those of the normal matrix of the statistics' weights
that they replace (``CandidateStats.m``, ``b``, ``sws``, ``u``, ``su``), for any
coefficients, in a derived basis, on the core or the whole stamp, and after a subset
or stacking of batches.
"""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.kernel.candidate import ShiftedTemplates
from diffkernel.kernel.moments import CandidateStats, compute_stats, core_selector, fit_moments

K = 5
S = 11
H = S + K - 1
N = 4


def _batch(seed: int):
    rng = np.random.default_rng(seed)
    template = rng.normal(100.0, 10.0, size=(N, H, H))
    science = rng.normal(100.0, 10.0, size=(N, S, S))
    variance = rng.uniform(50.0, 150.0, size=(N, S, S))
    return template, science, variance


def _both(seed: int, background_order, selector):
    template, science, variance = _batch(seed)
    conv = ShiftedTemplates(template, K)
    kwargs = dict(background_order=background_order, constant_variance_weighting=False)
    fit = fit_moments(conv, science, variance * 1.3, **kwargs)
    matrix = compute_stats(conv, science, variance, stats_selector=selector, fit=fit, **kwargs)
    pixels = compute_stats(
        conv,
        science,
        variance,
        stats_selector=selector,
        fit=fit,
        residual_template=template,
        **kwargs,
    )
    return matrix, pixels


def _assert_same(a: CandidateStats, b: CandidateStats, coeffs, kernels=None):
    expected, got = a.residual_moments(coeffs, kernels), b.residual_moments(coeffs, kernels)
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("background_order", [None, 0, 2])
@pytest.mark.parametrize("core", [False, True])
def test_pixel_residuals_equal_matrix_residuals(background_order, core):
    selector = core_selector(S, 3) if core else None
    matrix, pixels = _both(1, background_order, selector)
    assert pixels.m is None and pixels.pixels is not None
    assert len(pixels) == N and pixels.n_params == matrix.n_params
    np.testing.assert_array_equal(pixels.npix, matrix.npix)
    rng = np.random.default_rng(2)
    coeffs = rng.normal(0.0, 0.2, size=(N, matrix.n_params))
    _assert_same(matrix, pixels, coeffs)
    kernels = rng.normal(0.0, 0.1, size=(N, K, K))
    ratio = rng.uniform(0.5, 1.5, size=N)
    var_template = rng.uniform(0.0, 0.5, size=(N, K, K))
    for st in (matrix, pixels):
        st.var_science, st.var_template = ratio, var_template
    _assert_same(matrix, pixels, coeffs, kernels)


def test_pixel_residuals_of_the_fit_itself():
    """Residuals near the noise: the matrix formula cancels most of ``sᵀWs``."""
    matrix, pixels = _both(3, 1, None)
    coeffs = np.linalg.solve(matrix.m_fit, matrix.b_fit[..., None])[..., 0]
    mean_m, std_m, _ = matrix.residual_moments(coeffs)
    mean_p, std_p, _ = pixels.residual_moments(coeffs)
    np.testing.assert_allclose(std_p, std_m, rtol=1e-7)
    np.testing.assert_allclose(mean_p, mean_m, rtol=1e-6, atol=1e-9)


def test_pixel_residuals_in_a_derived_basis_and_subsets():
    matrix, pixels = _both(4, 1, core_selector(S, 4))
    rng = np.random.default_rng(5)
    t1 = rng.normal(size=(K * K, 6))
    t2 = rng.normal(size=(6, 3))
    m2, p2 = matrix.transformed(t1).transformed(t2), pixels.transformed(t1).transformed(t2)
    assert p2.n_kernel == 3 and p2.n_params == m2.n_params
    coeffs = rng.normal(0.0, 0.2, size=(N, m2.n_params))
    _assert_same(m2, p2, coeffs)
    index = np.array([2, 0])
    _assert_same(m2.take(index), p2.take(index), coeffs[index])
    stacked = CandidateStats.concatenate([p2.take(np.array([3])), p2.take(slice(0, 3))])
    np.testing.assert_array_equal(stacked.pixels.template[0], pixels.pixels.template[3])
    order = np.array([3, 0, 1, 2])
    _assert_same(m2.take(order), stacked, coeffs[order])
