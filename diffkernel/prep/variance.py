"""Variance of an image that came without one (a plain FITS image): a model from the sky.

Everything downstream weights pixels by ``1 / variance`` and judges a difference image by
``difference / sqrt(variance)``, so the estimated plane must be honest: on blank sky,
``(image - background) / sqrt(variance)`` must have unit scatter. The model measures

* the sky level: the sigma-clipped median of the good pixels;
* the sky noise: the sigma-clipped MAD standard deviation of the good pixels *about the
  mesh sky* of :func:`diffkernel.prep.background.sky_mesh`, the package's one sky model
  (medians in 64-pixel boxes, at most half the image, median-filtered over 3x3 boxes,
  interpolated bilinearly). Without that step a sky gradient or an extended galaxy widens
  the pixel histogram and inflates the noise;

and then takes one of four paths, recorded in ``exposure.meta["variance_model"]``:

``"poisson"``
    A gain is known (argument, or header ``GAIN``/``EGAIN``/``GAINA``, in e-/ADU), the sky
    was not subtracted (level above 5 sky sigmas) and Poisson statistics predict the
    measured sky variance to within 25 %:
    ``variance = max(image, 0) / gain + (read_noise / gain) ** 2``.
``"sky_noise+poisson_sources"``
    A gain is known, but the sky was subtracted or its noise disagrees with the gain (as
    after resampling, which correlates the noise and lowers the per-pixel variance):
    ``variance = sky_noise ** 2 + max(image - background, 0) / gain_eff``. ``gain_eff`` is the
    gain, divided by the ratio of the measured to the predicted sky variance when the
    un-subtracted sky level is known (from the image or from header ``AVSKY``/``SKYBRITE``/
    ``SKYLEVEL``) and that ratio lies within 1/3..1.5: resampling lowers the per-pixel
    variance of source photons by the same factor as that of sky photons.
``"poisson_effective_gain"``
    No gain is known but the sky was not subtracted: the gain is inferred from the sky,
    ``sky_level / gain + (read_noise / gain) ** 2 = sky_noise ** 2``, and used as in
    ``"poisson"``. A bias pedestal left in the image would make this gain too large (the
    sky variance stays right, source variance would be underestimated).
``"sky_noise_only"``
    No gain and no sky pedestal: ``variance = sky_noise ** 2`` everywhere. This
    underestimates the variance on bright sources; a warning says so. Pass ``gain=``.

The gain, read noise, sky level and sky noise used are stored in ``meta`` as
``variance_gain``, ``variance_read_noise``, ``sky_level`` and ``sky_noise``.

What the bundled real images show (``/work/shared/data/real``):

* DECam ``DEC-OBS04a.mini.fits`` (SFFT test data): the sky *was* subtracted before SWarp
  (header ``SWARP_*`` names ``*.skysub.fits``; median -0.08 ADU), although SWarp itself ran
  with ``SUBTRACT_BACK N``. Sky noise 32.8 ADU. Header ``AVSKY`` = 4124 ADU with
  ``GAIN`` = 3.98 predicts 32.3 ADU: frame 04a is SWarp's reference grid and was hardly
  resampled (variance ratio 1.03). The other frames were LANCZOS3-resampled and their noise
  is 10-20 % below Poisson (04b: 25.9 vs 28.0 ADU; 18b: 41.7 vs 48.1 ADU), with lag-1
  autocorrelation up to 0.29, so a gain-only variance would overestimate them by up to
  1.5x; the ``"sky_noise+poisson_sources"`` path measures the sky noise instead.
* ProperImage ``aligned_eso085-030-004.fit`` (uint16, no gain): sky 8136 ADU. The global
  clipped MAD is 87.4 ADU but a ~280 ADU peak-to-peak sky gradient inflates it; about the
  background map the noise is 74.5 ADU, so ``gain_eff`` = 1.47 e-/ADU (frame 005: 79.3 ADU,
  1.31 e-/ADU; the frames were resampled differently when aligned). Check: the two frames,
  taken a minute apart, differ by a robust scatter of 103.8 ADU against 108.8 ADU predicted
  from the local noises (127 ADU from the global MADs): ``diff / sqrt(var1 + var2)`` has a
  robust std of 0.95. For DECam 04a - 04b it is 0.98.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from astropy.stats import sigma_clipped_stats

from ..errors import InputError
from .background import sky_mesh

__all__ = ["estimate_variance"]

#: Poisson statistics must predict the measured sky variance to within this factor.
_POISSON_TOLERANCE = 1.25
#: Accepted range of measured / predicted sky variance when rescaling the source term.
_RESAMPLING_RANGE = (1.0 / 3.0, 1.5)
#: The sky counts as not subtracted when its level exceeds this many sky sigmas.
_PEDESTAL_SIGMAS = 5.0
#: The sky about which the noise is measured: the mesh sky of prep.background, medians in
#: boxes of this side (pixels) median-filtered over this many boxes. Medians rather than
#: sep's clipped means (the subtraction's default), because sep drops every box that is
#: more than half masked and returns a zero sky when all are; a median needs one pixel.
_SKY_BOX = 64
_SKY_FILTER = 3
_SKY_STATISTIC = "MEDIAN"


def estimate_variance(
    image: np.ndarray,
    *,
    good: np.ndarray | None = None,
    gain: float | None = None,
    read_noise: float = 0.0,
    original_sky: float | None = None,
    where: str = "image",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Estimate the per-pixel variance of an image that came without one.

    Parameters
    ----------
    image : numpy.ndarray
        2-D pixel values in ADU.
    good : numpy.ndarray of bool, optional
        Pixels usable for sky statistics (finite, not saturated); default: finite ones.
    gain : float, optional
        Gain in e-/ADU, if known.
    read_noise : float, optional
        Read noise in electrons.
    original_sky : float, optional
        Sky level (ADU) before any sky subtraction, e.g. from header ``AVSKY``.
    where : str, optional
        Name of the image for messages.

    Returns
    -------
    variance : numpy.ndarray
        Variance in ADU^2, strictly positive where ``image`` is finite.
    info : dict
        ``variance_model`` (which path was taken; see the module documentation),
        ``variance_gain`` (effective gain used, e-/ADU; absent for ``"sky_noise_only"``),
        ``variance_read_noise``, ``sky_level`` and ``sky_noise`` (ADU).
    """
    image = np.asarray(image, dtype=np.float64)
    good = np.isfinite(image) if good is None else (np.asarray(good, bool) & np.isfinite(image))
    if good.sum() < 16:
        raise InputError(f"{where}: too few finite, unsaturated pixels to estimate a variance")
    sky_level, sky_noise, background = _sky_statistics(image, good)
    if not (np.isfinite(sky_noise) and sky_noise > 0):
        raise InputError(
            f"{where}: the sky noise measures {sky_noise}, so no variance can be estimated; "
            "build the MaskedImage with an explicit variance instead"
        )
    noise2 = sky_noise**2
    pedestal = sky_level > _PEDESTAL_SIGMAS * sky_noise
    info: dict[str, Any] = {
        "sky_level": float(sky_level),
        "sky_noise": float(sky_noise),
        "variance_read_noise": float(read_noise),
    }
    with np.errstate(invalid="ignore"):
        if gain is not None:
            predicted = sky_level / gain + (read_noise / gain) ** 2 if pedestal else None
            if predicted is not None and (
                1 / _POISSON_TOLERANCE <= noise2 / predicted <= _POISSON_TOLERANCE
            ):
                model, gain_used = "poisson", float(gain)
                variance = np.maximum(image, 0.0) / gain + (read_noise / gain) ** 2
            else:
                model, gain_used = "sky_noise+poisson_sources", float(gain)
                sky_before = sky_level if pedestal else original_sky
                if sky_before is not None and sky_before > 0:
                    ratio = noise2 / (sky_before / gain + (read_noise / gain) ** 2)
                    if _RESAMPLING_RANGE[0] <= ratio <= _RESAMPLING_RANGE[1]:
                        gain_used = float(gain / ratio)
                variance = noise2 + np.maximum(image - background, 0.0) / gain_used
        elif pedestal:
            model = "poisson_effective_gain"
            # Solve sky / g + (rn / g)^2 = noise^2 for the gain g.
            gain_used = float(
                (sky_level + np.sqrt(sky_level**2 + 4 * noise2 * read_noise**2)) / (2 * noise2)
            )
            variance = np.maximum(image, 0.0) / gain_used + (read_noise / gain_used) ** 2
        else:
            model, gain_used = "sky_noise_only", None
            variance = np.full(image.shape, noise2)
            warnings.warn(
                f"{where}: no gain is known and the sky was subtracted, so the variance is the "
                "sky variance everywhere and is underestimated on bright sources; pass gain=",
                UserWarning,
                stacklevel=3,
            )
    # Pixels below zero in an image with a sky pedestal would get no variance at all.
    variance = np.where(variance > 0, variance, noise2)
    info["variance_model"] = model
    if gain_used is not None:
        info["variance_gain"] = gain_used
    return variance, info


def _sky_statistics(image: np.ndarray, good: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Return the sky level, the sky noise about the mesh sky, and that sky."""
    _, level, _ = sigma_clipped_stats(image, mask=~good, sigma=3.0, maxiters=10)
    box = _sky_box(image.shape)
    if box is None:
        background = np.full(image.shape, float(level))
    else:
        background = sky_mesh(
            image, ~good, bin_size=box, filter_size=_SKY_FILTER, statistic=_SKY_STATISTIC
        )
    _, _, noise = sigma_clipped_stats(
        image - background, mask=~good, sigma=3.0, maxiters=10, stdfunc="mad_std"
    )
    return float(level), float(noise), background


def _sky_box(shape: tuple[int, int]) -> int | None:
    """Mesh box side for an image: at most half the image, so that a gradient is followed.

    None when that leaves boxes under 8 pixels, whose medians would be so noisy that
    subtracting them would take real noise out of the measurement: the sky is then flat.
    """
    box = min(_SKY_BOX, min(shape) // 2)
    return box if box >= 8 else None
