"""Tests of diffkernel.kernel.candidate: stamp convolutions and sufficient statistics."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.signal import convolve2d

from diffkernel.image import MaskedImage
from diffkernel.kernel.basis import (
    KernelBasis,
    alard_lupton_basis,
    delta_function_basis,
    derive_basis,
)
from diffkernel.kernel.candidate import StampBatch, convolve_basis, convolve_stamps, cut_stamps
from diffkernel.kernel.moments import (
    CandidateStats,
    compute_stats,
    core_selector,
    fit_moments,
    local_background_columns,
)

K = 7
S = 9
H = S + K - 1


@pytest.fixture(scope="module")
def cutouts():
    rng = np.random.default_rng(10)
    return rng.normal(100.0, 10.0, size=(3, H, H))


def reference_valid(cutouts, images):
    """(N, n, S, S) valid convolutions by scipy, one kernel at a time."""
    return np.array([[convolve2d(c, k, mode="valid") for k in images] for c in cutouts])


def generic_basis():
    """A basis of arbitrary (non-separable, non-delta) native images."""
    rng = np.random.default_rng(11)
    native = rng.normal(size=(4, K, K))
    return KernelBasis("pca", K, native, rng.normal(size=(4, 3)), False)


@pytest.mark.parametrize(
    "make_basis",
    [
        lambda: alard_lupton_basis(K, (0.8, 2.0), (2, 1)),
        lambda: delta_function_basis(K),
        generic_basis,
        lambda: derive_basis(
            delta_function_basis(K),
            np.random.default_rng(12).normal(size=(K * K, 3)),
            "pca",
            False,
            (1, 1, 1),
            {},
        ),
        lambda: derive_basis(
            alard_lupton_basis(K, (1.0,), (2,)), np.eye(6)[:, :2], "pca", True, (1, 1), {}
        ),
    ],
    ids=["AL", "DF", "generic", "pca-of-DF", "pca-of-AL"],
)
def test_convolve_stamps_matches_scipy_valid(cutouts, make_basis):
    """convolve_stamps returns the 'valid' convolution with each native function."""
    basis = make_basis()
    out = convolve_stamps(basis, cutouts)
    assert out.shape == (3, basis.n_native, S, S)
    np.testing.assert_allclose(
        out, reference_valid(cutouts, basis.native_images), rtol=1e-10, atol=1e-8
    )


@pytest.mark.parametrize(
    "make_basis",
    [lambda: alard_lupton_basis(K, (0.8, 2.0), (2, 1)), generic_basis],
    ids=["AL", "generic"],
)
def test_convolve_basis_is_the_convolution_with_each_basis_kernel(cutouts, make_basis):
    """convolve_basis convolves with the basis kernels themselves (native @ transform)."""
    basis = make_basis()
    out = convolve_basis(basis, cutouts)
    assert out.shape == (3, basis.size, S, S)
    np.testing.assert_allclose(out, reference_valid(cutouts, basis.images), rtol=1e-9, atol=1e-7)


def test_convolve_stamps_one_cutout_matches_a_batch(cutouts):
    """A cutout convolved alone or in a batch gives the same values (batch-independent)."""
    basis = alard_lupton_basis(K, (0.8, 2.0), (2, 1))
    batch = convolve_stamps(basis, cutouts)
    for i in range(len(cutouts)):
        np.testing.assert_allclose(
            convolve_stamps(basis, cutouts[i : i + 1])[0], batch[i], rtol=1e-13, atol=1e-10
        )


def test_convolve_stamps_asymmetric_kernel_orientation():
    """A delta off centre shifts the stamp the way a true convolution does."""
    tc = np.arange(H * H, dtype=float).reshape(1, H, H)
    basis = delta_function_basis(K)
    out = convolve_stamps(basis, tc)
    # Native function index for a delta at kernel pixel (row 0, column 6).
    r = 0 * K + 6
    h = K // 2
    # out[y, x] = sum K[a, b] tc[y + K-1-a, x + K-1-b] = tc[y + 6, x + 0]
    np.testing.assert_array_equal(out[0, r], tc[0, K - 1 : K - 1 + S, 0:S])
    # The central delta gives the template pixels under the stamp.
    np.testing.assert_array_equal(out[0, h * K + h], tc[0, h : h + S, h : h + S])


# --- sufficient statistics --------------------------------------------------------------


def explicit_moments(conv, science, variance, coeffs, order, selector):
    """Residual mean/std/chi2 of (s - C a)/sigma computed from pixels."""
    n, nk, s, _ = conv.shape
    c = conv.reshape(n, nk, s * s)
    if order is not None:
        cols = local_background_columns(s, order)
        c = np.concatenate([c, np.broadcast_to(cols, (n,) + cols.shape)], axis=1)
    model = np.einsum("nj,njp->np", coeffs, c)
    z = (science.reshape(n, -1) - model) / np.sqrt(variance.reshape(n, -1))
    if selector is not None:
        z = z[:, selector.ravel()]
    return z.mean(axis=1), z.std(axis=1, ddof=1), (z**2).sum(axis=1)


@pytest.fixture(scope="module")
def stamp_data():
    rng = np.random.default_rng(13)
    basis = alard_lupton_basis(K, (0.8, 2.0), (2, 1))
    template = rng.normal(50.0, 5.0, size=(4, H, H))
    native = convolve_stamps(basis, template)
    conv = np.einsum("nrys,rj->njys", native, basis.transform)
    science = conv[:, 0] * 1.3 + rng.normal(0.0, 2.0, size=(4, S, S)) + 4.0
    var_const = np.full((4, S, S), 4.0)
    var_pix = rng.uniform(1.0, 9.0, size=(4, S, S))
    return basis, conv, science, var_const, var_pix


@pytest.mark.parametrize("order", [None, 0, 1, 2])
@pytest.mark.parametrize("use_core", [False, True])
@pytest.mark.parametrize("constant_weighting", [False, True])
@pytest.mark.parametrize("per_pixel_variance", [False, True])
def test_residual_moments_match_pixels(
    stamp_data, order, use_core, constant_weighting, per_pixel_variance
):
    """residual_moments(a) equals mean/std/chi2 of (s - C a)/sigma over the stats pixels."""
    basis, conv, science, var_const, var_pix = stamp_data
    variance = var_pix if per_pixel_variance else var_const
    selector = core_selector(S, 3) if use_core else None
    stats = compute_stats(
        conv,
        science,
        variance,
        background_order=order,
        constant_variance_weighting=constant_weighting,
        stats_selector=selector,
    )
    n_bg = 0 if order is None else (order + 1) * (order + 2) // 2
    assert stats.n_background == n_bg
    assert stats.n_kernel == basis.size
    assert stats.n_params == basis.size + n_bg
    assert stats.stamp_half == S // 2
    np.testing.assert_array_equal(stats.npix, 36.0 if use_core else S * S)
    coeffs = np.random.default_rng(14).normal(size=(4, stats.n_params))
    mean, std, chi2 = stats.residual_moments(coeffs)
    e_mean, e_std, e_chi2 = explicit_moments(conv, science, variance, coeffs, order, selector)
    np.testing.assert_allclose(chi2, e_chi2, rtol=1e-9)
    np.testing.assert_allclose(mean, e_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, e_std, rtol=1e-8)


@pytest.mark.parametrize("order", [None, 1])
def test_fit_moments_weighting(stamp_data, order):
    """m_fit/b_fit use 1/v per pixel, or 1/mean(v) with constant weighting; m, b always 1/v."""
    _, conv, science, _, var_pix = stamp_data
    n, nk = conv.shape[:2]
    c = conv.reshape(n, nk, -1)
    if order is not None:
        cols = local_background_columns(S, order)
        c = np.concatenate([c, np.broadcast_to(cols, (n,) + cols.shape)], axis=1)
    s = science.reshape(n, -1)
    w = 1.0 / var_pix.reshape(n, -1)
    m_w = np.einsum("nip,np,njp->nij", c, w, c)
    b_w = np.einsum("nip,np,np->ni", c, w, s)
    per_pixel = compute_stats(
        conv, science, var_pix, background_order=order, constant_variance_weighting=False
    )
    np.testing.assert_allclose(per_pixel.m_fit, m_w, rtol=1e-10)
    np.testing.assert_allclose(per_pixel.b_fit, b_w, rtol=1e-10)
    const = compute_stats(
        conv,
        science,
        var_pix,
        background_order=order,
        constant_variance_weighting=True,
        with_uncertainty=True,
    )
    wc = 1.0 / var_pix.reshape(n, -1).mean(axis=1)
    np.testing.assert_allclose(
        const.m_fit, np.einsum("nip,njp->nij", c, c) * wc[:, None, None], rtol=1e-10
    )
    np.testing.assert_allclose(const.b_fit, np.einsum("nip,np->ni", c, s) * wc[:, None])
    np.testing.assert_allclose(const.m, m_w, rtol=1e-10)
    np.testing.assert_allclose(const.b, b_w, rtol=1e-10)
    # Covariance helper: C^T W_fit V W_fit C.
    v = var_pix.reshape(n, -1)
    np.testing.assert_allclose(
        const.m_var, np.einsum("nip,np,njp->nij", c, v * wc[:, None] ** 2, c), rtol=1e-10
    )
    assert per_pixel.m_var is None


@pytest.mark.parametrize("order", [None, 0, 2])
@pytest.mark.parametrize("use_core", [False, True])
def test_transformed_equals_direct_stats(stamp_data, order, use_core):
    """stats.transformed(T) equals stats computed from stamps convolved with the derived basis."""
    _, conv, science, _, var_pix = stamp_data
    t = np.random.default_rng(15).normal(size=(conv.shape[1], 4))
    selector = core_selector(S, 2) if use_core else None
    kwargs = dict(
        background_order=order,
        constant_variance_weighting=True,
        stats_selector=selector,
        with_uncertainty=True,
    )
    base = compute_stats(conv, science, var_pix, **kwargs)
    direct = compute_stats(np.einsum("njys,jm->nmys", conv, t), science, var_pix, **kwargs)
    moved = base.transformed(t)
    for name in ("m_fit", "b_fit", "m", "b", "u", "m_var", "sws", "su", "npix"):
        np.testing.assert_allclose(
            getattr(moved, name), getattr(direct, name), rtol=1e-9, atol=1e-9, err_msg=name
        )
    assert moved.n_background == direct.n_background
    assert moved.n_kernel == 4


@pytest.mark.parametrize("constant_weighting", [False, True])
@pytest.mark.parametrize("use_core", [False, True])
def test_stats_on_fit_moments_made_with_another_variance(stamp_data, constant_weighting, use_core):
    """With ``fit``, the fit's moments are taken as given and ``variance`` sets the units
    of the residual statistics only: a fit weighted before the kernel was known."""
    _, conv, science, var_const, var_pix = stamp_data
    kwargs = dict(background_order=1, constant_variance_weighting=constant_weighting)
    selector = core_selector(S, 2) if use_core else None
    moments = fit_moments(conv, science, var_const, with_uncertainty=True, **kwargs)
    both = compute_stats(conv, science, var_pix, stats_selector=selector, fit=moments, **kwargs)
    fit_only = compute_stats(conv, science, var_const, with_uncertainty=True, **kwargs)
    stats_only = compute_stats(conv, science, var_pix, stats_selector=selector, **kwargs)
    for name in ("m_fit", "b_fit", "m_var"):
        np.testing.assert_array_equal(getattr(both, name), getattr(fit_only, name), err_msg=name)
    for name in ("m", "b", "sws", "u", "su", "npix"):
        np.testing.assert_array_equal(getattr(both, name), getattr(stats_only, name), err_msg=name)
    assert len(moments) == 4 and moments.n_background == 3
    with pytest.raises(ValueError, match="fit moments of 4 candidates with 3 background"):
        compute_stats(
            conv,
            science,
            var_pix,
            background_order=0,
            constant_variance_weighting=True,
            fit=moments,
        )


def test_difference_variance_is_the_template_variance_through_the_kernel_squared():
    """V_s + K² ⊛ V_t, as a pixel-by-pixel convolution makes it."""
    rng = np.random.default_rng(17)
    batch = StampBatch(
        rng.normal(size=(3, H, H)),
        rng.uniform(1.0, 5.0, size=(3, H, H)),
        rng.normal(size=(3, S, S)),
        rng.uniform(1.0, 5.0, size=(3, S, S)),
    )
    kernels = rng.normal(size=(3, K, K))
    pairs = zip(batch.template_variance, kernels, strict=True)
    expected = batch.science_variance + np.array(
        [convolve2d(v, k**2, mode="valid") for v, k in pairs]
    )
    np.testing.assert_allclose(batch.difference_variance(kernels), expected, rtol=1e-12)


@pytest.mark.parametrize("use_core", [False, True])
def test_residual_moments_under_other_kernels_with_uniform_variances(stamp_data, use_core):
    """With uniform variances (their ratio uniform over the stamp), the moments given
    other kernels are exactly those over the difference's sigma under them."""
    basis, conv, science, _, _ = stamp_data
    n = len(science)
    selector = core_selector(S, 2) if use_core else None
    v_s, v_t = 4.0, 3.0
    own = np.random.default_rng(18).normal(size=(n, basis.size + 1))
    own_var = v_s + v_t * (basis.kernel_image(own[:, :-1]) ** 2).sum(axis=(1, 2))
    stats = compute_stats(
        conv,
        science,
        np.broadcast_to(own_var[:, None, None], science.shape),
        background_order=0,
        constant_variance_weighting=True,
        stats_selector=selector,
    )
    stats.var_science = v_s / own_var
    stats.var_template = np.full((n, K, K), v_t) / own_var[:, None, None]
    other = own + np.random.default_rng(19).normal(size=own.shape)
    kernels = basis.kernel_image(other[:, :-1])
    other_var = v_s + v_t * (kernels**2).sum(axis=(1, 2))
    mean, std, chi2 = stats.residual_moments(other, kernels)
    e_mean, e_std, e_chi2 = explicit_moments(
        conv, science, np.broadcast_to(other_var[:, None, None], science.shape), other, 0, selector
    )
    np.testing.assert_allclose(chi2, e_chi2, rtol=1e-9)
    np.testing.assert_allclose(mean, e_mean, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(std, e_std, rtol=1e-8)


def test_take_and_concatenate(stamp_data):
    """take() selects candidates in every array; concatenate() undoes a split."""
    _, conv, science, _, var_pix = stamp_data
    st = compute_stats(
        conv, science, var_pix, background_order=1, constant_variance_weighting=False
    )
    assert len(st) == 4
    part = st.take(np.array([2, 0]))
    assert len(part) == 2
    np.testing.assert_array_equal(part.m[0], st.m[2])
    np.testing.assert_array_equal(part.sws, st.sws[[2, 0]])
    assert part.m_var is None and part.n_background == 3
    joined = CandidateStats.concatenate([st.take(slice(0, 1)), st.take(slice(1, 4))])
    for name in ("m_fit", "b_fit", "m", "b", "sws", "u", "su", "npix"):
        np.testing.assert_array_equal(getattr(joined, name), getattr(st, name))


def test_local_background_columns():
    """Terms by total degree: 1, u, v, u^2, uv, v^2 with u, v offsets / half-width."""
    cols = local_background_columns(5, 2)
    assert cols.shape == (6, 25)
    np.testing.assert_array_equal(cols[0], np.ones(25))
    off = np.array([-1.0, -0.5, 0.0, 0.5, 1.0])
    v, u = np.meshgrid(off, off, indexing="ij")
    for row, expected in zip(cols, [1 + 0 * u, u, v, u * u, u * v, v * v], strict=True):
        np.testing.assert_allclose(row, expected.ravel())
    assert local_background_columns(7, 0).shape == (1, 49)
    assert local_background_columns(7, 3).shape == (10, 49)


def test_core_selector_is_2r_box():
    """The core is a (2r)^2 box starting r pixels before the centre, as in ip_diffim."""
    sel = core_selector(11, 3)
    assert sel.sum() == 36
    rows, cols = np.nonzero(sel)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (2, 7, 2, 7)


def test_cut_stamps_shapes_and_centring():
    """Template cutouts are (2(hs+hk)+1)^2 and science stamps (2hs+1)^2, both centred."""
    ny, nx = 40, 50
    yy, xx = np.mgrid[0:ny, 0:nx]
    image = 1000.0 * yy + xx
    tmpl = MaskedImage.from_image(image, variance=image + 1.0)
    sci = MaskedImage.from_image(-image, variance=2.0 * image + 1.0)
    xc, yc = np.array([10, 30, 42]), np.array([12, 20, 27])
    batch = cut_stamps(tmpl, sci, xc, yc, 4, 3)
    assert isinstance(batch, StampBatch)
    assert batch.template.shape == batch.template_variance.shape == (3, 15, 15)
    assert batch.science.shape == batch.science_variance.shape == (3, 9, 9)
    assert batch.stamp_size == 9 and batch.kernel_size == 7
    for i in range(3):
        assert batch.template[i, 7, 7] == 1000.0 * yc[i] + xc[i]
        assert batch.science[i, 4, 4] == -(1000.0 * yc[i] + xc[i])
        assert batch.template[i, 0, 0] == 1000.0 * (yc[i] - 7) + (xc[i] - 7)
        assert batch.science[i, 0, 8] == -(1000.0 * (yc[i] - 4) + (xc[i] + 4))
        np.testing.assert_array_equal(batch.science_variance[i], 2.0 * -batch.science[i] + 1.0)
    t_c, tv_c = batch.template_center()
    np.testing.assert_array_equal(t_c, -batch.science)
    np.testing.assert_array_equal(tv_c, batch.template_variance[:, 3:12, 3:12])
    sub = batch.take(np.array([False, True, False]))
    assert sub.science.shape == (1, 9, 9) and sub.science[0, 4, 4] == -20030.0
