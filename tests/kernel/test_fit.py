"""Tests of diffkernel.kernel.fit: single-kernel solves, conditioning and
regularization strength."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from scipy.signal import convolve2d

from diffkernel.config import PsfMatchConfigAL, PsfMatchConfigDF
from diffkernel.kernel import fit as fit_module
from diffkernel.kernel.basis import alard_lupton_basis, delta_function_basis, regularization_matrix
from diffkernel.kernel.candidate import convolve_stamps
from diffkernel.kernel.fit import (
    condition_numbers,
    fit_single_kernels,
    inverse_quadratic_forms,
    lambda_grid,
    risk_scan,
    solve_spd,
)
from diffkernel.kernel.moments import compute_stats

K = 11
S = 21
H = S + K - 1


def star_stamp(sigma, flux=5000.0, sky=0.0, shape=H, dx=0.0, dy=0.0):
    """A noise-free sampled Gaussian star centred on the stamp (plus a flat sky)."""
    yy, xx = np.mgrid[0:shape, 0:shape] - shape // 2
    g = np.exp(-0.5 * ((xx - dx) ** 2 + (yy - dy) ** 2) / sigma**2)
    return flux * g / g.sum() + sky


def basis_stats(basis, template, science, variance, order):
    native = convolve_stamps(basis, template)
    conv = np.einsum("nrys,rj->njys", native, basis.transform)
    return compute_stats(
        conv, science, variance, background_order=order, constant_variance_weighting=True
    )


def self_match(basis, sigma, transform):
    """Fit of a template star to ``transform(template)`` (AL basis, order-0 background)."""
    t = star_stamp(sigma)[None]
    h = K // 2
    science = transform(t[:, h : h + S, h : h + S])
    stats = basis_stats(basis, t, science, np.full((1, S, S), 10.0), 0)
    fit = fit_single_kernels(stats, PsfMatchConfigAL())
    ksum = fit.coeffs[0, : basis.size] @ basis.sums
    return ksum, fit.coeffs[0, -1], fit


@pytest.fixture(scope="module")
def sharp_al():
    """An AL basis whose narrowest Gaussian (0.4 px) spans a delta function.

    (0.4 px with degree 4, not 0.3 px: on 11 pixels a 0.3 px Gaussian has independent
    powers up to degree 2 only, and a higher degree is refused.)
    """
    return alard_lupton_basis(K, (0.4, 1.5, 3.0), (4, 2, 2))


@pytest.mark.parametrize("sigma", [1.5, 2.5])
def test_self_scaled_recovers_kernel_sum(sharp_al, sigma):
    """A candidate matched to itself times 2.7 recovers kernel sum 2.7 and no background."""
    ksum, bg, fit = self_match(sharp_al, sigma, lambda t: 2.7 * t)
    assert ksum == pytest.approx(2.7, abs=1e-5)
    assert bg == pytest.approx(0.0, abs=1e-5)
    assert fit.lam[0] == 0.0 and fit.covariance is None
    assert np.isfinite(fit.condition[0])


@pytest.mark.parametrize("sigma", [1.5, 2.5])
def test_self_offset_recovers_background(sharp_al, sigma):
    """A candidate matched to itself plus 11.3 recovers background 11.3 and kernel sum 1."""
    ksum, bg, _ = self_match(sharp_al, sigma, lambda t: t + 11.3)
    assert bg == pytest.approx(11.3, abs=1e-5)
    assert ksum == pytest.approx(1.0, abs=1e-5)


def test_self_match_default_basis_four_decimals():
    """With ip_diffim's default AL basis the scale and offset come back to 4 decimals."""
    basis = alard_lupton_basis(K, (0.7, 1.5, 3.0), (4, 2, 2))
    ksum, _, _ = self_match(basis, 2.5, lambda t: 2.7 * t)
    np.testing.assert_almost_equal(ksum, 2.7, decimal=4)
    ksum, bg, _ = self_match(basis, 2.5, lambda t: t + 11.3)
    np.testing.assert_almost_equal(bg, 11.3, decimal=4)
    np.testing.assert_almost_equal(ksum, 1.0, decimal=4)


