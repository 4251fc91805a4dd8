"""Decorrelation of the difference and its score image (serial path), in both directions."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask, subtract_images
from diffkernel.kernel.decorrelate import (
    autocorrelation,
    decorrelation_kernel,
    kernel_image_at,
)
from diffkernel.simulate import make_pair, sampled_gaussian
from diffkernel.simulate.swapped import add_point_source, make_swapped_pair, optimal_snr

SHAPE = (320, 320)
#: Transients: a grid well inside the image and away from the kernel's border band.
SPOTS = [(x, y) for y in range(60, 270, 50) for x in range(60, 270, 50)]


def config() -> MakeKernelConfig:
    cfg = MakeKernelConfig()
    cfg.kernel.active.fitForBackground = True
    cfg.kernel.active.spatialKernelOrder = 1
    return cfg


def science_psf(sim, x: float, y: float, size: int = 21) -> np.ndarray:
    """The science image's PSF at a pixel: the (convolving) truth's kernel on the template PSF."""
    from scipy.signal import fftconvolve

    truth = sim.truth
    psf = sampled_gaussian(size, truth.template_fwhm / 2.3548)
    out = fftconvolve(psf, truth.kernel_at(x, y) / truth.flux_scale, mode="same")
    return out / out.sum()


def with_transients(sim, flux_of, swapped: bool):
    """The pair's exposures with point sources added to the science image.

    ``flux_of(psf, sigma2)`` gives each source's flux from its PSF and the sky variance.
    Returns the science exposure and the injected fluxes.
    """
    from diffkernel.image import Exposure, MaskedImage

    science = sim.science
    mi = science.masked_image
    image = mi.image.copy()
    fluxes = []
    for x, y in SPOTS:
        if swapped:  # the science image is the sharp one: the template PSF
            psf = sampled_gaussian(21, sim.truth.template_fwhm / 2.3548)
        else:
            psf = science_psf(sim, x, y)
        flux = flux_of(psf, float(np.median(mi.variance)))
        add_point_source(image, x, y, flux, psf)
        fluxes.append(flux)
    masked = MaskedImage(image, mi.variance, mi.mask, mi.mask_planes)
    return Exposure(masked, science.wcs, science.psf_fwhm, dict(science.meta)), np.array(fluxes)


@pytest.fixture(scope="module")
def pairs():
    """Both directions: a deep blurry template (science convolved) and a shallow sharp one."""
    swapped = make_swapped_pair(SHAPE, seed=3, template_depth=10)
    plain = make_pair(SHAPE, seed=6, template_depth=1)
    out = {}
    for name, sim, mode in (
        ("convolveScience", swapped, "convolveScience"),
        ("convolveTemplate", plain, "convolveTemplate"),
    ):
        result = MakeKernelTask(config()).run(
            sim.template, sim.science, sim.truth.sources, mode=mode
        )
        assert result.mode == name
        out[name] = (sim, result)
    return out


@pytest.mark.parametrize("mode", ["convolveScience", "convolveTemplate"])
def test_decorrelated_noise_is_white(pairs, mode):
    """Lag-1 and lag-2 autocorrelations of diff/sigma near 0 and unit robust std, where
    convolving the science image correlated it strongly; the verdict still passes."""
    sim, result = pairs[mode]
    before = subtract_images(sim.template, sim.science, result)
    raw = autocorrelation(before.image, before.variance, before.mask)
    verdict = result.quality["verdict"]
    after = subtract_images(sim.template, sim.science, result, decorrelate=True)
    white = autocorrelation(after.image, after.variance, after.mask)
    for lag in ("x1", "y1", "x2", "y2"):
        assert abs(white[lag]) <= 0.03, (lag, white)
    assert 0.95 < white["robust_std"] < 1.05
    # The verdict (its z histograms now of the decorrelated difference) is unchanged, and
    # its checks of the difference's pixels pass.
    assert result.quality["verdict"] == verdict != "fail", result.quality["reasons"]
    levels = {check["name"]: check["level"] for check in result.quality["checks"]}
    assert levels["sky"] == levels["footprints"] == "pass", levels
    assert result.differenceFilters.decorrelate
    if mode == "convolveScience":  # the case that needs it: strongly correlated before
        assert raw["x1"] > 0.1 and raw["y1"] > 0.1, raw


@pytest.mark.parametrize("mode", ["convolveScience", "convolveTemplate"])
def test_transient_photometry_is_unbiased(pairs, mode):
    """The flux of transients in the difference (with them minus without them, so free of
    noise) is what was injected, times the kernel sum when the science image is convolved,
    decorrelated or not."""
    sim, result = pairs[mode]
    science, fluxes = with_transients(sim, lambda psf, var: 30000.0, mode == "convolveScience")
    if mode == "convolveScience":
        fluxes = fluxes * np.array([result.psfMatchingKernel.sum_at(x, y) for x, y in SPOTS])
    # An aperture that holds all the flux: decorrelation sharpens the PSF.
    r = 13
    yy, xx = np.mgrid[: 2 * r + 1, : 2 * r + 1] - r
    aperture = np.hypot(xx, yy) <= r
    ratios = {}
    for decorrelate in (False, True):
        diff = subtract_images(sim.template, science, result, decorrelate=decorrelate)
        base = subtract_images(sim.template, sim.science, result, decorrelate=decorrelate)
        signal = diff.image - base.image
        sums = [signal[y - r : y + r + 1, x - r : x + r + 1][aperture].sum() for x, y in SPOTS]
        ratios[decorrelate] = np.array(sums) / fluxes
    assert abs(np.mean(ratios[True]) - 1) < 0.01, ratios[True]
    assert abs(np.mean(ratios[True]) - np.mean(ratios[False])) < 0.005


@pytest.mark.parametrize("mode", ["convolveScience", "convolveTemplate"])
def test_score_peak_is_the_injected_snr(pairs, mode):
    """Point sources injected at S/N 10 in the difference read ~10 at their score peak, and
    the score's sky has unit robust std."""
    sim, result = pairs[mode]
    swapped = mode == "convolveScience"
    var_t = float(np.median(sim.template.masked_image.variance))
    spot = iter(SPOTS)

    def flux(psf, var_s):
        # The S/N of the optimal (matched) filter on the difference's true noise.
        kernel = sim.truth.kernel_at(*next(spot))
        var_c, var_r = (var_s, var_t) if swapped else (var_t, var_s)
        return 10.0 / optimal_snr(psf, kernel, var_c, var_r, swapped)

    science, _ = with_transients(sim, flux, swapped)
    for decorrelate in (True, False):
        diff = subtract_images(sim.template, science, result, decorrelate=decorrelate, score=True)
        score = result.scoreImage
        peaks = np.array([score[y - 1 : y + 2, x - 1 : x + 2].max() for x, y in SPOTS])
        if decorrelate:
            assert 9.0 < np.mean(peaks) < 11.0, peaks
        else:  # correlated noise: the PSF is no longer the optimal filter
            assert np.mean(peaks) < 11.0, peaks
        sky = np.isfinite(score) & (diff.mask == 0)
        for x, y in SPOTS:
            sky[y - 10 : y + 11, x - 10 : x + 11] = False
        z = score[sky]
        assert 0.9 < 1.4826 * np.median(np.abs(z - np.median(z))) < 1.1


