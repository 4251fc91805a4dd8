"""Tests of diffkernel.simulate: the simulated pairs must match their stated truth exactly."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from diffkernel.errors import ConfigError
from diffkernel.image import Exposure
from diffkernel.simulate import PairTruth, make_pair, sampled_gaussian

SHAPE = (200, 256)  # not square, so a swap of x and y shows


@pytest.fixture(scope="module")
def clean_pair():
    return make_pair(SHAPE, seed=3, noise=False)


@pytest.fixture(scope="module")
def noisy_pair():
    return make_pair((256, 256), seed=4)


def explicit_convolution(kernel: np.ndarray, scene: np.ndarray, x: int, y: int) -> float:
    """output[y, x] = sum_{j,i} K[j, i] T[y - (j - h), x - (i - h)], literally."""
    h = kernel.shape[0] // 2
    total = 0.0
    for j in range(kernel.shape[0]):
        for i in range(kernel.shape[1]):
            total += kernel[j, i] * scene[y - (j - h), x - (i - h)]
    return total


def test_types_shapes_and_dtypes(clean_pair):
    for exp in (clean_pair.template, clean_pair.science):
        assert isinstance(exp, Exposure)
        mi = exp.masked_image
        assert mi.shape == SHAPE
        assert mi.image.dtype == np.float64
        assert mi.variance.dtype == np.float64
        assert mi.mask.dtype == np.int32
        assert np.all(np.isfinite(mi.image))
        assert np.all(mi.variance > 0)
        mi.validate()
    truth = clean_pair.truth
    assert isinstance(truth, PairTruth)
    assert truth.template_model.shape == SHAPE
    assert truth.science_model.shape == SHAPE
    h = truth.half_size
    assert truth.template_padded.shape == (SHAPE[0] + 2 * h, SHAPE[1] + 2 * h)
    assert isinstance(truth.sources, Table)
    assert truth.sources.colnames == [
        "id",
        "x",
        "y",
        "flux_template",
        "flux_science",
        "variable",
        "saturated",
    ]
    assert len(truth.sources) == round(4e-3 * SHAPE[0] * SHAPE[1])


def test_deterministic_for_equal_seeds():
    a = make_pair((96, 96), seed=11, n_stars=40, n_variable=3)
    b = make_pair((96, 96), seed=11, n_stars=40, n_variable=3)
    c = make_pair((96, 96), seed=12, n_stars=40, n_variable=3)
    for name in ("template", "science"):
        ma, mb, mc = (getattr(p, name).masked_image for p in (a, b, c))
        np.testing.assert_array_equal(ma.image, mb.image)
        np.testing.assert_array_equal(ma.variance, mb.variance)
        np.testing.assert_array_equal(ma.mask, mb.mask)
        assert not np.array_equal(ma.image, mc.image)
    for col in a.truth.sources.colnames:
        np.testing.assert_array_equal(a.truth.sources[col], b.truth.sources[col])
    assert not np.array_equal(a.truth.sources["x"], c.truth.sources["x"])


def test_stars_keep_margin_and_fluxes_in_range(clean_pair):
    src = clean_pair.truth.sources
    margin = clean_pair.truth.half_size + 2
    ny, nx = SHAPE
    assert np.all((src["x"] >= margin) & (src["x"] <= nx - 1 - margin))
    assert np.all((src["y"] >= margin) & (src["y"] <= ny - 1 - margin))
    assert np.all((src["flux_template"] >= 200.0) & (src["flux_template"] <= 2e5))
    np.testing.assert_allclose(src["flux_science"], src["flux_template"])


def test_template_model_is_sky_plus_stars(clean_pair):
    truth = clean_pair.truth
    src = truth.sources
    star_flux = truth.template_padded.sum() - truth.template_sky * truth.template_padded.size
    np.testing.assert_allclose(star_flux, np.sum(src["flux_template"]), rtol=1e-9)
    np.testing.assert_array_equal(clean_pair.template.masked_image.image, truth.template_model)
    # The brightest star's peak lies on its rounded position.
    k = int(np.argmax(src["flux_template"]))
    xi, yi = int(round(src["x"][k])), int(round(src["y"][k]))
    stamp = truth.template_model[yi - 2 : yi + 3, xi - 2 : xi + 3]
    assert stamp[2, 2] == stamp.max()


def test_kernel_truth(clean_pair):
    truth = clean_pair.truth
    g_a, g_b = truth.basis_kernels
    assert g_a.shape == g_b.shape == (21, 21)
    np.testing.assert_allclose([g_a.sum(), g_b.sum()], 1.0, rtol=1e-14)
    assert g_a[10, 10] == g_a.max()
    ny, nx = SHAPE
    for x, y in [(0, 0), (nx - 1, 0), (0, ny - 1), (nx - 1, ny - 1), (100.5, 37.25)]:
        k = truth.kernel_at(x, y)
        assert k.shape == (21, 21)
        np.testing.assert_allclose(k.sum(), truth.flux_scale, rtol=1e-13)
        assert truth.kernel_sum_at(x, y) == truth.flux_scale
        w = float(truth.weight(x, y))
        np.testing.assert_allclose(k, truth.flux_scale * (w * g_a + (1 - w) * g_b), rtol=1e-14)
        np.testing.assert_allclose(k, k[::-1, ::-1], rtol=1e-14)
    c0, c1, c2 = truth.weight_coeffs
    # x is the column: w at the top-right corner (x = nx - 1, y = 0) is c0 + c1 - c2.
    np.testing.assert_allclose(truth.weight(nx - 1, 0), c0 + c1 - c2)
    grid = truth.weight(np.arange(nx)[None, :], np.arange(ny)[:, None])
    assert grid.shape == SHAPE
    assert 0.39 < grid.min() and grid.max() < 0.91


def test_kernel_scaled_by_flux_scale():
    pair = make_pair((96, 96), seed=2, n_stars=20, flux_scale=2.5, noise=False)
    np.testing.assert_allclose(pair.truth.kernel_at(40, 50).sum(), 2.5, rtol=1e-13)
    src = pair.truth.sources
    np.testing.assert_allclose(src["flux_science"], 2.5 * src["flux_template"])


def test_noise_free_science_is_the_explicit_kernel_sum(clean_pair):
    truth = clean_pair.truth
    science = clean_pair.science.masked_image.image
    np.testing.assert_array_equal(science, truth.science_model)
    h = truth.half_size
    ny, nx = SHAPE
    tmpl = truth.template_model
    interior = np.zeros(SHAPE, dtype=bool)
    interior[2 * h : ny - 2 * h, 2 * h : nx - 2 * h] = True
    # Three pixels far from stars (faintest template pixels) and three on bright stars.
    faint = np.argsort(np.where(interior, tmpl, np.inf), axis=None)[:3]
    pixels = [(int(i % nx), int(i // nx)) for i in faint]
    src = truth.sources
    for k in np.argsort(src["flux_template"])[::-1][:3]:
        pixels.append((int(round(src["x"][k])), int(round(src["y"][k]))))
    for x, y in pixels:
        kernel = truth.kernel_at(x, y)
        expected = explicit_convolution(kernel, truth.science_scene_padded, x + h, y + h)
        expected += float(truth.background(x, y))
        np.testing.assert_allclose(science[y, x], expected, rtol=1e-10)
        # Well inside the image the unpadded template gives the same sum.
        if h <= x < nx - h and h <= y < ny - h:
            direct = explicit_convolution(kernel, tmpl, x, y) + float(truth.background(x, y))
            np.testing.assert_allclose(science[y, x], direct, rtol=1e-10)


def test_noise_free_science_at_the_corners(clean_pair):
    """The padded canvas makes even corner pixels exact."""
    truth = clean_pair.truth
    h = truth.half_size
    ny, nx = SHAPE
    for x, y in [(0, 0), (nx - 1, 0), (0, ny - 1), (nx - 1, ny - 1)]:
        expected = explicit_convolution(
            truth.kernel_at(x, y), truth.science_scene_padded, x + h, y + h
        ) + float(truth.background(x, y))
        np.testing.assert_allclose(truth.science_model[y, x], expected, rtol=1e-10)


def test_background_truth(clean_pair):
    truth = clean_pair.truth
    ny, nx = SHAPE
    c0, c1, c2 = truth.background_coeffs
    np.testing.assert_allclose(truth.background((nx - 1) / 2, (ny - 1) / 2), c0, atol=1e-12)
    np.testing.assert_allclose(truth.background(0, ny - 1), c0 - c1 + c2)
    xs = np.array([0.0, 10.0, 255.0])
    ys = np.array([199.0, 50.0, 0.0])
    assert truth.background(xs, ys).shape == (3,)


def test_variance_is_the_model_variance(noisy_pair):
    truth = noisy_pair.truth
    for exp, model in (
        (noisy_pair.template, truth.template_model),
        (noisy_pair.science, truth.science_model),
    ):
        expected = model / truth.gain + (truth.read_noise / truth.gain) ** 2
        np.testing.assert_allclose(exp.masked_image.variance, expected, rtol=1e-14)
        assert np.all(exp.masked_image.variance > 0)


def test_noise_variance_is_the_same_without_noise():
    kwargs = {"seed": 5, "n_stars": 30}
    noisy = make_pair((96, 96), **kwargs)
    clean = make_pair((96, 96), noise=False, **kwargs)
    for name in ("template", "science"):
        np.testing.assert_array_equal(
            getattr(noisy, name).masked_image.variance, getattr(clean, name).masked_image.variance
        )


def test_noise_residuals_are_standard(noisy_pair):
    truth = noisy_pair.truth
    n = truth.science_model.size
    for exp, model in (
        (noisy_pair.template, truth.template_model),
        (noisy_pair.science, truth.science_model),
    ):
        mi = exp.masked_image
        z = (mi.image - model) / np.sqrt(mi.variance)
        # 65536 pixels: the mean's standard error is 0.004 and the std's about 0.003.
        assert abs(z.mean()) < 5 / np.sqrt(n)
        assert abs(z.std() - 1.0) < 0.015
    # Template and science noise are independent.
    zt = (noisy_pair.template.masked_image.image - truth.template_model).ravel()
    zs = (noisy_pair.science.masked_image.image - truth.science_model).ravel()
    assert abs(np.corrcoef(zt, zs)[0, 1]) < 5 / np.sqrt(n)


def test_saturation_clips_and_flags():
    saturation = 6000.0
    pair = make_pair((160, 160), seed=6, n_stars=60, saturation=saturation, n_saturated=3)
    truth = pair.truth
    src = truth.sources
    assert int(np.sum(src["saturated"])) == 3
    for exp in (pair.template, pair.science):
        mi = exp.masked_image
        sat = mi.plane("SAT")
        assert np.all(mi.image <= saturation)
        np.testing.assert_array_equal(mi.image[sat], saturation)
        assert np.all(mi.image[~sat] < saturation)
        assert exp.meta["SATURATE"] == saturation
    sci_sat = pair.science.masked_image.plane("SAT")
    tmpl_sat = pair.template.masked_image.plane("SAT")
    assert sci_sat.any()
    for row in src[src["saturated"]]:
        xi, yi = int(round(row["x"])), int(round(row["y"]))
        assert sci_sat[yi, xi], "designated star does not saturate the science image"
        assert not tmpl_sat[yi - 3 : yi + 4, xi - 3 : xi + 4].any()
        assert row["flux_science"] > truth.flux_scale * row["flux_template"]
        assert truth.template_model[yi - 3 : yi + 4, xi - 3 : xi + 4].max() < saturation
        assert truth.science_model[yi, xi] > saturation


def test_saturation_without_noise_flags_exactly_the_model():
    saturation = 3000.0
    pair = make_pair((128, 128), seed=7, n_stars=80, noise=False, saturation=saturation)
    for exp, model in (
        (pair.template, pair.truth.template_model),
        (pair.science, pair.truth.science_model),
    ):
        sat = exp.masked_image.plane("SAT")
        np.testing.assert_array_equal(sat, model >= saturation)
        np.testing.assert_array_equal(exp.masked_image.image, np.minimum(model, saturation))


def test_variables_scale_science_flux():
    amp = 0.8
    pair = make_pair(
        (160, 160), seed=8, n_stars=50, n_variable=5, variable_amplitude=amp, flux_scale=1.3
    )
    truth = pair.truth
    src = truth.sources
    var = np.asarray(src["variable"])
    assert var.sum() == 5
    np.testing.assert_allclose(
        src["flux_science"][var], truth.flux_scale * (1 + amp) * src["flux_template"][var]
    )
    np.testing.assert_allclose(
        src["flux_science"][~var], truth.flux_scale * src["flux_template"][~var]
    )
    # The extra scene flux is exactly the variables' extra flux, at their positions.
    extra = truth.science_scene_padded - truth.template_padded
    np.testing.assert_allclose(extra.sum(), amp * np.sum(src["flux_template"][var]), rtol=1e-9)
    h = truth.half_size
    near = np.zeros(extra.shape, dtype=bool)
    for row in src[var]:
        yi, xi = int(round(row["y"])) + h, int(round(row["x"])) + h
        near[yi - 10 : yi + 11, xi - 10 : xi + 11] = True
    assert np.all(extra[~near] == 0)
    assert np.all(extra >= 0)


def test_variables_and_saturated_are_distinct():
    pair = make_pair(
        (128, 128), seed=9, n_stars=20, n_variable=8, n_saturated=8, saturation=5e4, noise=False
    )
    src = pair.truth.sources
    assert not np.any(src["variable"] & src["saturated"])
    assert src["variable"].sum() == 8 and src["saturated"].sum() == 8


def test_psf_fwhm():
    sigma_t = 3.0 / 2.354820045
    pair = make_pair((96, 96), seed=1, n_stars=10, kernel_weight=(1.0,), noise=False)
    assert pair.template.psf_fwhm == 3.0
    # With w = 1 the science PSF is one Gaussian of variance sigma_t^2 + sigma_a^2.
    expected = 2.354820045 * np.sqrt(sigma_t**2 + 1.5**2)
    np.testing.assert_allclose(pair.science.psf_fwhm, expected, rtol=1e-6)
    default = make_pair((96, 96), seed=1, n_stars=10, noise=False)
    truth = default.truth
    assert default.science.psf_fwhm == truth.science_fwhm_at(47.5, 47.5)
    broad = 2.354820045 * np.sqrt(sigma_t**2 + 3.0**2)
    assert expected < default.science.psf_fwhm < broad


def test_wcs():
    pair = make_pair((64, 80), seed=1, n_stars=5, wcs=True)
    wt, ws = pair.template.wcs, pair.science.wcs
    assert wt is not None and ws is not None
    assert wt.wcs.ctype[0] == "RA---TAN"
    scale = np.abs(wt.proj_plane_pixel_scales()[0].to_value("arcsec"))
    np.testing.assert_allclose(scale, 0.26)
    np.testing.assert_allclose(wt.pixel_to_world_values(10, 20), ws.pixel_to_world_values(10, 20))
    assert make_pair((64, 64), seed=1, n_stars=5).template.wcs is None


def test_sampled_gaussian():
    g = sampled_gaussian(7, 1.0)
    np.testing.assert_allclose(g.sum(), 1.0)
    np.testing.assert_allclose(g[3, 4] / g[3, 3], np.exp(-0.5))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kernel_size": 20},
        {"kernel_size": 1},
        {"shape": (20, 200)},
        {"n_saturated": 2},
        {"gain": 0.0},
        {"read_noise": -1.0},
        {"flux_range": (0.0, 10.0)},
        {"kernel_weight": (1.0, 2.0)},
        {"background": (1.0, np.nan, 0.0)},
        {"kernel_sigmas": (1.0, -1.0)},
        {"variable_amplitude": -1.0},
        {"n_stars": 3, "n_variable": 4},
        {"template_sky": 0.0, "background": (-10.0,)},
        {"saturation": 500.0, "n_saturated": 1},
    ],
)
def test_bad_parameters_raise(kwargs):
    kwargs = {"shape": (96, 96), "n_stars": 10, **kwargs}
    with pytest.raises(ConfigError):
        make_pair(**kwargs)