def test_known_kernel_in_span_is_recovered_exactly():
    """Science = template convolved with a kernel of the basis span: the coefficients return."""
    basis = alard_lupton_basis(K, (0.8, 2.0), (2, 2))
    truth = np.zeros(basis.size)
    truth[[0, 2, 4, 9]] = [1.7, 0.05, -0.03, 0.02]
    kernel = basis.kernel_image(truth)
    rng = np.random.default_rng(20)
    t = np.stack([star_stamp(2.0, 1e4, 100.0, dx=rng.uniform(-1, 1)) for _ in range(3)])
    t += rng.normal(0.0, 1.0, size=t.shape)  # structure everywhere, still noise-free model
    science = np.stack([convolve2d(x, kernel, mode="valid") for x in t]) + 3.0
    stats = basis_stats(basis, t, science, np.full(science.shape, 5.0), 0)
    fit = fit_single_kernels(stats, PsfMatchConfigAL())
    np.testing.assert_allclose(fit.coeffs[:, :-1], np.tile(truth, (3, 1)), atol=1e-8)
    np.testing.assert_allclose(fit.coeffs[:, -1], 3.0, atol=1e-6)
    np.testing.assert_allclose(fit.coeffs[:, : basis.size] @ basis.sums, 1.7, atol=1e-7)


def test_uncertainty_is_inverse_normal_matrix_for_pixel_weights():
    """With per-pixel weights the coefficient covariance is M^-1."""
    rng = np.random.default_rng(21)
    basis = alard_lupton_basis(7, (1.0,), (1,))
    t = rng.normal(100.0, 10.0, size=(2, 15, 15))
    native = convolve_stamps(basis, t)
    conv = np.einsum("nrys,rj->njys", native, basis.transform)
    var = rng.uniform(1.0, 2.0, size=(2, 9, 9))
    stats = compute_stats(
        conv,
        conv[:, 0],
        var,
        background_order=None,
        constant_variance_weighting=False,
        with_uncertainty=True,
    )
    fit = fit_single_kernels(stats, PsfMatchConfigAL(), with_uncertainty=True)
    np.testing.assert_allclose(fit.covariance, np.linalg.inv(stats.m_fit), rtol=1e-7)
    np.testing.assert_allclose(fit.coeffs, np.tile(np.eye(3)[0], (2, 1)), atol=1e-9)


# --- conditioning and solving -----------------------------------------------------------


def random_spd(rng, n, cond):
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T


def test_condition_numbers_eigenvalue_and_svd_agree_for_spd():
    """For SPD matrices both kinds give the same (equilibrated) condition number."""
    rng = np.random.default_rng(22)
    m = np.stack([random_spd(rng, 6, c) for c in (1e1, 1e3, 1e6)])
    ev = condition_numbers(m, "EIGENVALUE")
    sv = condition_numbers(m, "SVD")
    assert ev.shape == (3,)
    np.testing.assert_allclose(ev, sv, rtol=1e-8)
    assert ev[0] < ev[1] < ev[2]


def test_condition_numbers_known_values():
    """Equilibration removes scale: diag(1, 1e6) -> 1; [[1, .9], [.9, 1]] -> 19."""
    assert condition_numbers(np.diag([1.0, 1e6])) == pytest.approx(1.0)
    m = np.array([[1.0, 0.9], [0.9, 1.0]])
    assert condition_numbers(m) == pytest.approx(19.0)
    s = np.diag([10.0, 0.01])
    assert condition_numbers(s @ m @ s, "SVD") == pytest.approx(19.0)


@pytest.mark.parametrize("kind", ["EIGENVALUE", "SVD"])
def test_condition_numbers_singular_is_inf(kind):
    """An exactly singular matrix (a zero row) has an infinite condition number."""
    m = np.stack([np.eye(3), np.diag([1.0, 2.0, 0.0])])
    out = condition_numbers(m, kind)
    assert out[0] == pytest.approx(1.0)
    assert out[1] == np.inf


