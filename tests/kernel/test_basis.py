"""Tests of diffkernel.kernel.basis: Alard-Lupton and delta-function bases,
regularization, sizing."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.config import PsfMatchConfigAL, PsfMatchConfigDF
from diffkernel.errors import ConfigError
from diffkernel.kernel.basis import (
    SIGMA_TO_FWHM,
    al_sigmas_for_fwhm,
    alard_lupton_basis,
    basis_from_config,
    delta_function_basis,
    derive_basis,
    regularization_matrix,
    renormalize,
)


@pytest.fixture(scope="module")
def al_default():
    return alard_lupton_basis(21, (0.7, 1.5, 3.0), (4, 2, 2))


def n_al(degrees):
    return sum((d + 1) * (d + 2) // 2 for d in degrees)


# --- Alard-Lupton ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sigmas, degrees",
    [((0.7, 1.5, 3.0), (4, 2, 2)), ((1.0,), (0,)), ((1.0, 2.0), (3, 1)), ((0.8, 2.0), (5, 2))],
)
def test_al_size_is_sum_of_triangular_numbers(sigmas, degrees):
    """The AL basis has sum (d+1)(d+2)/2 kernels, one group per Gaussian."""
    basis = alard_lupton_basis(15, sigmas, degrees)
    assert basis.size == n_al(degrees)
    assert basis.n_native == n_al(degrees)
    assert basis.groups == tuple((d + 1) * (d + 2) // 2 for d in degrees)
    assert basis.kind == "alard-lupton"
    assert basis.conserves_sum


def test_al_default_has_27_kernels(al_default):
    """ip_diffim's default AL basis (sigmas 0.7/1.5/3.0, degrees 4/2/2) has 27 kernels."""
    assert al_default.size == 27
    assert al_default.groups == (15, 6, 6)
    assert al_default.images.shape == (27, 21, 21)
    assert al_default.description == {"sigmas": [0.7, 1.5, 3.0], "degrees": [4, 2, 2]}


def test_al_kernel_sum_conservation(al_default):
    """Kernel 0 sums to 1 and every other kernel sums to 0 (the sum is coefficient 0)."""
    sums = al_default.images.sum(axis=(1, 2))
    assert sums[0] == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-12)
    np.testing.assert_allclose(al_default.sums, sums, atol=1e-12)
    # The kernel sum of any combination is its first coefficient.
    coeffs = np.random.default_rng(0).normal(size=27)
    assert al_default.kernel_image(coeffs).sum() == pytest.approx(coeffs[0], abs=1e-10)


def test_al_zero_sum_kernels_orthonormal(al_default):
    """Kernels 1.. are orthonormal as images (Gram matrix = identity)."""
    flat = al_default.images[1:].reshape(26, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(26), atol=1e-10)


def test_al_separable_factors_reproduce_native(al_default):
    """fy[r] (outer) fx[r] equals native image r, and the factors are Gaussian x monomial."""
    fx, fy = al_default.separable
    assert fx.shape == fy.shape == (27, 21)
    np.testing.assert_array_equal(fy[:, :, None] * fx[:, None, :], al_default.native_images)
    u = np.arange(-10, 11, dtype=float)
    g = np.exp(-0.5 * (u / 0.7) ** 2)
    # Native function 0 is the bare first Gaussian; 1 is x * it, 2 is y * it.
    np.testing.assert_allclose(fx[0], g)
    np.testing.assert_allclose(fy[0], g)
    np.testing.assert_allclose(fx[1], g * u / 10)
    np.testing.assert_allclose(fy[1], g)
    np.testing.assert_allclose(fx[2], g)
    np.testing.assert_allclose(fy[2], g * u / 10)


def test_al_kernel0_is_normalized_first_gaussian(al_default):
    """Kernel 0 is the narrowest Gaussian scaled to unit sum, centred on the box."""
    k0 = al_default.images[0]
    u = np.arange(-10, 11, dtype=float)
    g = np.outer(np.exp(-0.5 * (u / 0.7) ** 2), np.exp(-0.5 * (u / 0.7) ** 2))
    np.testing.assert_allclose(k0, g / g.sum(), atol=1e-14)
    assert np.unravel_index(np.argmax(k0), k0.shape) == (10, 10)


def test_al_kernel_image_is_linear(al_default):
    """kernel_image(c) = sum_j c_j images[j], also for a batch of coefficient vectors."""
    rng = np.random.default_rng(1)
    c = rng.normal(size=(3, 27))
    expected = np.einsum("nj,jyx->nyx", c, al_default.images)
    np.testing.assert_allclose(al_default.kernel_image(c), expected, atol=1e-12)


