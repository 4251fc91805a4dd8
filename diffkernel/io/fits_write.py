"""Write exposures as multi-extension FITS files (IMAGE, MASK, VARIANCE), atomically.

The layout is the one :func:`diffkernel.io.fits.read_exposure` reads back (and LSST's
``afw``): an empty primary HDU holding the metadata, then ``IMAGE``, ``MASK`` (with
``MP_<NAME> = bit`` cards naming the planes) and ``VARIANCE``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from ..errors import InputError, StoreError
from ..image import Exposure, MaskedImage, as_exposure
from .atomic import check_parent, write_file
from .header import add_cards, add_mask_plane_cards, add_psf_fwhm_card, wcs_header

__all__ = ["write_exposure"]

PathLike = str | os.PathLike


def write_exposure(
    path: PathLike,
    exposure_or_masked_image: Exposure | MaskedImage,
    *,
    overwrite: bool = False,
    extra_header: Mapping[str, Any] | fits.Header | None = None,
    dtype: str | np.dtype | None = None,
) -> None:
    """Write an exposure as a multi-extension FITS file, atomically.

    The file holds an empty primary HDU carrying ``exposure.meta`` (cards that are not valid
    FITS are skipped with a warning), ``extra_header``, the WCS and ``PSFFWHM``, then the
    ``IMAGE``, ``MASK`` (int32, with ``MP_<NAME> = bit`` cards) and ``VARIANCE``
    extensions, each with the WCS. A callable ``psf_fwhm`` is not written. By default the
    image and variance planes are float32 when their values are exactly float32 (as the
    Zarr stores keep them), else float64: nothing is lost either way.

    The file is written under a partial name in the same directory and moved into place
    (:func:`diffkernel.io.atomic.write_file`), so ``path`` either holds the complete new
    file or is left untouched.

    Parameters
    ----------
    path : str or os.PathLike
        Output file.
    exposure_or_masked_image : Exposure or MaskedImage
        What to write.
    overwrite : bool, optional
        Replace an existing file. Default False.
    extra_header : mapping or astropy.io.fits.Header, optional
        Further cards for the primary header; they override ``meta``.
    dtype : {None, "float32", "float64"}, optional
        Force the type of the image and variance planes; ``"float32"`` rounds.

    Raises
    ------
    StoreError
        If ``path`` exists and ``overwrite`` is False, its directory does not exist, or the
        write fails.
    InputError
        If the object is not an Exposure or MaskedImage, or ``extra_header`` holds a card
        that is not valid FITS.
    """
    exposure = as_exposure(exposure_or_masked_image, "exposure")
    target = Path(path)
    _check_writable(target, overwrite)
    if dtype is not None and str(np.dtype(dtype)) not in ("float32", "float64"):
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    hdul = _build_hdulist(exposure, extra_header, dtype)
    write_file(target, hdul.writeto, overwrite)


def _check_writable(target: Path, overwrite: bool) -> None:
    check_parent(target)
    if target.is_dir():
        raise StoreError(f"cannot write {str(target)!r}: it is a directory")
    if target.exists() and not overwrite:
        raise StoreError(f"{str(target)!r} already exists; pass overwrite=True to replace it")


def _float_plane(values: np.ndarray, dtype: str | np.dtype | None) -> np.ndarray:
    """``values`` as ``dtype``; by default float32 when that loses nothing, else float64."""
    if dtype is not None:
        return np.asarray(values, dtype=dtype)
    values = np.asarray(values)
    single = values.astype(np.float32)
    with np.errstate(invalid="ignore", over="ignore"):
        exact = np.array_equal(single, values, equal_nan=True)
    return single if exact else values.astype(np.float64)


def _build_hdulist(
    exposure: Exposure,
    extra_header: Mapping[str, Any] | fits.Header | None,
    dtype: str | np.dtype | None,
) -> fits.HDUList:
    mi = exposure.masked_image
    wcs_cards = wcs_header(exposure.wcs)

    primary = fits.PrimaryHDU()
    skipped = add_cards(
        primary.header, exposure.meta, drop_wcs_keys=wcs_cards is not None, strict=False
    )
    if skipped:
        warnings.warn(
            f"meta entries not valid as FITS cards were not written: {', '.join(skipped)}",
            UserWarning,
            stacklevel=3,
        )
    if extra_header is not None:
        extra = extra_header.items() if isinstance(extra_header, fits.Header) else extra_header
        add_cards(primary.header, dict(extra), drop_wcs_keys=False, strict=True)
    add_psf_fwhm_card(primary.header, exposure.psf_fwhm)
    if wcs_cards is not None:
        primary.header.update(wcs_cards)

    image = fits.ImageHDU(_float_plane(mi.image, dtype), name="IMAGE")
    mask = fits.ImageHDU(np.asarray(mi.mask, dtype=np.int32), name="MASK")
    variance = fits.ImageHDU(_float_plane(mi.variance, dtype), name="VARIANCE")
    add_mask_plane_cards(mask.header, mi.mask_planes)
    for hdu in (image, mask, variance):
        if wcs_cards is not None:
            hdu.header.update(wcs_cards)
    return fits.HDUList([primary, image, mask, variance])