def test_condition_numbers_indefinite_eigenvalue_is_inf():
    """EIGENVALUE flags an indefinite matrix as inf."""
    assert condition_numbers(np.array([[1.0, 2.0], [2.0, 1.0]])) == np.inf


def test_condition_numbers_rank_deficient_svd_is_inf():
    """A rank-3 5x5 Gram matrix is singular and should report inf with SVD too."""
    r = np.random.default_rng(0).normal(size=(5, 3))
    assert condition_numbers(r @ r.T, "SVD") == np.inf


def test_condition_numbers_unknown_kind():
    """An unknown conditionNumberType raises ValueError."""
    with pytest.raises(ValueError, match="conditionNumberType must be"):
        condition_numbers(np.eye(2), "QR")


def test_solve_spd_batch_with_singular_member():
    """A singular system gets its min-norm solution; the others are solved exactly."""
    m = np.stack(
        [
            np.array([[4.0, 1.0], [1.0, 3.0]]),
            np.array([[1.0, 0.0], [0.0, 0.0]]),
            np.array([[2.0, 0.0], [0.0, 5.0]]),
        ]
    )
    b = np.array([[1.0, 2.0], [3.0, 0.0], [4.0, 5.0]])
    x = solve_spd(m, b)
    np.testing.assert_allclose(x[0], np.linalg.solve(m[0], b[0]))
    np.testing.assert_allclose(x[1], [3.0, 0.0])
    np.testing.assert_allclose(x[2], [2.0, 1.0])


def test_solve_spd_badly_scaled():
    """Equilibration lets wildly scaled systems solve accurately."""
    rng = np.random.default_rng(23)
    a = random_spd(rng, 5, 10.0)
    d = np.diag([1e-6, 1.0, 1e3, 1e6, 1.0])
    m = d @ a @ d
    y = rng.normal(size=5)
    x_true = np.linalg.solve(d, y)
    b = d @ (a @ y)  # = m @ x_true without the cancellation of the tiny scales
    np.testing.assert_allclose(solve_spd(m[None], b[None])[0], x_true, rtol=1e-9)


# --- lambda -------------------------------------------------------------------------------


def test_lambda_grid():
    """log: 10**k for k in [min, max] by step (ends included); linear: k itself."""
    g = lambda_grid(-1.0, 2.0, 0.1, "log")
    assert len(g) == 31
    assert g[0] == pytest.approx(0.1) and g[-1] == pytest.approx(100.0)
    np.testing.assert_allclose(np.diff(np.log10(g)), 0.1)
    np.testing.assert_allclose(lambda_grid(0.5, 2.0, 0.5, "linear"), [0.5, 1.0, 1.5, 2.0])
    with pytest.raises(ValueError, match="lambdaMin >= 0"):
        lambda_grid(-1.0, 2.0, 0.5, "linear")
    with pytest.raises(ValueError, match="lambdaStepType must be"):
        lambda_grid(0.0, 1.0, 0.5, "cubic")


KD = 5
SD = 15


@pytest.fixture(scope="module")
def df_stats():
    """Noisy DF statistics of four stars blurred by a Gaussian kernel."""
    hd = SD + KD - 1
    rng = np.random.default_rng(24)
    yy, xx = np.mgrid[0:hd, 0:hd] - hd // 2
    t = np.stack(
        [
            100.0
            + 2000.0
            * np.exp(
                -0.5 * ((xx - rng.uniform(-2, 2)) ** 2 + (yy - rng.uniform(-2, 2)) ** 2) / 2.25
            )
            for _ in range(4)
        ]
    )
    u = np.arange(KD) - KD // 2
    kern = np.exp(-0.5 * (u[:, None] ** 2 + u[None, :] ** 2))
    kern /= kern.sum()
    sci = np.stack([convolve2d(x, kern, mode="valid") for x in t])
    var = sci + 10.0
    sci = sci + rng.normal(size=sci.shape) * np.sqrt(var)
    conv = convolve_stamps(delta_function_basis(KD), t)
    stats = compute_stats(conv, sci, var, background_order=None, constant_variance_weighting=False)
    h = regularization_matrix(KD, "centralDifference", 9, (1, 2), 3.0)
    return stats, h