@pytest.mark.parametrize(
    "n, groups", [(27, (15, 6, 6)), (21, (15, 6)), (15, (15,)), (18, (15, 3)), (6, (6,)), (1, (1,))]
)
def test_truncated_keeps_groups(al_default, n, groups):
    """truncated(n) keeps the first n kernels and whole groups, then the partial rest."""
    t = al_default.truncated(n)
    assert t.size == n
    assert t.groups == groups
    np.testing.assert_array_equal(t.images, al_default.images[:n])
    assert t.description["truncated_to"] == n
    assert t.conserves_sum and t.kernel_size == 21


@pytest.mark.parametrize("n", [0, 28])
def test_truncated_out_of_range(al_default, n):
    """Truncating to 0 or more kernels than the basis has is refused."""
    with pytest.raises(ValueError, match=f"cannot truncate a basis of 27 kernels to {n}"):
        al_default.truncated(n)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(kernel_size=20, sigmas=(1.0,), degrees=(1,)), "kernelSize must be odd"),
        (dict(kernel_size=1, sigmas=(1.0,), degrees=(1,)), "kernelSize must be odd"),
        (dict(kernel_size=11, sigmas=(1.0, 2.0), degrees=(1,)), "one polynomial degree"),
        (dict(kernel_size=11, sigmas=(), degrees=()), "one polynomial degree"),
        (dict(kernel_size=11, sigmas=(0.0,), degrees=(1,)), "sigmas must be > 0"),
        (dict(kernel_size=11, sigmas=(1.0,), degrees=(-1,)), "degrees must be >= 0"),
    ],
)
def test_al_bad_parameters_raise(kwargs, match):
    """Bad AL parameters raise ConfigError naming the problem."""
    with pytest.raises(ConfigError, match=match):
        alard_lupton_basis(**kwargs)


# --- delta function, renormalize, derive --------------------------------------------------


def test_delta_function_basis_is_identity():
    """The DF basis has one kernel per pixel: kernel j is 1 at pixel j and 0 elsewhere."""
    b = delta_function_basis(5)
    assert b.size == 25 and b.kind == "delta-function" and not b.conserves_sum
    np.testing.assert_array_equal(b.images.reshape(25, 25), np.eye(25))
    np.testing.assert_array_equal(b.sums, np.ones(25))
    assert b.groups == (25,)
    assert b.separable is None
    coeffs = np.arange(25.0)
    np.testing.assert_array_equal(b.kernel_image(coeffs), coeffs.reshape(5, 5))


def test_delta_function_even_size_raises():
    """An even DF kernel size raises ConfigError."""
    with pytest.raises(ConfigError, match="kernelSize must be odd and >= 3, got 8"):
        delta_function_basis(8)


