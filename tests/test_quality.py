"""The quality verdict: right by default on raw pairs, and every check both ways.

Raw pairs keep their sky, as survey frames do: a template sky of 1000 ADU and a science
sky of ``0.9 * 1000 + 400``. The subtraction defaults (a fitted background) must
recover the kernel sum to 1% and pass; the specification's defaults (no background)
must fail and name the background. Each check is also tested on its own with metrics
made to sit on either side of its thresholds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from diffkernel import MakeKernelConfig, MakeKernelTask, MaskedImage, subtract_images
from diffkernel.image import Exposure
from diffkernel.kernel.photometry import stamp_photometry
from diffkernel.quality import (
    CHECKS,
    Z_BINS,
    Z_NBINS,
    describe,
    difference_histograms,
    fits_cards,
    histogram_metrics,
)
from diffkernel.simulate import make_pair

TRUE_SUM = 0.9
SKY = 1000.0
OFFSET = 400.0


@pytest.fixture(scope="module")
def raw_pair():
    """A 1024^2 pair whose frames hold different skies."""
    return make_pair(
        (1024, 1024),
        seed=3,
        flux_scale=TRUE_SUM,
        template_sky=SKY,
        background=(OFFSET, 2.0, -3.0),
        template_depth=4,
        n_variable=3,
    )


def _sky_subtracted(exposure: Exposure, sky: float) -> Exposure:
    mi = exposure.masked_image
    return Exposure(
        MaskedImage(mi.image - sky, mi.variance, mi.mask, mi.mask_planes),
        exposure.wcs,
        exposure.psf_fwhm,
    )


def _directions(pair):
    """(template, science, mode): the template convolved, and the science convolved
    (the roles swapped, so that the convolved image is still the sharper one)."""
    yield pair.template, pair.science, "convolveTemplate"
    yield pair.science, pair.template, "convolveScience"


def _fit(cfg, template, science, mode):
    result = MakeKernelTask(cfg).run(template, science, mode=mode)
    diff = subtract_images(template, science, result)
    return result, diff


@pytest.mark.parametrize("direction", [0, 1], ids=["convolveTemplate", "convolveScience"])
def test_subtraction_defaults_are_right_on_raw_pairs(raw_pair, direction):
    template, science, mode = list(_directions(raw_pair))[direction]
    result, _ = _fit(MakeKernelConfig.default_subtraction(), template, science, mode)
    assert result.mode == mode
    assert result.psfMatchingKernel.sum_at(512, 512) == pytest.approx(TRUE_SUM, rel=0.01)
    q = result.quality
    assert q["verdict"] == "pass", q["reasons"]
    sky = q["metrics"]["difference"]["sky"]
    footprints = q["metrics"]["difference"]["footprints"]
    assert abs(sky["median"]) < 0.05 and abs(sky["robust_std"] - 1) < 0.05
    assert abs(footprints["median"]) < 0.1 and abs(footprints["robust_std"] - 1) < 0.1
    assert footprints["n_pixels"] > 1000


@pytest.mark.parametrize("direction", [0, 1], ids=["convolveTemplate", "convolveScience"])
def test_specification_defaults_fail_on_raw_pairs_naming_the_background(raw_pair, direction):
    template, science, mode = list(_directions(raw_pair))[direction]
    result = MakeKernelTask().run(template, science, mode=mode)
    q = result.quality
    assert q["verdict"] == "fail"
    by_name = {c["name"]: c for c in q["checks"]}
    assert by_name["background"]["level"] == "fail"
    assert "fitForBackground" in by_name["background"]["message"]
    assert by_name["kernel_sum"]["level"] == "fail"
    # The kernel sum absorbed the ratio of the skies, far from the truth.
    assert result.psfMatchingKernel.sum_at(512, 512) > 1.2
    level = q["metrics"]["background"]["level"]
    assert level == pytest.approx(OFFSET, abs=40)


def test_specification_defaults_pass_on_sky_subtracted_pairs(raw_pair):
    """No sky, no differential background: the specification's defaults are right."""
    template = _sky_subtracted(raw_pair.template, SKY)
    science = _sky_subtracted(raw_pair.science, TRUE_SUM * SKY + OFFSET)
    result, _ = _fit(MakeKernelConfig(), template, science, "convolveTemplate")
    assert result.quality["verdict"] == "pass", result.quality["reasons"]
    assert result.psfMatchingKernel.sum_at(512, 512) == pytest.approx(TRUE_SUM, rel=0.01)


