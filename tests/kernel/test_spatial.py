"""Tests of diffkernel.kernel.spatial: spatial functions and the global spatial fit."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.errors import ConfigError, SpatialFitError
from diffkernel.kernel.basis import alard_lupton_basis, delta_function_basis
from diffkernel.kernel.moments import CandidateStats
from diffkernel.kernel.spatial import (
    SpatialFunctions,
    background_local_map,
    fit_spatial,
    n_terms,
)

BBOX = (0.0, 0.0, 399.0, 299.0)  # nx = 400, ny = 300
STAMP_HALF = 6


@pytest.mark.parametrize("order, n", [(0, 1), (1, 3), (2, 6), (3, 10), (4, 15), (6, 28)])
def test_n_terms(order, n):
    """Order o has (o+1)(o+2)/2 terms."""
    assert n_terms(order) == n == (order + 1) * (order + 2) // 2
    assert SpatialFunctions("chebyshev1", order, BBOX).size == n


def test_spatial_functions_powers_and_values():
    """Terms are ordered by total degree; Chebyshev maps the bbox onto [-1, 1]."""
    f = SpatialFunctions("chebyshev1", 2, BBOX)
    assert f.powers() == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    v = f.evaluate(np.array([0.0, 399.0, 199.5]), np.array([0.0, 299.0, 149.5]))
    assert v.shape == (3, 6)
    # At the low corner xs = ys = -1: T0=1, T1=-1, T2=1.
    np.testing.assert_allclose(v[0], [1, -1, -1, 1, 1, 1])
    np.testing.assert_allclose(v[1], [1, 1, 1, 1, 1, 1])
    np.testing.assert_allclose(v[2], [1, 0, 0, -1, 0, -1], atol=1e-12)
    p = SpatialFunctions("polynomial", 2, BBOX).evaluate(3.0, 5.0)
    np.testing.assert_allclose(p, [1, 3, 5, 9, 15, 25])
    grid = f.evaluate(np.zeros((4, 5)), np.ones((4, 5)))
    assert grid.shape == (4, 5, 6)
    assert f.with_order(1).size == 3 and f.with_order(1).model_type == "chebyshev1"


def test_unknown_spatial_model_type_raises():
    """An unknown spatialModelType raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="spatialModelType must be .* got 'legendre'"):
        SpatialFunctions("legendre", 2, BBOX)
    with pytest.raises(ConfigError, match="spatial order must be >= 0, got -1"):
        SpatialFunctions("polynomial", -1, BBOX)


# --- synthetic statistics -----------------------------------------------------------------


def synthetic_stats(rng, x, y, a_true, bg_local=None):
    """Statistics whose exact per-candidate solutions are ``a_true`` (and ``bg_local``).

    ``M_c`` is a random SPD matrix and ``B_c = M_c a_c``, so a perfect spatial model
    has zero gradient: the global fit recovers it exactly.
    """
    n, nk = a_true.shape
    full = a_true if bg_local is None else np.concatenate([a_true, bg_local], axis=1)
    p = full.shape[1]
    g = rng.normal(size=(n, p, p))
    m = g @ np.swapaxes(g, 1, 2) + p * np.eye(p)
    b = np.einsum("nij,nj->ni", m, full)
    z = np.zeros(n)
    nbg = 0 if bg_local is None else bg_local.shape[1]
    return CandidateStats(m, b, m, b, z, b, z, np.full(n, 169.0), None, nbg, STAMP_HALF)


def positions(rng, n):
    return rng.uniform(10, 390, n), rng.uniform(10, 290, n)


@pytest.fixture
def al3():
    return alard_lupton_basis(7, (1.0,), (1,))  # 3 kernels, conserves the sum


