"""Warping a template Exposure onto the science pixel grid (``warpingConfig``).

Uses ``reproject.reproject_interp`` on the image, variance and each mask plane.
The variance is interpolated with the same weights as the image, which slightly
overestimates it between pixels (the exact propagation uses squared weights): the
difference image's variance stays conservative rather than optimistic. Output
pixels that no template pixel covers, or that come out non-finite, are set to NaN
and flagged ``NO_DATA`` and ``EDGE``.
"""

from __future__ import annotations

import numpy as np
from reproject import reproject_interp

from .errors import InputError
from .image import Exposure, MaskedImage

__all__ = ["warp_exposure"]

_ORDERS = {
    "nearest-neighbor": "nearest-neighbor",
    "bilinear": "bilinear",
    "biquadratic": "biquadratic",
    "bicubic": "bicubic",
}


def warp_exposure(template: Exposure, science: Exposure, config) -> Exposure:
    """Resample ``template`` onto the pixel grid of ``science``.

    Parameters
    ----------
    template, science : Exposure
        Both need a celestial WCS.
    config : WarpingConfig
        ``warpingKernelName`` (image and variance), ``maskWarpingKernelName`` (mask
        planes) and ``growFullMask`` (planes set wherever any covering template pixel
        had them; other planes where the warped plane is at least one half).

    Raises
    ------
    InputError
        When a WCS is missing or the two images do not overlap on the sky.
    """
    if template.wcs is None or science.wcs is None:
        which = "template" if template.wcs is None else "science"
        raise InputError(f"alignment needs a WCS on both exposures; the {which} has none")
    shape = science.shape
    order = _ORDERS[config.warpingKernelName]
    mi = template.masked_image
    image, footprint = reproject_interp(
        (mi.image, template.wcs), science.wcs, shape_out=shape, order=order
    )
    if not np.any(footprint > 0):
        raise InputError(
            "the template and science exposures do not overlap on the sky (no WCS overlap)"
        )
    variance, _ = reproject_interp(
        (mi.variance, template.wcs), science.wcs, shape_out=shape, order=order
    )
    mask = np.zeros(shape, dtype=np.int32)
    mask_order = _ORDERS[config.maskWarpingKernelName]
    grow = set(config.growFullMask)
    for name, bit in mi.mask_planes.items():
        plane = ((mi.mask >> bit) & 1).astype(np.float64)
        if not plane.any():
            continue
        warped, _ = reproject_interp(
            (plane, template.wcs), science.wcs, shape_out=shape, order=mask_order
        )
        warped = np.nan_to_num(warped, nan=0.0)
        hit = warped > 0 if name in grow else warped >= 0.5
        mask[hit] |= np.int32(1 << bit)
    out = MaskedImage(image, variance, mask, dict(mi.mask_planes))
    missing = (footprint <= 0) | ~np.isfinite(image) | ~np.isfinite(variance)
    out.set_plane("NO_DATA", missing)
    out.set_plane("EDGE", missing)
    out.image[missing] = np.nan
    out.variance[missing] = np.nan
    return Exposure(out, science.wcs, template.psf_fwhm, dict(template.meta))
