"""Property-based tests (hypothesis) of invariants the method promises.

* The Alard-Lupton basis carries the kernel sum in coefficient 0 alone.
* A spatially constant kernel conserves flux (times the kernel sum) and variance (times
  the sum of the squared kernel) in the tiled spatially varying convolution.
* The kernel fit does not depend on the order of the source list.
* The difference image does not depend on the tile size of the subtraction.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.errors import ConfigError
from diffkernel.image import Exposure
from diffkernel.kernel.basis import alard_lupton_basis
from diffkernel.kernel.convolve import convolve_region, window
from diffkernel.kernel.spatial import SpatialFunctions, SpatialSolution
from diffkernel.simulate import make_pair

# --- Alard-Lupton basis: the kernel sum is coefficient 0 ------------------------------


@st.composite
def al_ladders(draw):
    """Kernel size, sigmas and degrees shaped as the configs make them.

    A ladder of 1-3 Gaussians whose widths grow by ``beta`` (1.8-3; the configs use
    2), degrees 0-4, and a kernel at least ``6 sigma_max + 1`` and at most 41 pixels wide.
    """
    n_gauss = draw(st.integers(1, 3))
    beta = draw(st.floats(1.8, 3.0))
    sigma0 = draw(st.floats(0.5, min(3.0, 6.5 / beta ** (n_gauss - 1))))
    sigmas = tuple(sigma0 * beta**i for i in range(n_gauss))
    smallest = 2 * int(np.ceil(3.0 * sigmas[-1])) + 1
    kernel_size = draw(st.integers(smallest, 41).map(lambda k: k | 1))
    degrees = tuple(draw(st.lists(st.integers(0, 4), min_size=n_gauss, max_size=n_gauss)))
    return kernel_size, sigmas, degrees


@settings(max_examples=40, deadline=None)
@given(al_ladders(), st.integers(0, 2**32 - 1))
def test_al_basis_conserves_kernel_sum(ladder, seed):
    """AL basis kernel 0 sums to 1, the others to 0, so a kernel's sum is coefficient 0."""
    kernel_size, sigmas, degrees = ladder
    basis = alard_lupton_basis(kernel_size, sigmas, degrees)
    assert basis.conserves_sum
    sums = basis.images.sum(axis=(1, 2))
    # Rounding of the Gram-Schmidt renormalization: up to ~1.4e-11 seen (hypothesis),
    # far below anything a kernel sum is used for.
    assert sums[0] == pytest.approx(1.0, abs=1e-10)
    np.testing.assert_allclose(sums[1:], 0.0, atol=1e-10)
    np.testing.assert_allclose(basis.sums, sums, atol=1e-10)
    coeffs = np.random.default_rng(seed).normal(size=basis.size)
    assert basis.kernel_image(coeffs).sum() == pytest.approx(
        coeffs[0], abs=1e-10 * np.abs(coeffs).sum()
    )


@pytest.mark.parametrize(
    "kernel_size, sigmas, degrees, match",
    [
        (5, (0.3, 0.45, 0.8), (5, 2, 4), "degree 5 for the 0.3 px .* more than a 5x5"),
        (13, (4.57, 4.69, 5.11), (4, 4, 3), "too alike"),
        (13, (4.57, 4.69), (4, 4), "numerically degenerate"),
    ],
)
def test_al_basis_refuses_near_dependent_gaussians(kernel_size, sigmas, degrees, match):
    """Near-equal or kernel-sized Gaussians cannot conserve the sum: a clear ConfigError.

    (Renormalizing them needs huge cancelling coefficients; their zero-sum kernels
    summed to up to ~700, and a 5x5 kernel got 26 basis kernels.) Those whose functions
    are outright dependent are refused first, naming the degree or the widths to change.
    """
    with pytest.raises(ConfigError, match=match):
        alard_lupton_basis(kernel_size, sigmas, degrees)


# --- Flux conservation of the spatially varying convolution --------------------------


@settings(max_examples=30, deadline=None)
@given(
    kernel_size=st.sampled_from([3, 5, 7, 9, 11]),
    order=st.integers(0, 2),
    model_type=st.sampled_from(["chebyshev1", "polynomial"]),
    shape=st.tuples(st.integers(24, 60), st.integers(24, 60)),
    seed=st.integers(0, 2**32 - 1),
)
def test_constant_kernel_conserves_flux(kernel_size, order, model_type, shape, seed):
    """A constant kernel maps total flux F to F*sum(K) and total variance V to V*sum(K^2)."""
    rng = np.random.default_rng(seed)
    basis = alard_lupton_basis(kernel_size, (1.0, 2.0), (2, 1))
    functions = SpatialFunctions(model_type, order, (0.0, 0.0, shape[1] - 1.0, shape[0] - 1.0))
    theta = np.zeros((basis.size, functions.size))
    theta[:, 0] = rng.normal(size=basis.size) * 0.3
    theta[0, 0] = rng.uniform(0.5, 2.0)
    sol = SpatialSolution(basis, functions, theta, None, np.zeros(0), 1.0)
    kernel = basis.kernel_image(theta[:, 0])

    h = kernel_size // 2
    image = np.zeros(shape)
    variance = np.zeros(shape)
    image[h:-h, h:-h] = rng.uniform(-50.0, 500.0, size=(shape[0] - 2 * h, shape[1] - 2 * h))
    variance[h:-h, h:-h] = rng.uniform(1.0, 30.0, size=(shape[0] - 2 * h, shape[1] - 2 * h))
    mask = np.zeros(shape, dtype=np.int32)
    ny, nx = shape
    box = (-h, ny + h, -h, nx + h)
    padded = (window(image, *box, 0.0), window(variance, *box, 0.0), window(mask, *box, 0))
    out, out_var, _ = convolve_region(*padded, sol, 0, 0)

    scale = np.abs(image).sum() * np.abs(kernel).sum()
    assert out.sum() == pytest.approx(image.sum() * kernel.sum(), abs=1e-10 * scale)
    assert out_var.sum() == pytest.approx(variance.sum() * (kernel**2).sum(), rel=1e-9, abs=1e-12)