@pytest.mark.parametrize("model_type", ["chebyshev1", "polynomial"])
def test_fit_spatial_recovers_known_model(al3, model_type):
    """Stats generated from a spatial model (sum held constant) return its coefficients."""
    rng = np.random.default_rng(30)
    x, y = positions(rng, 25)
    kf = SpatialFunctions(model_type, 2, BBOX)
    theta = rng.normal(size=(3, 6))
    if model_type == "polynomial":
        theta *= np.array([1, 1e-2, 1e-2, 1e-4, 1e-4, 1e-4])
    theta[0, 1:] = 0.0  # the kernel sum does not vary
    a_true = kf.evaluate(x, y) @ theta.T
    stats = synthetic_stats(rng, x, y, a_true)
    sol = fit_spatial(stats, x, y, al3, kf, None)
    np.testing.assert_allclose(sol.kernel_coeffs, theta, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(sol.coefficients_at(x, y), a_true, rtol=1e-8, atol=1e-10)
    assert sol.background_functions is None and sol.background_coeffs.shape == (0,)
    np.testing.assert_array_equal(sol.background_at(x, y), np.zeros(25))
    assert 1.0 <= sol.condition < 1e10


def test_conserved_sum_term_has_only_a_constant(al3):
    """With an AL basis kernel_coeffs[0, 1:] == 0 even when the data want a varying sum."""
    rng = np.random.default_rng(31)
    x, y = positions(rng, 20)
    kf = SpatialFunctions("chebyshev1", 2, BBOX)
    theta = rng.normal(size=(3, 6))  # row 0 varies: not representable
    stats = synthetic_stats(rng, x, y, kf.evaluate(x, y) @ theta.T)
    sol = fit_spatial(stats, x, y, al3, kf, None)
    assert sol.kernel_coeffs.shape == (3, 6)
    np.testing.assert_array_equal(sol.kernel_coeffs[0, 1:], 0.0)
    assert sol.kernel_coeffs[0, 0] != 0.0
    sums = sol.coefficients_at(x, y) @ al3.sums
    np.testing.assert_allclose(sums, sums[0], rtol=1e-12)


def test_non_conserving_basis_varies_every_term():
    """With a DF basis (no conserved sum) every term, the first too, varies in space."""
    basis = delta_function_basis(3)
    rng = np.random.default_rng(32)
    x, y = positions(rng, 30)
    kf = SpatialFunctions("chebyshev1", 1, BBOX)
    theta = rng.normal(size=(9, 3))
    stats = synthetic_stats(rng, x, y, kf.evaluate(x, y) @ theta.T)
    sol = fit_spatial(stats, x, y, basis, kf, None)
    np.testing.assert_allclose(sol.kernel_coeffs, theta, rtol=1e-8, atol=1e-10)
    assert np.all(sol.kernel_coeffs[0, 1:] != 0.0)


def test_chebyshev_and_polynomial_give_the_same_surface(al3):
    """Both families span the same functions: same fitted surface, different coefficients."""
    rng = np.random.default_rng(33)
    x, y = positions(rng, 30)
    # Noisy per-candidate solutions: no model fits exactly, so this is a real least squares.
    a = np.column_stack([np.full(30, 1.2), rng.normal(size=(30, 2))])
    stats = synthetic_stats(rng, x, y, a)
    sols = [
        fit_spatial(stats, x, y, al3, SpatialFunctions(t, 2, BBOX), None)
        for t in ("chebyshev1", "polynomial")
    ]
    gx, gy = np.meshgrid(np.linspace(0, 399, 7), np.linspace(0, 299, 5))
    np.testing.assert_allclose(
        sols[0].coefficients_at(gx, gy), sols[1].coefficients_at(gx, gy), rtol=1e-7, atol=1e-9
    )
    assert not np.allclose(sols[0].kernel_coeffs, sols[1].kernel_coeffs)


@pytest.mark.parametrize("model_type", ["chebyshev1", "polynomial"])
@pytest.mark.parametrize("bg_order, local_order", [(0, 0), (1, 1), (1, 2), (2, 2)])
def test_fit_spatial_recovers_background(al3, model_type, bg_order, local_order):
    """Kernel and differential background come back; local coefficients match the truth."""
    rng = np.random.default_rng(34)
    x, y = positions(rng, 25)
    kf = SpatialFunctions(model_type, 1, BBOX)
    bf = SpatialFunctions(model_type, bg_order, BBOX)
    # Pixel-unit monomials need small coefficients to give comparable variations.
    scale = np.array([1, 1e-2, 1e-2, 1e-4, 1e-4, 1e-4])
    if model_type == "chebyshev1":
        scale = np.ones(6)
    theta = rng.normal(size=(3, 3)) * scale[:3]
    theta[0, 1:] = 0.0
    bg_theta = 10.0 * rng.normal(size=bf.size) * scale[: bf.size]
    a_true = kf.evaluate(x, y) @ theta.T
    jac = background_local_map(bf, x, y, STAMP_HALF, local_order)
    assert jac.shape == (25, n_terms(local_order), bf.size)
    bg_local = jac @ bg_theta
    stats = synthetic_stats(rng, x, y, a_true, bg_local)
    sol = fit_spatial(stats, x, y, al3, kf, bf)
    np.testing.assert_allclose(sol.kernel_coeffs, theta, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sol.background_coeffs, bg_theta, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sol.background_at(x, y), bf.evaluate(x, y) @ bg_theta)
    local = sol.local_coefficients(x, y, STAMP_HALF, local_order)
    np.testing.assert_allclose(local, np.concatenate([a_true, bg_local], axis=1), atol=1e-7)


def test_background_local_map_constant_term_is_centre_value():
    """The first local term is the global background at the stamp centre (exact order)."""
    bf = SpatialFunctions("chebyshev1", 2, BBOX)
    theta = np.array([3.0, 1.0, -2.0, 0.5, 0.25, -0.75])
    x, y = np.array([50.0, 200.0]), np.array([40.0, 250.0])
    local = background_local_map(bf, x, y, STAMP_HALF, 2) @ theta
    np.testing.assert_allclose(local[:, 0], bf.evaluate(x, y) @ theta, rtol=1e-10)
    # The local polynomial reproduces the global one over the stamp.
    from diffkernel.kernel.moments import local_background_columns

    cols = local_background_columns(2 * STAMP_HALF + 1, 2)
    off = np.arange(-STAMP_HALF, STAMP_HALF + 1)
    dy, dx = np.meshgrid(off, off, indexing="ij")
    glob = bf.evaluate(x[0] + dx.ravel(), y[0] + dy.ravel()) @ theta
    np.testing.assert_allclose(local[0] @ cols, glob, rtol=1e-10)


def test_fit_spatial_argument_checks(al3):
    """Background functions must match the statistics; kernel sizes must agree."""
    rng = np.random.default_rng(35)
    x, y = positions(rng, 10)
    kf = SpatialFunctions("chebyshev1", 1, BBOX)
    stats = synthetic_stats(rng, x, y, rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="background functions must be given exactly"):
        fit_spatial(stats, x, y, al3, kf, SpatialFunctions("chebyshev1", 0, BBOX))
    with pytest.raises(ValueError, match="statistics have 3 kernel terms but the basis has 6"):
        fit_spatial(stats, x, y, alard_lupton_basis(7, (1.0,), (2,)), kf, None)


# --- too few candidates -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["EIGENVALUE", "SVD"])
def test_single_candidate_at_centre_raises(al3, kind):
    """One candidate cannot constrain an order-2 model: SpatialFitError.

    At the bbox centre T1(x) = T1(y) = 0, so the matrix has exact zero rows and the
    check does not depend on the sign of a rounding-level eigenvalue (see the xfails).
    """
    rng = np.random.default_rng(36)
    x, y = np.array([199.5]), np.array([149.5])
    stats = synthetic_stats(rng, x, y, rng.normal(size=(1, 3)))
    kf = SpatialFunctions("chebyshev1", 2, BBOX)
    with pytest.raises(SpatialFitError, match=r"1 candidate\(s\) cannot constrain 13 parameters"):
        fit_spatial(stats, x, y, al3, kf, None, kind)


def test_too_few_candidates_raise_svd(al3):
    """With conditionNumberType SVD, too few candidates should raise SpatialFitError too."""
    rng = np.random.default_rng(38)
    x, y = positions(rng, 3)
    stats = synthetic_stats(rng, x, y, rng.normal(size=(3, 3)))
    kf = SpatialFunctions("chebyshev1", 2, BBOX)
    with pytest.raises(SpatialFitError):
        fit_spatial(stats, x, y, al3, kf, None, "SVD")


def test_too_few_candidates_always_raise_eigenvalue(al3):
    """Every draw of 1-5 candidates for a 6-term model should raise SpatialFitError."""
    kf = SpatialFunctions("chebyshev1", 2, BBOX)
    silent = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(1, 6))
        x, y = positions(rng, n)
        stats = synthetic_stats(rng, x, y, rng.normal(size=(n, 3)))
        try:
            fit_spatial(stats, x, y, al3, kf, None, "EIGENVALUE")
            silent += 1
        except SpatialFitError:
            pass
    assert silent == 0