def test_wrong_variance_planes_fail_on_the_sky(raw_pair):
    """Variances 9x too large: the difference is 1/3 of its claimed sigma."""

    def inflated(exposure):
        mi = exposure.masked_image
        return Exposure(
            MaskedImage(mi.image, 9 * mi.variance, mi.mask, mi.mask_planes),
            exposure.wcs,
            exposure.psf_fwhm,
        )

    template, science = inflated(raw_pair.template), inflated(raw_pair.science)
    result, _ = _fit(MakeKernelConfig.default_subtraction(), template, science, "convolveTemplate")
    by_name = {c["name"]: c["level"] for c in result.quality["checks"]}
    assert by_name["sky"] == "fail"
    assert result.quality["verdict"] == "fail"
    assert any("variance" in r for r in result.quality["reasons"])


def test_fit_alone_has_no_difference_metrics_until_subtracted(raw_pair):
    cfg = MakeKernelConfig.default_subtraction()
    result = MakeKernelTask(cfg).run(raw_pair.template, raw_pair.science)
    assert "difference" not in result.quality["metrics"]
    subtract_images(raw_pair.template, raw_pair.science, result)
    assert result.quality["metrics"]["difference"]["sky"]["n_pixels"] > 0


# --- each check on either side of its thresholds -------------------------------------------


@pytest.fixture(scope="module")
def good_metrics(raw_pair):
    result, _ = _fit(
        MakeKernelConfig.default_subtraction(),
        raw_pair.template,
        raw_pair.science,
        "convolveTemplate",
    )
    assert result.quality["verdict"] == "pass"
    return result.quality["metrics"], result.config.kernel.active


BREAKERS = {
    # name: (what to change in the metrics for a warn, for a fail)
    "background": (
        lambda m: m["background"].update(
            fitted=False, level=5.0, level_err=0.5, level_in_sigma=0.2
        ),
        lambda m: m["background"].update(fitted=False, level=50, level_err=0.5, level_in_sigma=2.0),
    ),
    "kernel_sum": (
        lambda m: m["photometric_scale"].update(
            kernel_sum_offset=0.07, kernel_sum_offset_err=0.001
        ),
        lambda m: m["photometric_scale"].update(
            kernel_sum_offset=-0.2, kernel_sum_offset_err=0.001
        ),
    ),
    "rejections": (
        lambda m: m["candidates"].update(rejected_fraction=0.6),
        lambda m: m["candidates"].update(rejected_fraction=0.9),
    ),
    "candidate_residuals": (
        lambda m: m["candidate_residuals"].update(std=1.8),
        lambda m: m["candidate_residuals"].update(mean=0.7),
    ),
    "spatial": (
        lambda m: m.update(spatial_condition=1e12),
        lambda m: m["kernel_sum"].update(min=-0.1),
    ),
    "sky": (
        lambda m: m["difference"]["sky"].update(robust_std=1.4),
        lambda m: m["difference"]["sky"].update(fraction_beyond_5sigma=0.05),
    ),
    "footprints": (
        lambda m: m["difference"]["footprints"].update(robust_std=2.0),
        lambda m: m["difference"]["footprints"].update(median=-1.5),
    ),
}


def test_every_check_is_tested():
    assert set(BREAKERS) == set(CHECKS)


@pytest.mark.parametrize("name", sorted(BREAKERS))
def test_each_check_passes_warns_and_fails(good_metrics, name):
    metrics, kcfg = good_metrics
    check = CHECKS[name]
    assert check(metrics, kcfg)[0] == "pass"
    for level, breaker in zip(("warn", "fail"), BREAKERS[name], strict=True):
        broken = copy.deepcopy(metrics)
        breaker(broken)
        got, message = check(broken, kcfg)
        assert got == level
        assert message and message.count(";") >= 1  # the cause; the fix


