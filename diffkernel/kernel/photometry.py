"""Stamp photometry of kernel candidates: a check on the fit that does not use the fit.

The kernel sum is the photometric scale from the convolved image to the reference
image, and every star of the pair measures it independently of the kernel fit: the
ratio of the star's fluxes in the two images, each measured above its own local sky.
The local skies also show the differential background the data hold, which a fit
without a background term (``fitForBackground = False``) cannot model: the kernel
sum then absorbs it (on a flat sky ``s_ref`` over ``s_conv``, the fit is pulled from
the stars' ratio towards ``s_ref / s_conv``).

For each candidate stamp (the science-stamp footprint ``S x S`` in both images):

* local sky: the median of the stamp's outer ring of :data:`RING_WIDTH` pixels;
* sky noise: ``1.4826 * MAD`` of the reference image's ring;
* flux: the sum over a circular aperture of radius ``aperture_radius`` (the kernel's
  half-width: about three FWHM of the narrower PSF) minus the aperture's area times
  the local sky, in each image;
* ``flux_ratio = flux_reference / flux_convolved`` with its error from the summed
  variances and from the local skies' errors (``sqrt(pi / 2)`` times the ring's
  noise over the square root of its size, for a median).

The aperture spans several PSF widths of both images, so the flux outside it is
small and nearly the same fraction in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RING_WIDTH", "StampPhotometry", "stamp_photometry"]

#: Width in pixels of the stamp border whose median is the local sky.
RING_WIDTH = 2


@dataclass
class StampPhotometry:
    """Per-candidate photometry in the kernel's frame (convolved -> reference).

    Attributes
    ----------
    flux_ratio, flux_ratio_err : numpy.ndarray
        Reference flux over convolved flux, and its 1-sigma error (NaN where the
        convolved flux is not positive).
    sky_convolved, sky_reference : numpy.ndarray
        Local sky of each stamp.
    sky_noise : numpy.ndarray
        Robust standard deviation of the reference stamp's border pixels.
    """

    flux_ratio: np.ndarray
    flux_ratio_err: np.ndarray
    sky_convolved: np.ndarray
    sky_reference: np.ndarray
    sky_noise: np.ndarray

    @classmethod
    def empty(cls, n: int) -> StampPhotometry:
        """``n`` rows of NaN (sources that were not measured)."""
        return cls(*(np.full(n, np.nan) for _ in range(5)))


def _ring(stamps: np.ndarray) -> np.ndarray:
    """``(N, n_ring)`` pixels of each stamp's outer border of :data:`RING_WIDTH`."""
    s = stamps.shape[-1]
    w = min(RING_WIDTH, s // 2)
    border = np.ones((s, s), dtype=bool)
    border[w : s - w, w : s - w] = False
    return stamps[:, border]


def _aperture(size: int, radius: float) -> np.ndarray:
    """Boolean disc of ``radius`` about the centre of a ``size`` square."""
    offsets = np.arange(size) - size // 2
    return offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius**2


def _robust_noise(ring: np.ndarray, sky: np.ndarray) -> np.ndarray:
    return 1.4826 * np.median(np.abs(ring - sky[:, None]), axis=1)


def stamp_photometry(
    convolved: np.ndarray,
    convolved_variance: np.ndarray,
    reference: np.ndarray,
    reference_variance: np.ndarray,
    aperture_radius: float,
) -> StampPhotometry:
    """Local skies and flux ratios of a batch of ``(N, S, S)`` stamps.

    Parameters
    ----------
    convolved, convolved_variance : numpy.ndarray
        Stamps of the image the kernel convolves, and their variance.
    reference, reference_variance : numpy.ndarray
        Stamps of the image it is matched to, and their variance.
    aperture_radius : float
        Radius of the flux aperture in pixels (clipped to the stamp inside its ring).

    Returns
    -------
    StampPhotometry
    """
    conv = np.asarray(convolved, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    size = conv.shape[-1]
    aperture = _aperture(size, min(float(aperture_radius), size // 2 - RING_WIDTH))
    npix = int(aperture.sum())
    ring_conv = _ring(conv)
    ring_ref = _ring(ref)
    sky_conv = np.median(ring_conv, axis=1)
    sky_ref = np.median(ring_ref, axis=1)
    noise_conv = _robust_noise(ring_conv, sky_conv)
    noise = _robust_noise(ring_ref, sky_ref)
    flux_conv = conv[:, aperture].sum(axis=1) - npix * sky_conv
    flux_ref = ref[:, aperture].sum(axis=1) - npix * sky_ref
    # The local sky's error, times the aperture's area, adds to each flux's variance.
    sky_var_factor = (np.pi / 2) * npix**2 / ring_ref.shape[1]
    var_conv = np.asarray(convolved_variance, dtype=np.float64)[:, aperture].sum(axis=1)
    var_ref = np.asarray(reference_variance, dtype=np.float64)[:, aperture].sum(axis=1)
    var_conv = var_conv + sky_var_factor * noise_conv**2
    var_ref = var_ref + sky_var_factor * noise**2
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(flux_conv > 0, flux_ref / flux_conv, np.nan)
        err = np.abs(ratio) * np.sqrt(var_ref / flux_ref**2 + var_conv / flux_conv**2)
    return StampPhotometry(
        ratio, np.where(np.isfinite(ratio), err, np.nan), sky_conv, sky_ref, noise
    )