def test_mask_bits_and_border_spread_by_the_filter(pairs):
    """A masked science pixel flags the filter's footprint; the NaN border widens by the
    filter's half-width."""
    from diffkernel.image import Exposure, MaskedImage

    sim, result = pairs["convolveScience"]
    mi = sim.science.masked_image
    mask = mi.mask.copy()
    bad = 1 << mi.mask_planes["BAD"]
    mask[160, 160] |= bad
    science = Exposure(MaskedImage(mi.image, mi.variance, mask, mi.mask_planes), None, 3.0)
    diff = subtract_images(sim.template, science, result, decorrelate=True)
    filters = result.differenceFilters
    r = filters.mask_half
    assert r >= 1
    flagged = (diff.mask & (1 << diff.mask_planes["BAD"])) != 0
    # (The kernel spreads the convolved science's bit by its half-width first.)
    h = result.spatialSolution.basis.kernel_size // 2
    ys, xs = np.nonzero(flagged)
    assert ys.min() == 160 - h - r and xs.max() == 160 + h + r
    edge = h + filters.half
    assert np.isnan(diff.image[edge - 1, 100]) and np.isfinite(diff.image[edge, 100])
    assert np.isnan(diff.image[100, -edge]) and np.isfinite(diff.image[100, -edge - 1])


def test_decorrelation_kernel_properties():
    """Unit sum; an impulse when the convolved image has no noise; the filtered noise of a
    Gaussian kernel's difference has the flat spectrum the formula promises."""
    kernel = 1.2 * sampled_gaussian(21, 2.0)
    phi = decorrelation_kernel(kernel, 4.0, 1.0)
    assert phi.shape == (21, 21) and phi.sum() == pytest.approx(1.0)
    assert phi[10, 10] > 1 and phi.min() < 0  # a sharpening filter
    impulse = decorrelation_kernel(kernel, 0.0, 1.0)
    assert impulse[10, 10] == 1.0 and np.count_nonzero(impulse) == 1
    rng = np.random.default_rng(3)
    from scipy.signal import fftconvolve

    ref = rng.normal(0, 1.0, (400, 400))
    conv = rng.normal(0, 2.0, (400, 400))
    diff = ref - fftconvolve(conv, kernel, mode="same")
    white = fftconvolve(diff, phi, mode="same")[30:-30, 30:-30]
    var = 1.0 + 1.2**2 * 4.0
    stats = autocorrelation(white, np.full(white.shape, var), np.zeros(white.shape, int))
    assert abs(stats["x1"]) < 0.02 and abs(stats["y1"]) < 0.02
    assert stats["robust_std"] == pytest.approx(1.0, abs=0.03)


def test_kernel_image_at_is_the_fitted_kernel(pairs):
    """The filter is built on the kernel the subtraction convolves with."""
    sim, result = pairs["convolveTemplate"]
    kernel = kernel_image_at(result.spatialSolution, 100.0, 200.0)
    assert kernel.sum() == pytest.approx(result.psfMatchingKernel.sum_at(100.0, 200.0), rel=1e-9)
