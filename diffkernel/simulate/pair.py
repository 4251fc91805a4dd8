"""The simulated pair and its truth (see :mod:`diffkernel.simulate` for the model)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from astropy.table import Table
from scipy import optimize, signal

from ..errors import ConfigError
from ..image import DEFAULT_MASK_PLANES, Exposure, MaskedImage
from .render import (
    FWHM_PER_SIGMA,
    STAMP_SIGMAS,
    add_stars,
    check_coeffs,
    draw_fluxes,
    integrated_profiles,
    noisy,
    poly_eval,
    sampled_gaussian,
    simple_wcs,
)

__all__ = ["PairTruth", "SimulatedPair", "make_pair"]


@dataclass
class PairTruth:
    """Everything known exactly about a simulated pair.

    Attributes
    ----------
    shape : tuple of int
        ``(ny, nx)`` of both images.
    kernel_size : int
        Side of the matching kernel grid (odd).
    kernel_sigmas : tuple of float
        Widths of the two sampled Gaussians ``G_a``, ``G_b``.
    weight_coeffs : numpy.ndarray
        Polynomial coefficients of ``w(x, y)``, the weight of ``G_a``.
    flux_scale : float
        Kernel sum (photometric scaling), the same everywhere.
    background_coeffs : numpy.ndarray
        Polynomial coefficients of the differential background ``b(x, y)``.
    template_fwhm : float
        FWHM of the template's continuous Gaussian PSF, pixels.
    template_sky : float
        Flat sky of the template scene, ADU.
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise, electrons.
    saturation : float or None
        Saturation level, ADU, or None.
    sources : astropy.table.Table
        One row per star: ``id``, ``x``, ``y`` (0-based column and row),
        ``flux_template``, ``flux_science`` (total flux in each noise-free image,
        ADU), ``variable`` (science flux raised by the variability amplitude) and
        ``saturated`` (made to saturate the science image only).
    template_padded : numpy.ndarray
        Noise-free template scene ``T0`` on the canvas padded by ``kernel_size // 2``.
    science_scene_padded : numpy.ndarray
        The scene the kernel convolves to make the science image: ``T0`` plus the
        extra science flux of variable and saturating stars (same canvas).
    science_model : numpy.ndarray
        Noise-free, unclipped science image.
    """

    shape: tuple[int, int]
    kernel_size: int
    kernel_sigmas: tuple[float, float]
    weight_coeffs: np.ndarray
    flux_scale: float
    background_coeffs: np.ndarray
    template_fwhm: float
    template_sky: float
    gain: float
    read_noise: float
    saturation: float | None
    sources: Table
    template_padded: np.ndarray = field(repr=False)
    science_scene_padded: np.ndarray = field(repr=False)
    science_model: np.ndarray = field(repr=False)

    @property
    def half_size(self) -> int:
        """Kernel half-width ``h = kernel_size // 2`` (also the canvas padding)."""
        return self.kernel_size // 2

    @property
    def template_model(self) -> np.ndarray:
        """Noise-free, unclipped template image (a view into :attr:`template_padded`)."""
        h = self.half_size
        ny, nx = self.shape
        return self.template_padded[h : h + ny, h : h + nx]

    @property
    def basis_kernels(self) -> tuple[np.ndarray, np.ndarray]:
        """The two unit-sum sampled Gaussians ``(G_a, G_b)``."""
        return (
            sampled_gaussian(self.kernel_size, self.kernel_sigmas[0]),
            sampled_gaussian(self.kernel_size, self.kernel_sigmas[1]),
        )

    def normalized(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map pixel ``(x, y)`` to the normalized coordinates ``(xn, yn)`` in [-1, 1]."""
        ny, nx = self.shape
        xn = 2.0 * np.asarray(x, dtype=float) / (nx - 1) - 1.0
        yn = 2.0 * np.asarray(y, dtype=float) / (ny - 1) - 1.0
        return xn, yn

    def weight(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Weight ``w(x, y)`` of ``G_a`` in the kernel (vectorized)."""
        return poly_eval(self.weight_coeffs, *self.normalized(x, y))

    def kernel_at(self, x: float, y: float) -> np.ndarray:
        """The exact matching kernel ``K_xy`` at pixel ``(x, y)``.

        Parameters
        ----------
        x, y : float
            Column and row (0-based); need not be integers.

        Returns
        -------
        numpy.ndarray
            ``(kernel_size, kernel_size)`` kernel, centred on ``[h, h]``.
        """
        w = float(self.weight(x, y))
        g_a, g_b = self.basis_kernels
        return self.flux_scale * (w * g_a + (1.0 - w) * g_b)

    def kernel_sum_at(self, x: float, y: float) -> float:
        """Kernel sum at ``(x, y)``: ``flux_scale`` everywhere, by construction."""
        return float(self.flux_scale)

    def background(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Differential background ``b(x, y)`` of the science image (vectorized)."""
        return poly_eval(self.background_coeffs, *self.normalized(x, y))

    def science_fwhm_at(self, x: float, y: float) -> float:
        """FWHM of the science PSF at ``(x, y)``, pixels.

        Computed numerically: the continuous template Gaussian (before pixel
        integration, like ``template_fwhm``) convolved with the discrete kernel
        ``K_xy`` is evaluated along the row through its centre, and the half-maximum
        radius found by root finding; the FWHM is twice that radius.
        """
        kernel = self.kernel_at(x, y)
        h = self.half_size
        sigma_t = self.template_fwhm / FWHM_PER_SIGMA
        offs = np.arange(-h, h + 1, dtype=float)

        def profile(r: float) -> float:
            gx = np.exp(-0.5 * ((r - offs) / sigma_t) ** 2)
            gy = np.exp(-0.5 * (offs / sigma_t) ** 2)
            return float(gy @ kernel @ gx)

        half = 0.5 * profile(0.0)
        step = 0.25 * sigma_t
        r_hi = step
        while profile(r_hi) > half:
            r_hi += step
            if r_hi > 10.0 * (h + self.template_fwhm):
                return float("nan")
        r_half = optimize.brentq(lambda r: profile(r) - half, r_hi - step, r_hi, xtol=1e-10)
        return 2.0 * float(r_half)


@dataclass
class SimulatedPair:
    """A simulated template/science pair and its truth.

    Attributes
    ----------
    template : Exposure
        Template exposure (``psf_fwhm`` = ``template_fwhm``).
    science : Exposure
        Science exposure (``psf_fwhm`` = science PSF FWHM at the image centre).
    truth : PairTruth
        The exact kernel, background, sources and noise-free models.
    """

    template: Exposure
    science: Exposure
    truth: PairTruth


def make_pair(
    shape: tuple[int, int] = (512, 512),
    *,
    seed: int = 0,
    n_stars: int | None = None,
    star_density: float = 4e-3,
    template_fwhm: float = 3.0,
    kernel_sigmas: tuple[float, float] = (1.5, 3.0),
    kernel_weight: Sequence[float] = (0.65, 0.15, -0.10),
    flux_scale: float = 1.0,
    background: Sequence[float] = (5.0, 2.0, -3.0),
    template_sky: float = 1000.0,
    gain: float = 2.0,
    read_noise: float = 5.0,
    template_depth: float = 1.0,
    noise: bool = True,
    flux_range: tuple[float, float] = (200.0, 2e5),
    flux_slope: float = 1.5,
    saturation: float | None = None,
    n_saturated: int = 0,
    n_variable: int = 0,
    variable_amplitude: float = 0.5,
    kernel_size: int = 21,
    wcs: bool = False,
) -> SimulatedPair:
    """Simulate a template/science pair related by a known spatially varying kernel.

    See the module docstring for the exact truth model. Everything is deterministic
    for a given ``seed``; star positions and fluxes, the choice of variable and
    saturating stars, and each image's noise use independent streams spawned from it.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of both images.
    seed : int
        Seed of :func:`numpy.random.default_rng` (via :class:`numpy.random.SeedSequence`).
    n_stars : int, optional
        Number of stars; default ``round(star_density * ny * nx)``.
    star_density : float
        Stars per pixel when ``n_stars`` is None.
    template_fwhm : float
        FWHM of the template's circular Gaussian PSF, pixels.
    kernel_sigmas : tuple of float
        Widths ``(sigma_a, sigma_b)`` of the kernel's two sampled Gaussians, pixels.
    kernel_weight : sequence of float
        1, 3 or 6 coefficients of ``w(x, y)``, the weight of ``G_a``; the default
        gives ``w`` between 0.4 and 0.9 across the image.
    flux_scale : float
        Kernel sum: science flux over template flux.
    background : sequence of float
        1, 3 or 6 coefficients of the differential background added to the science
        image, ADU; its constant term is the science sky offset.
    template_sky : float
        Flat sky of the template, ADU (the science sky is ``flux_scale`` times it
        plus the background).
    gain : float
        Electrons per ADU (> 0).
    read_noise : float
        Read noise in electrons (>= 0).
    template_depth : float
        The template is the mean of this many exposures (a coadd, as survey
        templates are): its variance is divided by ``template_depth`` (effective
        gain ``gain * depth``, read noise ``read_noise * sqrt(depth)`` electrons).
    noise : bool
        Add Poisson and read noise. The variance plane is the same either way.
    flux_range : tuple of float
        ``(min, max)`` template star fluxes, ADU.
    flux_slope : float
        Power-law slope: ``N(>F)`` is proportional to ``F**-flux_slope``.
    saturation : float, optional
        Saturation level, ADU: pixels above it are clipped to it and flagged ``SAT``,
        in each image independently.
    n_saturated : int
        Stars made to saturate the science image only (requires ``saturation``):
        their template peak is set to half-way between the sky and ``saturation``,
        and their science flux raised so the science peak is twice as far above the
        local sky as ``saturation``.
    n_variable : int
        Stars whose science flux is ``(1 + variable_amplitude)`` times the
        kernel-matched template flux.
    variable_amplitude : float
        Fractional flux change of variable stars (> -1).
    kernel_size : int
        Odd side of the matching kernel; ``kernel_size // 2`` is also the padding
        of the rendering canvas and the margin (plus 2 px) that star centres keep
        from the image edges.
    wcs : bool
        Attach the same TAN WCS (0.26 arcsec/px) to both exposures.

    Returns
    -------
    SimulatedPair
        ``template`` and ``science`` exposures and the :class:`PairTruth`.

    Raises
    ------
    ConfigError
        If a parameter is out of range, or the model would be negative (so Poisson
        noise is undefined) or have a non-positive variance.

    Examples
    --------
    >>> pair = make_pair((128, 128), seed=1, n_stars=50)
    >>> pair.truth.kernel_at(64, 64).shape
    (21, 21)
    """
    ny, nx, h = _check_params(
        shape,
        n_stars,
        star_density,
        template_fwhm,
        kernel_sigmas,
        flux_scale,
        gain,
        read_noise,
        flux_range,
        flux_slope,
        saturation,
        n_saturated,
        n_variable,
        variable_amplitude,
        kernel_size,
    )
    weight_coeffs = check_coeffs("kernel_weight", kernel_weight)
    bg_coeffs = check_coeffs("background", background)
    if n_stars is None:
        n_stars = int(round(star_density * ny * nx))
    if n_saturated + n_variable > n_stars:
        raise ConfigError(
            f"n_saturated + n_variable = {n_saturated + n_variable} exceeds n_stars = {n_stars}"
        )
    rng_stars, rng_pick, rng_tmpl, rng_sci = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)
    )
    sigma_t = template_fwhm / FWHM_PER_SIGMA

    # Star centres keep h + 2 px from every edge so whole stamps land in both images.
    margin = h + 2
    x = rng_stars.uniform(margin, nx - 1 - margin, n_stars)
    y = rng_stars.uniform(margin, ny - 1 - margin, n_stars)
    flux_t = draw_fluxes(rng_stars, n_stars, flux_range[0], flux_range[1], flux_slope)
    picked = rng_pick.choice(n_stars, n_saturated + n_variable, replace=False)
    sat_idx = np.sort(picked[:n_saturated])
    var_idx = np.sort(picked[n_saturated:])
    extra = np.zeros(n_stars)
    extra[var_idx] = variable_amplitude * flux_t[var_idx]

    truth = PairTruth(
        shape=(ny, nx),
        kernel_size=kernel_size,
        kernel_sigmas=(float(kernel_sigmas[0]), float(kernel_sigmas[1])),
        weight_coeffs=weight_coeffs,
        flux_scale=float(flux_scale),
        background_coeffs=bg_coeffs,
        template_fwhm=float(template_fwhm),
        template_sky=float(template_sky),
        gain=float(gain),
        read_noise=float(read_noise),
        saturation=None if saturation is None else float(saturation),
        sources=Table(),
        template_padded=np.empty((0, 0)),
        science_scene_padded=np.empty((0, 0)),
        science_model=np.empty((0, 0)),
    )
    if n_saturated:
        flux_t[sat_idx], extra[sat_idx] = _saturating_fluxes(truth, x[sat_idx], y[sat_idx], sigma_t)

    # Render on the padded canvas: image pixel (x, y) is canvas pixel (x + h, y + h).
    canvas_shape = (ny + 2 * h, nx + 2 * h)
    template_padded = np.full(canvas_shape, float(template_sky))
    add_stars(template_padded, x + h, y + h, flux_t, sigma_t)
    if np.any(extra != 0):
        scene = template_padded.copy()
        has = extra != 0
        add_stars(scene, x[has] + h, y[has] + h, extra[has], sigma_t)
    else:
        scene = template_padded

    # K is linear in w, so the varying convolution is a w-weighted sum of two fixed ones.
    g_a, g_b = truth.basis_kernels
    conv_a = signal.fftconvolve(scene, g_a, mode="valid")
    conv_b = signal.fftconvolve(scene, g_b, mode="valid")
    xn, yn = truth.normalized(np.arange(nx)[None, :], np.arange(ny)[:, None])
    w = poly_eval(weight_coeffs, xn, yn)
    science_model = conv_b
    science_model += w * (conv_a - conv_b)
    science_model *= flux_scale
    science_model += poly_eval(bg_coeffs, xn, yn)
    del conv_a, w

    truth.template_padded = template_padded
    truth.science_scene_padded = scene
    truth.science_model = science_model
    template_model = truth.template_model

    images = {}
    if not template_depth >= 1.0:
        raise ConfigError(f"template_depth must be >= 1 exposure, got {template_depth!r}")
    for name, model, rng, g, rn in (
        (
            "template",
            template_model,
            rng_tmpl,
            gain * template_depth,
            read_noise * np.sqrt(template_depth),
        ),
        ("science", science_model, rng_sci, gain, read_noise),
    ):
        if noise and model.min() < 0:
            raise ConfigError(
                f"the noise-free {name} model reaches {model.min():.3g} ADU < 0, so Poisson "
                "noise is undefined; raise template_sky or change background"
            )
        variance = np.maximum(model, 0.0) / g + (rn / g) ** 2
        if variance.min() <= 0:
            raise ConfigError(
                f"the {name} variance is zero where its model is 0; set read_noise > 0 "
                "or raise template_sky"
            )
        pixels = noisy(rng, model, g, rn) if noise else model.copy()
        sat = np.zeros(model.shape, dtype=bool)
        if saturation is not None:
            sat = pixels >= saturation
            pixels[sat] = saturation
        masked = MaskedImage(pixels, variance, None, dict(DEFAULT_MASK_PLANES))
        masked.set_plane("SAT", sat)
        images[name] = masked

    flux_s = flux_scale * (flux_t + extra)
    truth.sources = Table(
        {
            "id": np.arange(n_stars, dtype=np.int64),
            "x": x,
            "y": y,
            "flux_template": flux_t,
            "flux_science": flux_s,
            "variable": np.isin(np.arange(n_stars), var_idx),
            "saturated": np.isin(np.arange(n_stars), sat_idx),
        }
    )

    the_wcs = simple_wcs((ny, nx)) if wcs else None
    meta = {"GAIN": float(gain), "RDNOISE": float(read_noise), "SIMULATED": True}
    if saturation is not None:
        meta["SATURATE"] = float(saturation)
    template = Exposure(images["template"], the_wcs, float(template_fwhm), dict(meta))
    science_fwhm = truth.science_fwhm_at((nx - 1) / 2.0, (ny - 1) / 2.0)
    science = Exposure(
        images["science"], None if the_wcs is None else the_wcs.deepcopy(), science_fwhm, meta
    )
    return SimulatedPair(template, science, truth)


def _saturating_fluxes(
    truth: PairTruth, x: np.ndarray, y: np.ndarray, sigma_t: float
) -> tuple[np.ndarray, np.ndarray]:
    """Template flux and extra science flux making stars saturate the science only.

    The template peak (noise-free) is put half-way between the sky and saturation;
    the science peak, computed with the star's own sub-pixel position and the kernel
    at that position, is put at twice the distance of saturation above the local
    science sky.
    """
    sat = float(truth.saturation)  # type: ignore[arg-type]
    sky_t = truth.template_sky
    if sat <= sky_t:
        raise ConfigError(
            f"saturation {sat:g} is not above the template sky {sky_t:g}; raise saturation"
        )
    radius = int(math.ceil(STAMP_SIGMAS * sigma_t)) + 1
    n = 2 * radius + 1
    flux_t = np.empty(len(x))
    extra = np.empty(len(x))
    for k in range(len(x)):
        x0 = np.array([np.rint(x[k]) - radius])
        y0 = np.array([np.rint(y[k]) - radius])
        px = integrated_profiles(np.array([x[k]]), x0, n, sigma_t)[0]
        py = integrated_profiles(np.array([y[k]]), y0, n, sigma_t)[0]
        stamp = np.outer(py, px)
        peak_t = stamp.max()
        peak_s = signal.fftconvolve(stamp, truth.kernel_at(x[k], y[k]), mode="full").max()
        sky_s = truth.flux_scale * sky_t + float(truth.background(x[k], y[k]))
        if sat <= sky_s:
            raise ConfigError(
                f"saturation {sat:g} is not above the science sky {sky_s:g} at "
                f"({x[k]:.1f}, {y[k]:.1f}); raise saturation"
            )
        flux_t[k] = 0.5 * (sat - sky_t) / peak_t
        total = 2.0 * (sat - sky_s) / peak_s
        extra[k] = max(total - flux_t[k], 0.0)
    return flux_t, extra


def _check_params(
    shape,
    n_stars,
    star_density,
    template_fwhm,
    kernel_sigmas,
    flux_scale,
    gain,
    read_noise,
    flux_range,
    flux_slope,
    saturation,
    n_saturated,
    n_variable,
    variable_amplitude,
    kernel_size,
) -> tuple[int, int, int]:
    """Validate :func:`make_pair`'s parameters; return ``(ny, nx, h)``."""
    if int(kernel_size) != kernel_size or kernel_size < 3 or kernel_size % 2 == 0:
        raise ConfigError(f"kernel_size must be an odd integer >= 3, got {kernel_size!r}")
    h = int(kernel_size) // 2
    try:
        ny, nx = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ConfigError(f"shape must be (ny, nx), got {shape!r}") from None
    min_side = 2 * (h + 2) + 2
    if ny < min_side or nx < min_side:
        raise ConfigError(
            f"shape {shape!r} is too small for kernel_size {kernel_size}: each side must be "
            f">= {min_side} so stars can keep kernel_size // 2 + 2 px from the edges"
        )
    if n_stars is not None and (int(n_stars) != n_stars or n_stars < 0):
        raise ConfigError(f"n_stars must be a non-negative integer, got {n_stars!r}")
    if n_stars is None and not star_density >= 0:
        raise ConfigError(f"star_density must be >= 0, got {star_density!r}")
    if not template_fwhm > 0:
        raise ConfigError(f"template_fwhm must be > 0 pixels, got {template_fwhm!r}")
    if len(kernel_sigmas) != 2 or not all(s > 0 for s in kernel_sigmas):
        raise ConfigError(f"kernel_sigmas must be two widths > 0, got {kernel_sigmas!r}")
    if not (np.isfinite(flux_scale) and flux_scale > 0):
        raise ConfigError(f"flux_scale must be finite and > 0, got {flux_scale!r}")
    if not gain > 0:
        raise ConfigError(f"gain must be > 0 electrons/ADU, got {gain!r}")
    if not read_noise >= 0:
        raise ConfigError(f"read_noise must be >= 0 electrons, got {read_noise!r}")
    if len(flux_range) != 2 or not 0 < flux_range[0] <= flux_range[1]:
        raise ConfigError(f"flux_range must be (min, max) with 0 < min <= max, got {flux_range!r}")
    if not flux_slope > 0:
        raise ConfigError(f"flux_slope must be > 0, got {flux_slope!r}")
    for name, value in (("n_saturated", n_saturated), ("n_variable", n_variable)):
        if int(value) != value or value < 0:
            raise ConfigError(f"{name} must be a non-negative integer, got {value!r}")
    if n_saturated and saturation is None:
        raise ConfigError("n_saturated > 0 needs a saturation level; pass saturation=")
    if saturation is not None and not np.isfinite(saturation):
        raise ConfigError(f"saturation must be finite, got {saturation!r}")
    if not variable_amplitude > -1:
        raise ConfigError(f"variable_amplitude must be > -1, got {variable_amplitude!r}")
    return ny, nx, h