def test_lambda_absolute(df_stats):
    """absolute: lambda = lambdaValue for every candidate."""
    stats, h = df_stats
    fit = fit_single_kernels(stats, PsfMatchConfigDF(lambdaType="absolute", lambdaValue=0.7), h)
    np.testing.assert_array_equal(fit.lam, 0.7)
    direct = np.linalg.solve(stats.m_fit + 0.7 * h, stats.b_fit[..., None])[..., 0]
    np.testing.assert_allclose(fit.coeffs, direct, rtol=1e-8)


def test_lambda_relative(df_stats):
    """relative: lambda = lambdaScaling * tr(M) / tr(H), per candidate."""
    stats, h = df_stats
    cfg = PsfMatchConfigDF(lambdaType="relative", lambdaScaling=1e-3)
    fit = fit_single_kernels(stats, cfg, h)
    expected = 1e-3 * np.trace(stats.m_fit, axis1=1, axis2=2) / np.trace(h)
    np.testing.assert_allclose(fit.lam, expected)


def test_relative_lambda_reads_lambda_scaling_as_documented(df_stats):
    """relative scales tr(M)/tr(H) by lambdaScaling, never lambdaValue, and the docs say so."""
    stats, h = df_stats

    def lam(**fields):
        return fit_single_kernels(stats, PsfMatchConfigDF(lambdaType="relative", **fields), h).lam

    base = lam(lambdaScaling=1e-3, lambdaValue=0.2)
    np.testing.assert_array_equal(lam(lambdaScaling=1e-3, lambdaValue=50.0), base)
    np.testing.assert_allclose(lam(lambdaScaling=2e-3, lambdaValue=0.2), 2 * base, rtol=1e-14)
    relative = PsfMatchConfigDF.lambdaType.choices["relative"]
    assert "lambdaScaling" in relative and "lambdaValue" not in relative
    assert "relative" in PsfMatchConfigDF.lambdaScaling.doc
    assert "absolute" in PsfMatchConfigDF.lambdaValue.doc


def risks_by_definition(m, b, h, grid, kind, max_condition):
    """The risks of every lambda from an explicit inverse of M + lambda H (the definition)."""
    ev, evec = np.linalg.eigh(m)
    keep = ev > ev[:, -1:] / max_condition
    inv_ev = np.where(keep, 1.0 / np.where(keep, ev, 1.0), 0.0)
    a_ref = np.einsum("nij,nj,nkj,nk->ni", evec, inv_ev, evec, b)
    out = []
    for lam in grid:
        s_mat = np.linalg.inv(m + lam * h)
        r_mat = s_mat @ m
        a = np.einsum("nij,nj->ni", s_mat, b)
        if kind == "minimizeUnbiasedRisk":
            chi2 = np.einsum("ni,nij,nj->n", a, m, a) - 2 * np.einsum("ni,ni->n", a, b)
            out.append(chi2 + 2 * np.trace(r_mat, axis1=1, axis2=2))
        else:
            bias = np.einsum("nij,nj->ni", r_mat, a_ref) - a_ref
            out.append(
                np.einsum("ni,nij,nj->n", bias, m, bias) + np.einsum("nij,nji->n", r_mat, r_mat)
            )
    return np.array(out)


