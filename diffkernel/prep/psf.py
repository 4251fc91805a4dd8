"""PSF width of an exposure: from its PSF model on a grid, or measured from stars."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..image import Exposure
from ..kernel.basis import SIGMA_TO_FWHM

__all__ = ["exposure_fwhm", "measure_fwhm", "measure_pair_fwhm"]


def exposure_fwhm(exposure: Exposure, grid: int, buffer: float) -> float | None:
    """Mean PSF FWHM over a ``grid x grid`` lattice of the exposure, or None.

    The lattice leaves a margin of ``buffer`` times the image size on every side,
    as ip_diffim's ``fwhmExposureGrid`` and ``fwhmExposureBuffer`` do.

    Parameters
    ----------
    exposure : Exposure
        With ``psf_fwhm`` a constant or a function of ``(x, y)``.
    grid : int
        Points per axis (>= 1).
    buffer : float
        Fractional margin, ``0 <= buffer < 0.5``.
    """
    if exposure.psf_fwhm is None:
        return None
    if not callable(exposure.psf_fwhm):
        value = _as_fwhm(exposure.psf_fwhm)
    else:
        ny, nx = exposure.shape
        xs = np.linspace(buffer * (nx - 1), (1 - buffer) * (nx - 1), grid)
        ys = np.linspace(buffer * (ny - 1), (1 - buffer) * (ny - 1), grid)
        value = float(np.mean([exposure.fwhm_at(float(x), float(y)) for y in ys for x in xs]))
    if not (np.isfinite(value) and value > 0):
        # Silently ignoring it would give an unscaled basis (or overflow for inf).
        raise InputError(
            f"PSF FWHM of an exposure is {value!r} pixels; it must be a positive, finite number "
            "(set psf_fwhm to None to measure it from the stars)"
        )
    return value


def _as_fwhm(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InputError(
            f"PSF FWHM of an exposure must be a number of pixels, got {value!r}"
        ) from None


def measure_fwhm(stamps: np.ndarray, n_iter: int = 20) -> np.ndarray:
    """FWHM of the star in each stamp from Gaussian-weighted second moments.

    The weight is matched to the star iteratively (adaptive moments); for a
    Gaussian star the result is exact. The stamp's outer ring sets the background.

    Parameters
    ----------
    stamps : numpy.ndarray
        ``(N, S, S)`` stamps centred on stars.
    n_iter : int
        Adaptive iterations.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` FWHM in pixels; NaN where the moments do not converge.
    """
    n, s, _ = stamps.shape
    c = s // 2
    yy, xx = np.mgrid[0:s, 0:s] - c
    r2 = (xx**2 + yy**2).astype(np.float64)
    ring = np.sqrt(r2) >= 0.8 * c
    img = stamps - np.median(stamps[:, ring], axis=1)[:, None, None]
    sigma2 = np.full(n, 4.0)
    for _ in range(n_iter):
        w = np.exp(-0.5 * r2[None] / sigma2[:, None, None])
        wi = w * img
        norm = wi.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            m2 = (wi * r2).sum(axis=(1, 2)) / norm / 2.0
            # For a Gaussian star of s2 weighted by a Gaussian of w2: m2 = s2 w2 / (s2 + w2).
            star2 = 1.0 / (1.0 / m2 - 1.0 / sigma2)
        ok = np.isfinite(star2) & (star2 > 0.05) & (star2 < (s / 4.0) ** 2)
        sigma2 = np.where(ok, star2, np.nan)
        if not np.isfinite(sigma2).any():
            break
        sigma2 = np.where(np.isfinite(sigma2), sigma2, 4.0)
    out = np.sqrt(sigma2) * SIGMA_TO_FWHM
    out[~ok] = np.nan
    return out


def measure_pair_fwhm(
    read,
    x: np.ndarray,
    y: np.ndarray,
    shape: tuple[int, int],
    bad_planes: tuple[str, ...],
    which: tuple[bool, bool] = (True, True),
    max_stars: int = 200,
    half: int = 15,
) -> tuple[float | None, float | None]:
    """Median FWHM of the sources in the template and the science image.

    The first ``max_stars`` sources, in the order given (callers pass them in id
    order, so the result does not depend on the list's order), whose
    ``(2 half + 1)^2`` stamps lie inside the image with no ``bad_planes`` pixel in
    either image are measured.

    Parameters
    ----------
    read : callable
        ``read(y0, y1, x0, x1) -> (template, science)`` region reader.
    x, y : numpy.ndarray
        Source positions.
    shape : tuple of int
        ``(ny, nx)`` of the images.
    bad_planes : tuple of str
        Mask planes that disqualify a stamp.
    which : tuple of bool
        Whether to measure the template and the science image.

    Returns
    -------
    tuple
        Template and science FWHM in pixels; None where not measured or where fewer
        than three stars gave a finite width.
    """
    ny, nx = shape
    finite = np.isfinite(x) & np.isfinite(y)
    xc = np.round(np.where(finite, x, -1e9)).astype(np.int64)
    yc = np.round(np.where(finite, y, -1e9)).astype(np.int64)
    inside = (xc >= half) & (yc >= half) & (xc < nx - half) & (yc < ny - half)
    stamps_t: list[np.ndarray] = []
    stamps_s: list[np.ndarray] = []
    seen: set[tuple[int, int]] = set()
    for i in np.flatnonzero(inside):
        key = (int(yc[i]), int(xc[i]))
        if key in seen:
            continue
        seen.add(key)
        t, s = read(key[0] - half, key[0] + half + 1, key[1] - half, key[1] + half + 1)
        if (t.mask & t.bitmask(bad_planes)).any() or (s.mask & s.bitmask(bad_planes)).any():
            continue
        stamps_t.append(t.image)
        stamps_s.append(s.image)
        if len(stamps_t) >= max_stars:
            break
    out: list[float | None] = [None, None]
    for k, (wanted, stamps) in enumerate(zip(which, (stamps_t, stamps_s), strict=True)):
        if wanted and stamps:
            values = measure_fwhm(np.asarray(stamps))
            if np.isfinite(values).sum() >= 3:
                out[k] = float(np.nanmedian(values))
    return out[0], out[1]