def test_insignificant_offsets_do_not_count(good_metrics):
    metrics, kcfg = good_metrics
    m = copy.deepcopy(metrics)
    m["photometric_scale"].update(kernel_sum_offset=0.02, kernel_sum_offset_err=0.005)
    assert CHECKS["kernel_sum"](m, kcfg)[0] == "pass"
    m["background"].update(fitted=False, level=50, level_err=20, level_in_sigma=2.0)
    assert CHECKS["background"](m, kcfg)[0] == "pass"


def test_a_kernel_sum_the_stars_cannot_verify_warns(good_metrics):
    """Stars too faint or too few to see a 10% offset: no silent pass."""
    metrics, kcfg = good_metrics
    m = copy.deepcopy(metrics)
    m["photometric_scale"].update(kernel_sum_offset=0.05, kernel_sum_offset_err=0.047)
    level, message = CHECKS["kernel_sum"](m, kcfg)
    assert level == "warn" and "cannot be checked" in message and "+-4.7%" in message
    m["photometric_scale"] = {"n_stars": 2}
    level, message = CHECKS["kernel_sum"](m, kcfg)
    assert level == "warn" and "2 good stars" in message


# --- the pieces ------------------------------------------------------------------------------


def test_stamp_photometry_recovers_flux_ratio_and_skies():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:41, :41] - 20
    star = np.exp(-(xx**2 + yy**2) / (2 * 2.0**2))
    star /= star.sum()
    conv = 100.0 + 5e4 * star + rng.normal(0, 1, (5, 41, 41))
    ref = 250.0 + 0.8 * 5e4 * star + rng.normal(0, 1, (5, 41, 41))
    ones = np.ones_like(conv)
    ph = stamp_photometry(conv, ones, ref, ones, aperture_radius=12)
    assert np.allclose(ph.flux_ratio, 0.8, rtol=0.01)
    assert np.allclose(ph.sky_convolved, 100, atol=0.3)
    assert np.allclose(ph.sky_reference, 250, atol=0.3)
    assert np.allclose(ph.sky_noise, 1, atol=0.3)
    assert np.all(ph.flux_ratio_err < 0.01)


def test_histograms_split_sky_and_footprints_and_add_over_tiles():
    rng = np.random.default_rng(2)
    diff = rng.normal(0, 1, (64, 80))
    var = np.ones_like(diff)
    mask = np.zeros(diff.shape, dtype=np.int32)
    mask[0, :] = 1
    xc, yc = np.array([10, 70]), np.array([30, 5])
    diff[28:33, 8:13] += 50  # a star left at (10, 30): inside its footprint
    whole = difference_histograms(diff, var, mask, (0, 0), xc, yc, 3.0)
    tiles = sum(
        difference_histograms(
            diff[y : y + 32, x : x + 40],
            var[y : y + 32, x : x + 40],
            mask[y : y + 32, x : x + 40],
            (y, x),
            xc,
            yc,
            3.0,
        )
        for y in (0, 32)
        for x in (0, 40)
    )
    assert np.array_equal(whole, tiles)
    assert whole.shape == (2, Z_NBINS)
    assert whole.sum() == diff.size - 80
    sky, footprints = (histogram_metrics(h) for h in whole)
    assert abs(sky["robust_std"] - 1) < 0.1 and sky["fraction_beyond_5sigma"] == 0
    assert footprints["fraction_beyond_5sigma"] > 0.3
    assert Z_BINS[1500] == 5.0


def test_cards_and_description_carry_the_verdict(good_metrics):
    metrics, _ = good_metrics
    quality = {"verdict": "fail", "reasons": ["fail: x; y"], "checks": [], "metrics": metrics}
    cards = fits_cards(quality)
    assert cards["DKVERDCT"][0] == "fail" and cards["DKREAS1"][0] == "fail: x; y"
    assert cards["DKSKYSTD"][0] == pytest.approx(metrics["difference"]["sky"]["robust_std"])
    assert describe(quality).splitlines() == ["quality: FAIL", "  fail: x; y"]
    assert fits_cards({}) == {}