@pytest.mark.parametrize("model", ["chebyshev1", "polynomial"])
def test_grid_factors_match_evaluate(model):
    """fy_l ⊗ fx_l equals term l of evaluate() on a grid, and grid_sum is Σ c_l f_l."""
    functions = SpatialFunctions(model, 3, (0.0, 0.0, 99.0, 79.0))
    xs = np.arange(10, 30, 3.0)
    ys = np.arange(5, 20, 2.0)
    fx, fy = functions.factors(xs, ys)
    xx, yy = np.meshgrid(xs, ys)
    full = functions.evaluate(xx, yy)
    np.testing.assert_allclose(np.einsum("ly,lx->yxl", fy, fx), full, rtol=1e-13)
    c = np.random.default_rng(3).normal(size=functions.size)
    np.testing.assert_allclose(functions.grid_sum(c, xs, ys), full @ c, rtol=1e-12, atol=1e-12)


# --- covariance of the spatial fit (calculateKernelUncertainty) -----------------------


def _noisy_star_stats(rng, basis, x, y, kf, coeffs, constant_weighting):
    """Statistics of Gaussian stars convolved with a spatial kernel (spatial coefficients
    ``coeffs`` over ``kf``), with a constant background of 3 and Poisson-like noise."""
    from diffkernel.kernel.candidate import convolve_basis
    from diffkernel.kernel.moments import compute_stats

    stamp, k = 15, basis.kernel_size
    side = stamp + k - 1
    yy, xx = np.mgrid[0:side, 0:side] - side // 2
    template = 4e3 * np.exp(-0.5 * (xx**2 + yy**2) / 1.2**2)[None] * np.ones((len(x), 1, 1))
    conv = convolve_basis(basis, template)
    local = kf.evaluate(x, y) @ coeffs.T  # (N, n_basis)
    model = np.einsum("nj,njyx->nyx", local, conv) + 3.0
    variance = 20.0 + np.abs(model)  # sky plus the star: not constant over a stamp
    science = model + rng.normal(size=model.shape) * np.sqrt(variance)
    return compute_stats(
        conv,
        science,
        variance,
        background_order=0,
        constant_variance_weighting=constant_weighting,
        with_uncertainty=True,
    )


