"""Exposures to and from astropy NDData and CCDData.

:func:`to_nddata` returns a :class:`~astropy.nddata.CCDData` whose ``mask`` is the boolean
"a defect plane is set" (every plane except ``DETECTED`` and ``DETECTED_NEGATIVE``, which
annotate rather than condemn), whose ``flags`` is the full int32 bit mask and whose ``meta``
(a FITS header) carries the plane names as ``MP_<NAME>`` cards (the same convention as the
``MASK`` HDU of :mod:`diffkernel.io.fits`) and the PSF width as ``PSFFWHM``, so
:func:`from_nddata` rebuilds the exposure exactly. A CCDData written to disk and read back
keeps only the boolean mask, which :func:`from_nddata` turns into the ``BAD`` plane.

Non-finite data or variances that come in are flagged ``NO_DATA`` as FITS inputs are
(:func:`diffkernel.io.planes.flag_no_data`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from astropy import units as u
from astropy.io import fits
from astropy.nddata import (
    CCDData,
    InverseVariance,
    NDData,
    StdDevUncertainty,
    VarianceUncertainty,
)
from astropy.wcs import WCS

from ..errors import InputError
from ..image import DEFAULT_MASK_PLANES, Exposure, MaskedImage, as_exposure
from .fits import flag_no_data
from .header import (
    PSF_FWHM_KEY,
    add_cards,
    add_mask_plane_cards,
    add_psf_fwhm_card,
    header_meta,
    positive_card,
)

__all__ = ["ANNOTATION_PLANES", "from_nddata", "to_nddata"]

#: Planes that annotate pixels rather than mark them unusable.
ANNOTATION_PLANES = ("DETECTED", "DETECTED_NEGATIVE")


def to_nddata(
    exposure: Exposure | MaskedImage,
    *,
    unit: str | u.UnitBase | None = None,
    bad_planes: Iterable[str] | None = None,
) -> CCDData:
    """Convert an exposure to an astropy CCDData.

    Parameters
    ----------
    exposure : Exposure or MaskedImage
        What to convert; arrays are copied.
    unit : str or astropy.units.Unit, optional
        Data unit; defaults to the ``BUNIT`` card in ``meta``, else ``adu``.
    bad_planes : iterable of str, optional
        Planes that make up the boolean ``mask``; default every plane except
        ``DETECTED`` and ``DETECTED_NEGATIVE``.

    Returns
    -------
    astropy.nddata.CCDData
        ``data`` the image, ``uncertainty`` a VarianceUncertainty, ``mask`` True where a bad
        plane is set, ``flags`` the full int32 bit mask, ``wcs`` the WCS and ``meta`` a
        :class:`~astropy.io.fits.Header` of the exposure's meta (entries that are not valid
        FITS cards are left out with a warning, so ``CCDData.write`` always works) plus
        ``MP_<NAME> = bit`` cards and ``PSFFWHM`` (a constant FWHM). ``CCDData.write``
        keeps the boolean mask but not ``flags``.
    """
    exp = as_exposure(exposure, "exposure")
    mi = exp.masked_image
    if unit is None:
        unit = exp.meta.get("BUNIT", "adu")
    if bad_planes is None:
        bad_planes = [p for p in mi.mask_planes if p not in ANNOTATION_PLANES]
    bad = mi.bitmask(bad_planes)
    wcs = _low_level(exp.wcs)
    meta = fits.Header()
    skipped = add_cards(meta, exp.meta, drop_wcs_keys=wcs is not None, strict=False)
    if skipped:
        warnings.warn(
            f"meta entries not valid as FITS cards were left out: {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    add_mask_plane_cards(meta, mi.mask_planes)
    add_psf_fwhm_card(meta, exp.psf_fwhm)
    return CCDData(
        mi.image.copy(),
        unit=unit,
        uncertainty=VarianceUncertainty(mi.variance.copy()),
        mask=(mi.mask & bad) != 0,
        flags=mi.mask.copy(),
        wcs=wcs,
        meta=meta,
    )


def from_nddata(nd: NDData, *, mask_planes: Mapping[str, int] | None = None) -> Exposure:
    """Build an exposure from an astropy NDData or CCDData.

    Parameters
    ----------
    nd : astropy.nddata.NDData
        2-D data with a VarianceUncertainty, StdDevUncertainty (squared) or InverseVariance
        (inverted) uncertainty. An integer ``flags`` array is taken as the bit mask, as
        written by :func:`to_nddata`. An integer ``mask`` is a bit mask too; a boolean
        ``mask`` sets the ``BAD`` plane where no other defect plane is set.
    mask_planes : mapping of str to int, optional
        Planes of the bit mask; default the ``MP_<NAME>`` cards in ``nd.meta``, else
        :data:`~diffkernel.image.DEFAULT_MASK_PLANES`.

    Returns
    -------
    Exposure
        Non-finite data or variance and zero inverse variance are flagged ``NO_DATA`` (image
        0, variance 1.0 placeholder). ``PSFFWHM`` in ``meta`` becomes ``psf_fwhm``.

    Raises
    ------
    InputError
        If ``nd`` has no uncertainty or one that is not a variance, standard deviation or
        inverse variance, its arrays do not match, or it gives no positive, finite
        variance at any pixel with data.
    """
    if not isinstance(nd, NDData):
        raise InputError(f"expected an astropy NDData or CCDData, got {type(nd).__name__}")
    data = np.asarray(nd.data, dtype=np.float64)
    variance = _variance_from_uncertainty(nd)

    if isinstance(nd.meta, fits.Header):
        meta = header_meta(nd.meta, drop_wcs_keys=nd.wcs is not None)
    else:
        meta = dict(nd.meta.items()) if nd.meta is not None else {}
    planes = dict(mask_planes) if mask_planes is not None else None
    if planes is None:
        planes = {
            str(k)[3:]: int(v)
            for k, v in meta.items()
            if str(k).upper().startswith("MP_") and isinstance(v, int | np.integer)
        }
        planes = planes or dict(DEFAULT_MASK_PLANES)

    bitmask = np.zeros(data.shape, dtype=np.int32)
    flags = getattr(nd, "flags", None)
    if flags is not None:
        flags = np.asarray(flags)
        if flags.shape == data.shape and np.issubdtype(flags.dtype, np.integer):
            bitmask |= flags.astype(np.int32)
    bool_mask = None
    if nd.mask is not None:
        mask = np.broadcast_to(np.asarray(nd.mask), data.shape)
        if mask.dtype == bool:
            bool_mask = mask
        elif np.issubdtype(mask.dtype, np.integer):
            bitmask |= mask.astype(np.int32)
        else:
            raise InputError(f"NDData mask must be boolean or integer, got dtype {mask.dtype}")

    mi = MaskedImage(data, variance, bitmask, planes)
    if bool_mask is not None:
        defects = mi.bitmask(p for p in mi.mask_planes if p not in ANNOTATION_PLANES)
        mi.set_plane("BAD", bool_mask & ((mi.mask & defects) == 0))
    flag_no_data(mi, "NDData", "its uncertainty must give positive, finite variances")

    fwhm = positive_card(meta, PSF_FWHM_KEY)
    meta = {
        k: v
        for k, v in meta.items()
        if not str(k).upper().startswith("MP_") and str(k).upper() != PSF_FWHM_KEY
    }
    return Exposure(mi, wcs=_low_level(nd.wcs), psf_fwhm=fwhm, meta=meta)


def _variance_from_uncertainty(nd: NDData) -> np.ndarray:
    unc = nd.uncertainty
    if unc is None:
        raise InputError(
            "NDData has no uncertainty: a variance is required; attach a VarianceUncertainty, "
            "StdDevUncertainty or InverseVariance"
        )
    array = np.asarray(unc.array, dtype=np.float64)
    shape = np.shape(nd.data)
    if array.shape != shape:
        array = np.broadcast_to(array, shape).astype(np.float64)
    data_unit = nd.unit
    with np.errstate(divide="ignore", invalid="ignore"):
        if isinstance(unc, VarianceUncertainty):
            variance, unit = array, unc.unit
        elif isinstance(unc, StdDevUncertainty):
            variance, unit = array**2, None if unc.unit is None else unc.unit**2
        elif isinstance(unc, InverseVariance):
            variance = np.where(array > 0, 1.0 / array, np.nan)
            unit = None if unc.unit is None else unc.unit**-1
        else:
            raise InputError(
                f"NDData uncertainty is a {type(unc).__name__}; a variance is required: use "
                "VarianceUncertainty, StdDevUncertainty or InverseVariance"
            )
    if unit is not None and data_unit is not None:
        variance = (variance * unit).to_value(data_unit**2)
    return np.array(variance, dtype=np.float64)


def _low_level(wcs: Any) -> Any:
    """An astropy WCS for a high-level wrapper of one (``low_level_wcs``); others unchanged."""
    if wcs is not None and not isinstance(wcs, WCS):
        return getattr(wcs, "low_level_wcs", wcs)
    return wcs