@pytest.fixture(scope="module")
def df_stats_with_background(df_stats):
    """df_stats with a background term that the penalty (padded with zeros) leaves free."""
    stats, h = df_stats
    n, nk = stats.b_fit.shape
    rng = np.random.default_rng(26)
    m = np.zeros((n, nk + 1, nk + 1))
    m[:, :nk, :nk] = stats.m_fit
    m[:, nk, nk] = 400.0
    m[:, :nk, nk] = m[:, nk, :nk] = rng.normal(size=(n, nk)) * 0.1 * np.sqrt(400.0)
    b = np.concatenate([stats.b_fit, np.full((n, 1), 100.0)], axis=1)
    hp = np.zeros((nk + 1, nk + 1))
    hp[:nk, :nk] = h
    return m, b, hp


@pytest.mark.parametrize("kind", ["minimizeBiasedRisk", "minimizeUnbiasedRisk"])
@pytest.mark.parametrize(
    "grid",
    [
        10.0 ** np.arange(-1.0, 2.05, 0.1),
        np.arange(0.5, 20.01, 0.5),
        np.arange(0.0, 3.01, 0.25),  # lambda = 0 included: M alone must be inverted
    ],
    ids=["log", "linear", "linear-from-0"],
)
@pytest.mark.parametrize("background", [False, True])
def test_risk_scan_matches_definition(
    df_stats, df_stats_with_background, kind, grid, background
):
    """One eigendecomposition per candidate gives every lambda's risk as the inverse does."""
    stats, h = df_stats
    m, b = stats.m_fit, stats.b_fit
    if background:
        m, b, h = df_stats_with_background
    got = risk_scan(m, b, h, grid, kind, 5.0e6)
    want = risks_by_definition(m, b, h, grid, kind, 5.0e6)
    assert got.shape == (len(grid), len(m))
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * np.abs(want).max())
    np.testing.assert_array_equal(np.argmin(got, axis=0), np.argmin(want, axis=0))


@pytest.mark.parametrize("kind", ["minimizeBiasedRisk", "minimizeUnbiasedRisk"])
def test_risk_scan_of_a_matrix_without_cholesky_factor(df_stats_with_background, kind):
    """A candidate whose M + lambda H is not numerically definite is scanned by inversion."""
    m, b, h = df_stats_with_background
    m = m.copy()
    m[1, -1, -1] = -1e-3  # indefinite through the unpenalized background term
    grid = 10.0 ** np.arange(-1.0, 2.05, 0.5)
    got = risk_scan(m, b, h, grid, kind, 5.0e6)
    np.testing.assert_allclose(got, risks_by_definition(m, b, h, grid, kind, 5.0e6), rtol=1e-9)


@pytest.mark.parametrize("kind", ["minimizeBiasedRisk", "minimizeUnbiasedRisk"])
def test_risk_scan_in_blocks_equals_one_block(df_stats_with_background, kind, monkeypatch):
    """Scanning the candidates in blocks (bounded memory) changes no risk."""
    m, b, h = df_stats_with_background
    grid = 10.0 ** np.arange(-1.0, 2.05, 0.5)
    whole = risk_scan(m, b, h, grid, kind, 5.0e6)
    monkeypatch.setattr(fit_module, "_BLOCK_BYTES", 8 * m.shape[-1] ** 2 * 3)  # 3 per block
    np.testing.assert_array_equal(risk_scan(m, b, h, grid, kind, 5.0e6), whole)


def test_risk_scan_unknown_kind():
    """Only the two risk estimates can be scanned."""
    with pytest.raises(ValueError, match="unknown lambdaType 'guess'"):
        risk_scan(np.eye(2)[None], np.ones((1, 2)), np.eye(2), np.array([1.0]), "guess", 1e6)