def test_renormalize_drops_dependent_kernels():
    """renormalize keeps unit sum / zero sums and drops a linearly dependent kernel."""
    native = delta_function_basis(3).native_images
    rng = np.random.default_rng(2)
    t = rng.normal(size=(9, 3)) + 1.0
    t = np.column_stack([t, t[:, 1] + 2 * t[:, 2], rng.normal(size=9)])
    new_t, kept = renormalize(native, t)
    assert kept == (0, 1, 2, 4)
    images = new_t.T @ native.reshape(9, 9)
    assert images[0].sum() == pytest.approx(1.0)
    np.testing.assert_allclose(images[1:].sum(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(images[1:] @ images[1:].T, np.eye(3), atol=1e-12)


def test_renormalize_needs_nonzero_first_sum():
    """A first kernel of zero sum cannot carry the kernel sum."""
    native = delta_function_basis(3).native_images
    t = np.zeros((9, 2))
    t[0, 0], t[1, 0] = 1.0, -1.0
    t[4, 1] = 1.0
    with pytest.raises(ValueError, match="non-zero sum"):
        renormalize(native, t)


def test_derive_basis_composes_transforms():
    """A derived basis' images are the parent images combined by the given transform."""
    parent = alard_lupton_basis(9, (1.0, 2.0), (2, 1))
    t = np.random.default_rng(3).normal(size=(parent.size, 4))
    d = derive_basis(parent, t, "pca", False, (1, 1, 1, 1), {"x": 1})
    assert d.size == 4 and d.kind == "pca" and d.kernel_size == 9
    np.testing.assert_allclose(
        d.images, np.einsum("jk,jyx->kyx", t, parent.images), rtol=1e-12, atol=1e-14
    )
    assert d.separable is parent.separable


# --- regularization ---------------------------------------------------------------------

REG_CASES = [
    ("centralDifference", 5, (1, 2)),
    ("centralDifference", 9, (1, 2)),
    ("forwardDifference", 9, (1,)),
    ("forwardDifference", 9, (2,)),
    ("forwardDifference", 9, (1, 2)),
    ("forwardDifference", 9, (0, 1, 2, 3)),
]


@pytest.mark.parametrize("rtype, stencil, orders", REG_CASES)
@pytest.mark.parametrize("border", [0.0, 3.0])
def test_regularization_symmetric_psd(rtype, stencil, orders, border):
    """H is symmetric positive semi-definite, (K^2 x K^2)."""
    h = regularization_matrix(7, rtype, stencil, orders, border)
    assert h.shape == (49, 49)
    np.testing.assert_allclose(h, h.T, atol=0)
    assert np.linalg.eigvalsh(h).min() > -1e-9 * np.abs(h).max()


@pytest.mark.parametrize("k", [5, 7])
@pytest.mark.parametrize(
    "rtype, stencil, orders, expected",
    [
        # 9-point Laplacian, zero padding: edge rows give -3, corners -5, interior 0.
        ("centralDifference", 9, (1, 2), lambda k: 4 * (k - 2) * 9 + 4 * 25),
        # 5-point: edges -1, corners -2.
        ("centralDifference", 5, (1, 2), lambda k: 4 * (k - 2) + 4 * 4),
        # Order 1 along x and y: only the last column / row gives -1.
        ("forwardDifference", 9, (1,), lambda k: 2 * k),
        # Order 2: the last two columns / rows give -1 and +1.
        ("forwardDifference", 9, (2,), lambda k: 4 * k),
        ("forwardDifference", 9, (1, 2), lambda k: 6 * k),
    ],
)
def test_regularization_constant_kernel_penalty_is_border_only(k, rtype, stencil, orders, expected):
    """A constant kernel is penalized only by the zero padding at the border.

    Interior finite differences annihilate a constant, so a^T H a for a = 1 equals the
    hand-computed sum over the border rows of L; the border penalty adds p * (4K - 4).
    """
    ones = np.ones(k * k)
    h0 = regularization_matrix(k, rtype, stencil, orders, 0.0)
    assert ones @ h0 @ ones == pytest.approx(expected(k))
    h3 = regularization_matrix(k, rtype, stencil, orders, 3.0)
    assert ones @ h3 @ ones == pytest.approx(expected(k) + 3.0 * (4 * k - 4))


def test_regularization_interior_annihilates_constant():
    """With no border penalty, H times a constant vanishes two pixels inside the box.

    (H a)_p = sum_q L_qp (L a)_q and (L a)_q = 0 away from the border, so rows of H
    whose stencil never reaches a border row give exactly zero.
    """
    k = 9
    h = regularization_matrix(k, "centralDifference", 9, (1, 2), 0.0)
    ha = (h @ np.ones(k * k)).reshape(k, k)
    np.testing.assert_allclose(ha[2:-2, 2:-2], 0.0, atol=1e-12)
    assert np.abs(ha[0]).min() > 0  # the border rows do feel the zero padding


@pytest.mark.parametrize("rtype, stencil, orders", REG_CASES[:-1])
def test_regularization_prefers_smooth_kernels(rtype, stencil, orders):
    """A smooth Gaussian kernel costs far less than a checkerboard of the same norm."""
    k = 11
    u = np.arange(k) - k // 2
    smooth = np.exp(-0.5 * (u[:, None] ** 2 + u[None, :] ** 2) / 2.0**2)
    checker = (-1.0) ** (u[:, None] + u[None, :]) * (np.abs(u[:, None]) < 4) * (np.abs(u) < 4)
    smooth, checker = smooth.ravel(), checker.ravel()
    smooth /= np.linalg.norm(smooth)
    checker /= np.linalg.norm(checker)
    h = regularization_matrix(k, rtype, stencil, orders, 3.0)
    assert smooth @ h @ smooth < 0.05 * (checker @ h @ checker)


def dense_difference_penalty(k, offsets_per_op, border):
    """H = sum L^T L + border * D from dense operators built pixel by pixel (the definition)."""
    idx = np.arange(k * k).reshape(k, k)
    h = np.zeros((k * k, k * k))
    for offsets in offsets_per_op:
        op = np.zeros((k * k, k * k))
        for y in range(k):
            for x in range(k):
                for dy, dx, w in offsets:
                    if 0 <= y + dy < k and 0 <= x + dx < k:
                        op[idx[y, x], idx[y + dy, x + dx]] += w
        h += op.T @ op
    edge = np.zeros((k, k), dtype=bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    return h + border * np.diag(edge.ravel().astype(float))


@pytest.mark.parametrize("k", [3, 7, 21])
def test_regularization_matrix_equals_the_dense_definition(k):
    """The sparse construction gives exactly the dense operators' H (small integers)."""
    nine = [(0, 0, -8.0)] + [
        (dy, dx, 1.0) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)
    ]
    want = dense_difference_penalty(k, [nine], 3.0)
    np.testing.assert_array_equal(regularization_matrix(k, "centralDifference", 9), want)
    second = [(0, 0, 1.0), (0, 1, -2.0), (0, 2, 1.0)]
    first = [(0, 0, -1.0), (0, 1, 1.0)]
    ops = [first, [(dx, dy, w) for dy, dx, w in first], second]
    ops.append([(dx, dy, w) for dy, dx, w in second])
    got = regularization_matrix(k, "forwardDifference", 9, (1, 2), 0.5)
    np.testing.assert_array_equal(got, dense_difference_penalty(k, ops, 0.5))


def test_regularization_border_penalty_is_diagonal_on_border():
    """H(p) - H(0) = p on the diagonal of border pixels and 0 elsewhere."""
    k = 5
    diff = regularization_matrix(k, "centralDifference", 9, (1, 2), 2.5) - regularization_matrix(
        k, "centralDifference", 9, (1, 2), 0.0
    )
    border = np.ones((k, k), bool)
    border[1:-1, 1:-1] = False
    np.testing.assert_allclose(diff, np.diag(2.5 * border.ravel()), atol=1e-12)


@pytest.mark.parametrize(
    "args, match",
    [
        ((5, "laplacian"), "regularizationType must be"),
        ((5, "centralDifference", 7), "centralRegularizationStencil must be 5 or 9, got 7"),
        ((5, "forwardDifference", 9, ()), "must not be empty"),
        ((5, "forwardDifference", 9, (4,)), "orders must be 0..3, got 4"),
        ((5, "centralDifference", 9, (1, 2), -1.0), "BorderPenalty must be >= 0"),
        ((6, "centralDifference"), "kernelSize must be odd"),
    ],
)
def test_regularization_bad_arguments(args, match):
    """Unknown types, stencils, orders and negative penalties raise ConfigError."""
    with pytest.raises(ConfigError, match=match):
        regularization_matrix(*args)


# --- sizing from the PSF widths ---------------------------------------------------------


def test_al_sigmas_for_fwhm_ladder():
    """sigma_k = sqrt(|s_sci^2 - s_tmpl^2|); ladder sigma_k/beta, sigma_k, beta*sigma_k."""
    sig, sk = al_sigmas_for_fwhm(3.0, 5.0, 3, 2.0, 0.7)
    expected_k = np.sqrt(5.0**2 - 3.0**2) / SIGMA_TO_FWHM
    assert sk == pytest.approx(expected_k)
    np.testing.assert_allclose(sig, [expected_k / 2, expected_k, 2 * expected_k])
    # The same with the images swapped (deconvolution): |.| makes it symmetric.
    assert al_sigmas_for_fwhm(5.0, 3.0, 3, 2.0, 0.7)[1] == pytest.approx(expected_k)


def test_al_sigmas_for_fwhm_floor_and_single():
    """Near-equal PSFs floor sigma_k at min_sigma and start the ladder there."""
    sig, sk = al_sigmas_for_fwhm(3.0, 3.1, 3, 2.0, 0.7)
    assert sk == 0.7
    np.testing.assert_allclose(sig, [0.7, 1.4, 2.8])
    sig1, sk1 = al_sigmas_for_fwhm(3.0, 7.0, 1, 2.0, 0.7)
    assert sig1 == [sk1]
    sig4, _ = al_sigmas_for_fwhm(3.0, 7.0, 4, 1.5, 0.7)
    np.testing.assert_allclose(sig4, [sk1 / 1.5, sk1, sk1 * 1.5, sk1 * 2.25])


@pytest.mark.parametrize(
    "fwhm_t, fwhm_s, size",
    [(3.0, 5.0, 21), (3.0, 7.0, 33), (3.0, 10.0, 35), (3.0, 3.1, 21)],
)
def test_basis_from_config_scaled_al(fwhm_t, fwhm_s, size):
    """Scaled AL: widths from al_sigmas_for_fwhm, size odd(6 sigma_max) clipped to 21..35."""
    cfg = PsfMatchConfigAL()
    b = basis_from_config(cfg, fwhm_t, fwhm_s)
    sigmas, _ = al_sigmas_for_fwhm(fwhm_t, fwhm_s, 3, 2.0, 0.7)
    np.testing.assert_allclose(b.description["sigmas"], sigmas)
    assert b.kernel_size == size
    assert b.kernel_size % 2 == 1
    assert b.size == 27
    assert b.description["degrees"] == [4, 2, 2]
    assert b.description["scaled_by_fwhm"] is True
    assert b.description["deconvolution"] is False


def test_basis_from_config_size_rounding():
    """Size = int(scaling * sigma_max) made odd: 6 * 5.37 = 32.2 -> 33, clipped by min/max."""
    cfg = PsfMatchConfigAL(kernelSizeMin=11, kernelSizeMax=99)
    b = basis_from_config(cfg, 3.0, 7.0)
    assert b.kernel_size == 33
    cfg.kernelSizeFwhmScaling = 4.0  # 4 * 5.37 = 21.5 -> 21
    assert basis_from_config(cfg, 3.0, 7.0).kernel_size == 21
    cfg.kernelSizeFwhmScaling = 3.9  # 20.9 -> 20 -> 21
    assert basis_from_config(cfg, 3.0, 7.0).kernel_size == 21
    cfg.kernelSizeMax = 19
    assert basis_from_config(cfg, 3.0, 7.0).kernel_size == 19


def test_basis_from_config_deconvolution_branch():
    """A narrower science PSF uses alardNGaussDeconv Gaussians of degree alardDegGaussDeconv."""
    cfg = PsfMatchConfigAL(alardNGaussDeconv=2, alardDegGaussDeconv=1)
    b = basis_from_config(cfg, 5.0, 3.0)
    assert b.description["deconvolution"] is True
    assert b.description["degrees"] == [1, 1]
    assert b.size == 2 * 3
    sigmas, _ = al_sigmas_for_fwhm(5.0, 3.0, 2, 2.0, 0.4)
    np.testing.assert_allclose(b.description["sigmas"], sigmas)
    # Defaults: 3 Gaussians of degree 3 -> 30 kernels.
    assert basis_from_config(PsfMatchConfigAL(), 5.0, 3.0).size == 30


def test_basis_from_config_deconvolution_min_sigma():
    """The deconvolution ladder floors at alardMinSigDeconv (0.4), not alardMinSig (0.7)."""
    cfg = PsfMatchConfigAL()
    deconv = basis_from_config(cfg, 3.1, 3.0)
    conv = basis_from_config(cfg, 3.0, 3.1)
    np.testing.assert_allclose(deconv.description["sigmas"], [0.4, 0.8, 1.6])
    np.testing.assert_allclose(conv.description["sigmas"], [0.7, 1.4, 2.8])


def test_basis_from_config_unscaled():
    """Without scaling (off, or a width missing) the configured sigmas and size are used."""
    cfg = PsfMatchConfigAL(scaleByFwhm=False, kernelSize=15)
    b = basis_from_config(cfg, 3.0, 7.0)
    assert b.kernel_size == 15 and b.size == 27
    assert b.description["sigmas"] == [0.7, 1.5, 3.0]
    assert b.description["scaled_by_fwhm"] is False
    cfg2 = PsfMatchConfigAL(kernelSize=17)
    assert basis_from_config(cfg2, None, 7.0).kernel_size == 17
    assert basis_from_config(cfg2, 3.0, 0.0).kernel_size == 17


@pytest.mark.parametrize("fwhm_s, size", [(5.0, 21), (7.0, 33), (10.0, 35)])
def test_basis_from_config_scaled_df(fwhm_s, size):
    """Scaled DF: size odd(6 * 2 sigma_k) clipped to 21..35; one kernel per pixel."""
    b = basis_from_config(PsfMatchConfigDF(), 3.0, fwhm_s)
    assert b.kind == "delta-function"
    assert b.kernel_size == size
    assert b.size == size * size


@pytest.mark.parametrize("cls", [PsfMatchConfigAL, PsfMatchConfigDF])
def test_basis_from_config_even_kernel_size_raises(cls):
    """An even kernelSize (used unscaled) raises ConfigError."""
    cfg = cls(scaleByFwhm=False)
    cfg.kernelSize = 20
    with pytest.raises(ConfigError, match="kernelSize must be odd and >= 3, got 20"):
        basis_from_config(cfg)


def test_al_sigmas_follow_the_2026_rule():
    """Several Gaussians start at max(min_sigma, sigma_k / beta), then multiply by beta.

    Between min_sigma and beta * min_sigma (here 0.7 < sigma_k < 1.4) the ladder is
    [0.7, 1.4, 2.8]; the rule before 2026 gave [sigma_k, 2 sigma_k, 4 sigma_k] there.
    """
    sig, sk = al_sigmas_for_fwhm(3.0, 4.0, 3, 2.0, 0.7)
    assert 0.7 < sk < 1.4
    np.testing.assert_allclose(sig, [0.7, 1.4, 2.8])
    for fwhm_s in np.linspace(3.0, 9.0, 61):
        sig, sk = al_sigmas_for_fwhm(3.0, fwhm_s, 3, 2.0, 0.7)
        np.testing.assert_allclose(sig, max(0.7, sk / 2.0) * 2.0 ** np.arange(3))


@pytest.mark.parametrize("fwhm_t, min_sigma, deconv", [(3.0, 0.7, False), (5.0, 0.4, True)])
def test_al_widths_are_continuous_in_the_fwhm(fwhm_t, min_sigma, deconv):
    """No jump in the widths or the kernel size as a FWHM crosses the point where
    sigma_k = beta * min_sigma (the old rule's discontinuity: every width x beta)."""
    sk_jump = 2.0 * min_sigma
    s_t = fwhm_t / SIGMA_TO_FWHM
    sign = -1.0 if deconv else 1.0
    fwhm_at_jump = SIGMA_TO_FWHM * np.sqrt(s_t**2 + sign * sk_jump**2)
    fwhms = fwhm_at_jump + np.linspace(-0.05, 0.05, 201)
    cfg = PsfMatchConfigAL()
    widths, sizes = [], []
    for fwhm_s in fwhms:
        b = basis_from_config(cfg, fwhm_t, fwhm_s)
        assert b.description["deconvolution"] is deconv
        widths.append(b.description["sigmas"])
        sizes.append(b.kernel_size)
    ratio = np.asarray(widths)[1:] / np.asarray(widths)[:-1]
    assert np.abs(ratio - 1).max() < 0.01
    assert np.abs(np.diff(sizes)).max() <= 2


def test_al_degree_beyond_what_the_gaussian_resolves_is_refused():
    """A 0.7 px Gaussian on 21 pixels has independent powers up to degree 6; degree 10
    used to be cut silently to 37 of its 66 functions: now refused, naming the limit."""
    assert alard_lupton_basis(21, (0.7,), (6,)).size == 28
    with pytest.raises(ConfigError, match=r"alardDegGauss: degree 10 for the 0.7 px .* 6 or less"):
        alard_lupton_basis(21, (0.7,), (10,))
    cfg = PsfMatchConfigAL(scaleByFwhm=False, alardDegGauss=(10, 2, 2))
    with pytest.raises(ConfigError, match="alardDegGauss: degree 10 .* use degree 6 or less"):
        basis_from_config(cfg)
    # When deconvolving, the degrees come from alardDegGaussDeconv, and the message says so.
    cfg = PsfMatchConfigAL(alardDegGaussDeconv=9)
    with pytest.raises(ConfigError, match="alardDegGaussDeconv: degree 9 for the 0.4 px"):
        basis_from_config(cfg, 3.1, 3.0)


@pytest.mark.parametrize("sigmas", [(1.4, 1.4, 2.8), (0.7, 1.5, 1.5)])
def test_al_identical_gaussians_are_refused(sigmas):
    """Identical widths (alardGaussBeta = 1 or a repeated alardSigGauss) used to shrink the
    basis silently (27 to 15 functions): now refused."""
    with pytest.raises(ConfigError, match="too alike: 6 function.* space the sigmas apart"):
        alard_lupton_basis(21, sigmas, (4, 2, 2))
    with pytest.raises(ConfigError, match="too alike"):
        basis_from_config(PsfMatchConfigAL(alardGaussBeta=1.0), 3.0, 5.0)