@pytest.mark.parametrize("constant_weighting", [False, True])
def test_spatial_covariance_matches_the_scatter_of_noisy_fits(al3, constant_weighting):
    """The kernel-sum and background errors at the centre from the covariance equal the
    scatter of the fits over noise realisations (the sandwich form with constant
    variance weighting, whose weights are not the inverse variances)."""
    rng = np.random.default_rng(5)
    x, y = positions(rng, 14)
    kf = SpatialFunctions("chebyshev1", 1, BBOX)
    bf = SpatialFunctions("chebyshev1", 0, BBOX)
    coeffs = np.array([[1.2, 0.0, 0.0], [0.05, 0.02, -0.01], [0.03, -0.02, 0.01]])
    centre = (199.5, 149.5)
    sums, bgs, variances = [], [], []
    for _ in range(300):
        stats = _noisy_star_stats(rng, al3, x, y, kf, coeffs, constant_weighting)
        sol = fit_spatial(stats, x, y, al3, kf, bf, with_covariance=True)
        sums.append(sol.coefficients_at(*centre) @ al3.sums)
        bgs.append(sol.background_at(*centre))
        variances.append((sol.kernel_sum_variance(*centre), sol.covariance[-1, -1]))
    n_free = 1 + 2 * 3  # the kernel sum's constant, then two kernels of three terms each
    assert sol.covariance.shape == (n_free + 1, n_free + 1)
    assert np.all(np.linalg.eigvalsh(sol.covariance) > 0)
    predicted = np.sqrt(np.mean(variances, axis=0))
    observed = np.array([np.std(sums), np.std(bgs)])
    np.testing.assert_allclose(observed, predicted, rtol=0.15)


def test_spatial_covariance_only_when_asked(al3):
    """Without with_covariance the solution has none, and its kernel-sum variance says so."""
    rng = np.random.default_rng(6)
    x, y = positions(rng, 10)
    kf = SpatialFunctions("chebyshev1", 1, BBOX)
    coeffs = np.array([[1.0, 0.0, 0.0], [0.05, 0.02, -0.01], [0.03, -0.02, 0.01]])
    stats = _noisy_star_stats(rng, al3, x, y, kf, coeffs, True)
    sol = fit_spatial(stats, x, y, al3, kf, SpatialFunctions("chebyshev1", 0, BBOX))
    assert sol.covariance is None
    with pytest.raises(ValueError, match="calculateKernelUncertainty"):
        sol.kernel_sum_variance(0.0, 0.0)