def test_inverse_quadratic_forms_match_pseudo_inverse(df_stats):
    """v^T (M + lam H)^+ v by Cholesky where definite, by the pseudo-inverse where not."""
    stats, h = df_stats
    n, nk = stats.b_fit.shape
    rng = np.random.default_rng(27)
    v = rng.normal(size=nk)
    lam = rng.uniform(0.1, 2.0, n)
    m = stats.m_fit.copy()
    u = rng.normal(size=(nk, 3))
    m[2] = u @ u.T  # rank 3: only the pseudo-inverse applies
    rows = np.array([3, 1, 2])
    want = [v @ np.linalg.pinv(m[i] + lam[i] * h, hermitian=True) @ v for i in rows]
    np.testing.assert_allclose(inverse_quadratic_forms(m, v, rows, lam, h), want, rtol=1e-9)
    want = [v @ np.linalg.pinv(m[i], hermitian=True) @ v for i in range(n)]
    np.testing.assert_allclose(inverse_quadratic_forms(m, v), want, rtol=1e-6)
    mask = np.array([True, False, True, False])
    np.testing.assert_allclose(
        inverse_quadratic_forms(m, v, mask), np.array(want)[mask], rtol=1e-6
    )


@pytest.mark.parametrize("kind", ["minimizeBiasedRisk", "minimizeUnbiasedRisk"])
@pytest.mark.parametrize(
    "grid", [dict(), dict(lambdaStepType="linear", lambdaMin=0.5, lambdaMax=20.0, lambdaStep=0.5)]
)
def test_lambda_risk_minimizers_pick_grid_values(df_stats, kind, grid):
    """Risk-minimizing lambda types return, per candidate, a value of the configured grid."""
    stats, h = df_stats
    cfg = PsfMatchConfigDF(lambdaType=kind, **grid)
    fit = fit_single_kernels(stats, cfg, h)
    values = lambda_grid(cfg.lambdaMin, cfg.lambdaMax, cfg.lambdaStep, cfg.lambdaStepType)
    assert fit.lam.shape == (4,)
    for lam in fit.lam:
        assert np.isclose(lam, values, rtol=1e-12).any(), lam
    direct = np.linalg.solve(stats.m_fit + fit.lam[:, None, None] * h, stats.b_fit[..., None])
    np.testing.assert_allclose(fit.coeffs, direct[..., 0], rtol=1e-8)


def test_unknown_lambda_type_raises(df_stats):
    """A lambdaType outside the four known ones is refused."""
    stats, h = df_stats

    cfg = SimpleNamespace(**PsfMatchConfigDF().to_dict(flat=True))
    cfg.lambdaType = "guess"
    with pytest.raises(ValueError, match="unknown lambdaType 'guess'"):
        fit_single_kernels(stats, cfg, h)


def test_larger_lambda_gives_smoother_kernel(df_stats):
    """The roughness a^T H a of the DF kernel decreases as the absolute lambda grows."""
    stats, h = df_stats
    rough = []
    for lam in (0.0, 0.01, 1.0, 100.0, 1e4):
        fit = fit_single_kernels(stats, PsfMatchConfigDF(lambdaValue=lam), h)
        rough.append(np.einsum("ni,ij,nj->n", fit.coeffs, h, fit.coeffs))
    rough = np.array(rough)
    assert np.all(np.diff(rough, axis=0) < 0)
    assert np.all(rough[-1] < 0.05 * rough[0])


def test_regularization_ignores_background_terms(df_stats):
    """With a background, the penalty is padded with zeros: the background is not shrunk."""
    stats, h = df_stats
    n, nk = stats.b_fit.shape
    rng = np.random.default_rng(25)
    m = np.zeros((n, nk + 1, nk + 1))
    m[:, :nk, :nk] = stats.m_fit
    m[:, nk, nk] = 50.0
    m[:, :nk, nk] = m[:, nk, :nk] = rng.normal(size=(n, nk)) * 0.1
    b = np.concatenate([stats.b_fit, np.full((n, 1), 100.0)], axis=1)
    bg_stats = type(stats)(m, b, m, b, stats.sws, b, stats.su, stats.npix, None, 1, 7)
    fit = fit_single_kernels(bg_stats, PsfMatchConfigDF(lambdaValue=5.0), h)
    hp = np.zeros((nk + 1, nk + 1))
    hp[:nk, :nk] = h
    direct = np.linalg.solve(m + 5.0 * hp, b[..., None])[..., 0]
    np.testing.assert_allclose(fit.coeffs, direct, rtol=1e-8)
