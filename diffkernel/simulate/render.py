"""Rendering a simulated star field: polynomials over the image, pixel-integrated
Gaussian stars, flux draws, noise and a simple WCS (see :mod:`diffkernel.simulate`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from astropy.wcs import WCS
from scipy import special

from ..errors import ConfigError

__all__ = [
    "sampled_gaussian",
    "FWHM_PER_SIGMA",
    "STAMP_SIGMAS",
    "STAR_BATCH",
    "PIXEL_SCALE_ARCSEC",
    "WCS_CENTER_DEG",
    "poly_terms",
    "poly_eval",
    "check_coeffs",
    "integrated_profiles",
    "add_stars",
    "draw_fluxes",
    "noisy",
    "simple_wcs",
]


FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Half-width of a star stamp in template PSF sigmas; the flux beyond it is < 1e-8.
STAMP_SIGMAS = 6.0
#: Stars rendered per batch, to bound the memory of the vectorized stamps.
STAR_BATCH = 8192
#: Pixel scale of the optional WCS, arcsec per pixel, and its tangent point (deg).
PIXEL_SCALE_ARCSEC = 0.26
WCS_CENTER_DEG = (150.1, 2.2)


def poly_terms(xn: np.ndarray, yn: np.ndarray, n_terms: int) -> list:
    """Return the first ``n_terms`` of ``1, xn, yn, xn**2, xn*yn, yn**2``.

    Terms are left unbroadcast (``xn`` of shape ``(1, nx)`` and ``yn`` of shape
    ``(ny, 1)`` stay small), so evaluating on a full grid costs one output array.
    """
    xn = np.asarray(xn, dtype=float)
    yn = np.asarray(yn, dtype=float)
    terms = [1.0, xn, yn, xn * xn, xn * yn, yn * yn]
    return terms[:n_terms]


def poly_eval(coeffs: np.ndarray, xn: np.ndarray, yn: np.ndarray) -> np.ndarray:
    """Evaluate the polynomial of ``coeffs`` (see :func:`poly_terms`) at ``(xn, yn)``."""
    xn = np.asarray(xn, dtype=float)
    yn = np.asarray(yn, dtype=float)
    out = np.zeros(np.broadcast_shapes(xn.shape, yn.shape))
    for c, t in zip(coeffs, poly_terms(xn, yn, len(coeffs)), strict=True):
        out += c * t
    return out


def check_coeffs(name: str, coeffs: Sequence[float]) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(coeffs, dtype=float))
    if arr.ndim != 1 or arr.size not in (1, 3, 6) or not np.all(np.isfinite(arr)):
        raise ConfigError(
            f"{name} must be 1, 3 or 6 finite coefficients (terms 1, xn, yn, xn^2, xn*yn, "
            f"yn^2), got {coeffs!r}"
        )
    return arr


def sampled_gaussian(size: int, sigma: float) -> np.ndarray:
    """Circular Gaussian sampled at integer offsets, normalized to sum 1.

    Parameters
    ----------
    size : int
        Odd side of the square grid; the centre is ``[size // 2, size // 2]``.
    sigma : float
        Gaussian width in pixels.

    Returns
    -------
    numpy.ndarray
        ``(size, size)`` array summing to 1 (to rounding).
    """
    h = size // 2
    g = np.exp(-0.5 * (np.arange(-h, h + 1, dtype=float) / sigma) ** 2)
    g /= g.sum()
    return np.outer(g, g)


def integrated_profiles(centres: np.ndarray, first: np.ndarray, n: int, sigma: float):
    """1-D pixel-integrated unit Gaussians: ``(len(centres), n)``.

    Pixel ``first + k`` covers ``[first + k - 0.5, first + k + 0.5]``.
    """
    edges = first[:, None] + np.arange(n + 1, dtype=float)[None, :] - 0.5
    cdf = special.ndtr((edges - centres[:, None]) / sigma)
    return np.diff(cdf, axis=1)


def add_stars(
    canvas: np.ndarray, x: np.ndarray, y: np.ndarray, flux: np.ndarray, sigma: float
) -> None:
    """Add pixel-integrated Gaussian stars at canvas coordinates ``(x, y)`` in place."""
    radius = int(math.ceil(STAMP_SIGMAS * sigma)) + 1
    n = 2 * radius + 1
    ny, nx = canvas.shape
    flat = canvas.reshape(-1)
    offs = np.arange(n)
    for start in range(0, len(x), STAR_BATCH):
        sl = slice(start, start + STAR_BATCH)
        x0 = np.rint(x[sl]) - radius
        y0 = np.rint(y[sl]) - radius
        px = integrated_profiles(x[sl], x0, n, sigma)
        py = integrated_profiles(y[sl], y0, n, sigma) * flux[sl, None]
        stamps = py[:, :, None] * px[:, None, :]
        cols = x0.astype(np.int64)[:, None] + offs[None, :]
        rows = y0.astype(np.int64)[:, None] + offs[None, :]
        inside = ((rows >= 0) & (rows < ny))[:, :, None] & ((cols >= 0) & (cols < nx))[:, None, :]
        idx = rows[:, :, None] * nx + cols[:, None, :]
        flat += np.bincount(idx[inside], weights=stamps[inside], minlength=flat.size)


def draw_fluxes(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float):
    """Bounded power law with ``N(>F) ~ F**-slope`` between ``lo`` and ``hi``."""
    u = rng.random(n)
    a, b = lo**-slope, hi**-slope
    return (a - u * (a - b)) ** (-1.0 / slope)


def noisy(
    rng: np.random.Generator, model: np.ndarray, gain: float, read_noise: float
) -> np.ndarray:
    electrons = rng.poisson(model * gain).astype(np.float64)
    if read_noise > 0:
        electrons += rng.normal(0.0, read_noise, size=model.shape)
    return electrons / gain


def simple_wcs(shape: tuple[int, int]) -> WCS:
    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(WCS_CENTER_DEG)
    wcs.wcs.crpix = [(nx + 1) / 2.0, (ny + 1) / 2.0]
    scale = PIXEL_SCALE_ARCSEC / 3600.0
    wcs.wcs.cdelt = [-scale, scale]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.radesys = "ICRS"
    wcs.pixel_shape = (nx, ny)
    return wcs