# --- Invariance of the fit to the order of the sources -------------------------------


@pytest.fixture(scope="module")
def pair():
    """A 192^2 pair, built once: 147 sources, 5 GOOD, and two sources that share a pixel."""
    return make_pair((192, 192), seed=5)


@pytest.fixture(scope="module")
def reference(pair):
    config = MakeKernelConfig()
    config.kernel.active.fitForBackground = True
    return config, MakeKernelTask(config).run(pair.template, pair.science, pair.truth.sources)


def good_ids(result) -> set[int]:
    table = result.candidates
    return {int(i) for i in table["id"][table["status"] == "GOOD"]}


def assert_same_fit(result, ref):
    ref_coeffs = ref.spatialSolution.kernel_coeffs
    coeffs = result.spatialSolution.kernel_coeffs
    assert coeffs.shape == ref_coeffs.shape
    np.testing.assert_allclose(coeffs, ref_coeffs, rtol=0, atol=1e-10 * np.abs(ref_coeffs).max())
    assert good_ids(result) == good_ids(ref)


def test_reference_has_a_good_star_sharing_its_pixel(reference):
    """The pair exercises the duplicate rule: a GOOD star shares its pixel with another source."""
    table = reference[1].candidates
    centre = {(int(r["x_center"]), int(r["y_center"])) for r in table if r["status"] == "GOOD"}
    dups = {(int(r["x_center"]), int(r["y_center"])) for r in table if r["reason"] == "duplicate"}
    assert centre & dups


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_fit_invariant_to_source_order(pair, reference, seed):
    """Permuting the source table leaves the kernel coefficients and the GOOD ids unchanged."""
    config, ref = reference
    sources = pair.truth.sources
    perm = np.random.default_rng(seed).permutation(len(sources))
    result = MakeKernelTask(config).run(pair.template, pair.science, sources[perm])
    assert_same_fit(result, ref)
    # Candidates are ordered by cell and id, not by list position: the fit is bit-identical.
    np.testing.assert_array_equal(
        result.spatialSolution.kernel_coeffs, ref.spatialSolution.kernel_coeffs
    )


@pytest.fixture(scope="module")
def crowded_pair():
    """A 256^2 pair with 262 sources: more than the 200 the FWHM measurement uses."""
    return make_pair((256, 256), seed=5)


# Fixed permutations: deterministic, and no shrinking at every run.
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_invariant_to_source_order_with_measured_fwhm(crowded_pair, reference, seed):
    """Without PSF models (FWHMs measured on the stars) the fit is still order-invariant."""
    config, _ = reference
    template = Exposure(crowded_pair.template.masked_image)
    science = Exposure(crowded_pair.science.masked_image)
    sources = crowded_pair.truth.sources
    assert len(sources) > 200
    ref = MakeKernelTask(config).run(template, science, sources)
    perm = np.random.default_rng(seed).permutation(len(sources))
    result = MakeKernelTask(config).run(template, science, sources[perm])
    assert result.metadata["template_fwhm"] == ref.metadata["template_fwhm"]
    assert_same_fit(result, ref)


# --- Invariance of the subtraction to the tiling --------------------------------------


@pytest.fixture(scope="module")
def whole_difference(pair, reference):
    _, result = reference
    return subtract_images(
        pair.template, pair.science, result, tile_size=1024, precision="double"
    )


@settings(max_examples=12, deadline=None)
@given(tile_size=st.one_of(st.sampled_from([37, 64, 100, 1024]), st.integers(16, 300)))
def test_difference_invariant_to_tile_size(pair, reference, whole_difference, tile_size):
    """subtract_images gives the same difference, variance and mask for every tile size."""
    _, result = reference
    diff = subtract_images(
        pair.template, pair.science, result, tile_size=tile_size, precision="double"
    )
    ref = whole_difference
    np.testing.assert_array_equal(diff.mask, ref.mask)
    np.testing.assert_array_equal(np.isnan(diff.image), np.isnan(ref.image))
    finite = np.isfinite(ref.image)
    assert finite.sum() > 0.5 * ref.image.size
    scale = np.abs(ref.image[finite]).max()
    np.testing.assert_allclose(diff.image[finite], ref.image[finite], rtol=1e-9, atol=1e-9 * scale)
    np.testing.assert_allclose(diff.variance[finite], ref.variance[finite], rtol=1e-9)


def test_single_precision_ffts_stay_far_below_the_noise(pair, reference, whole_difference):
    """The default single-precision convolution differs from double by < 1e-4 sigma."""
    _, result = reference
    single = subtract_images(pair.template, pair.science, result, tile_size=64)
    finite = np.isfinite(whole_difference.image)
    np.testing.assert_array_equal(np.isfinite(single.image), finite)
    np.testing.assert_array_equal(single.mask, whole_difference.mask)
    sigma = np.sqrt(whole_difference.variance[finite])
    assert np.max(np.abs(single.image[finite] - whole_difference.image[finite]) / sigma) < 1e-4
    np.testing.assert_allclose(
        single.variance[finite], whole_difference.variance[finite], rtol=1e-5
    )
