"""Read and write exposures as FITS files.

Two on-disk layouts are read:

* **multi-extension** (what :func:`write_exposure` writes, and LSST's ``afw`` layout): an
  empty primary HDU holding the metadata, then ``IMAGE``, ``MASK`` and ``VARIANCE`` image
  extensions, found by ``EXTNAME``. The ``MASK`` header names its planes with one card per
  plane, ``MP_<NAME> = bit``, as LSST writes them.
* **a plain image**: one 2-D image HDU (the primary, or the first HDU holding a 2-D image)
  with no variance and no mask. The variance is then *estimated* from the sky, the gain
  (argument, or header ``GAIN``/``EGAIN``/``GAINA``), the read noise (``RDNOISE``/
  ``READNOIS``/``RON``) and the sky level before any subtraction (``AVSKY``/``SKYBRITE``/
  ``SKYLEVEL``): see :mod:`diffkernel.prep.variance`, whose choices are recorded in
  ``exposure.meta``.

Masks and bad pixels
--------------------
Pixels at or above the saturation level (argument, else header ``ESATUR``, ``SATURATE`` or
``SATURATI``, else the largest value an integer image can hold, e.g. 65535 for unsigned
16-bit data) are flagged ``SAT``. ``ESATUR`` comes first because it is the effective level
after sky subtraction. Non-finite pixels (and, in stored exposures, non-finite or negative
variances) are flagged ``NO_DATA``; their image value is set to 0 and their variance to a
placeholder 1.0, so that no NaN travels downstream and the flag alone says "ignore me"
(:meth:`MaskedImage.validate` exempts ``NO_DATA``). A variance that is negative, NaN or
infinite at every pixel with data is refused instead: that is a wrong plane (a sign
error, a placeholder), which flagging would hide behind "every pixel is masked NO_DATA".
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from ..errors import DiffkernelError, InputError, StoreError
from ..image import DEFAULT_MASK_PLANES, Exposure, MaskedImage, as_exposure
from ..prep.variance import estimate_variance
from .atomic import check_parent, write_file
from .header import (
    PSF_FWHM_KEY,
    add_cards,
    add_mask_plane_cards,
    add_psf_fwhm_card,
    celestial_wcs,
    first_number,
    header_meta,
    mask_planes_from_header,
    positive_card,
    wcs_header,
)

__all__ = [
    "GAIN_KEYS",
    "ORIGINAL_SKY_KEYS",
    "READ_NOISE_KEYS",
    "SATURATION_KEYS",
    "flag_no_data",
    "read_exposure",
    "read_masked_image",
    "write_exposure",
]

PathLike = str | os.PathLike

#: Header keywords tried, in order, for the gain (e-/ADU), read noise (e-) and saturation (ADU).
GAIN_KEYS = ("GAIN", "EGAIN", "GAINA")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "RON")
SATURATION_KEYS = ("ESATUR", "SATURATE", "SATURATI")
#: Keywords giving the sky level before it was subtracted (ADU).
ORIGINAL_SKY_KEYS = ("AVSKY", "SKYBRITE", "SKYLEVEL")
#: Variance given to NO_DATA pixels; the flag, not this value, is what matters.
_NO_DATA_VARIANCE = 1.0


# --------------------------------------------------------------------------- writing


def write_exposure(
    path: PathLike,
    exposure_or_masked_image: Exposure | MaskedImage,
    *,
    overwrite: bool = False,
    extra_header: Mapping[str, Any] | fits.Header | None = None,
) -> None:
    """Write an exposure as a multi-extension FITS file, atomically.

    The file holds an empty primary HDU carrying ``exposure.meta`` (cards that are not valid
    FITS are skipped with a warning), ``extra_header``, the WCS and ``PSFFWHM``, then the
    ``IMAGE`` (float64), ``MASK`` (int32, with ``MP_<NAME> = bit`` cards) and ``VARIANCE``
    (float64) extensions, each with the WCS. A callable ``psf_fwhm`` is not written.

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
    hdul = _build_hdulist(exposure, extra_header)
    write_file(target, hdul.writeto, overwrite)


def _check_writable(target: Path, overwrite: bool) -> None:
    check_parent(target)
    if target.is_dir():
        raise StoreError(f"cannot write {str(target)!r}: it is a directory")
    if target.exists() and not overwrite:
        raise StoreError(f"{str(target)!r} already exists; pass overwrite=True to replace it")


def _build_hdulist(
    exposure: Exposure, extra_header: Mapping[str, Any] | fits.Header | None
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

    image = fits.ImageHDU(np.asarray(mi.image, dtype=np.float64), name="IMAGE")
    mask = fits.ImageHDU(np.asarray(mi.mask, dtype=np.int32), name="MASK")
    variance = fits.ImageHDU(np.asarray(mi.variance, dtype=np.float64), name="VARIANCE")
    add_mask_plane_cards(mask.header, mi.mask_planes)
    for hdu in (image, mask, variance):
        if wcs_cards is not None:
            hdu.header.update(wcs_cards)
    return fits.HDUList([primary, image, mask, variance])


# --------------------------------------------------------------------------- reading


def read_exposure(
    path: PathLike,
    *,
    hdu: int | str | None = None,
    gain: float | None = None,
    saturation: float | None = None,
    read_noise: float | None = None,
    fwhm_key: str = "FWHM",
) -> Exposure:
    """Read an exposure from a FITS file, estimating the variance of a plain image.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file (gzip-compressed and tile-compressed files work too).
    hdu : int or str, optional
        Read this HDU as a plain image, skipping layout detection. By default a file with
        ``IMAGE``/``MASK``/``VARIANCE`` extensions is read as a stored exposure, any other
        file from its first HDU holding a 2-D image.
    gain : float, optional
        Gain in e-/ADU for the variance of a plain image; defaults to the header.
    saturation : float, optional
        Saturation level in ADU of a plain image; defaults to the header.
    read_noise : float, optional
        Read noise in electrons of a plain image; defaults to the header, else 0.
    fwhm_key : str, optional
        Header card holding the PSF FWHM in pixels. Default ``"FWHM"``.

    Returns
    -------
    Exposure
        With ``meta`` holding the header cards (structural and WCS cards left out) and, for
        a plain image, how its variance was estimated (see the module documentation).

    Raises
    ------
    StoreError
        If the file does not exist or cannot be opened.
    InputError
        If it is not valid FITS, is truncated, holds no 2-D image, or a stored exposure is
        incomplete or its variance is negative, NaN or infinite at every pixel with data.
    """
    for name, value in (("gain", gain), ("read_noise", read_noise)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite, non-negative number, got {value!r}")
    if gain is not None and gain == 0:
        raise InputError("gain must be positive (e-/ADU), got 0")
    if saturation is not None and not np.isfinite(saturation):
        raise InputError(f"saturation must be a finite number, got {saturation!r}")

    source = Path(path)
    if not source.exists():
        raise StoreError(f"{str(source)!r} does not exist")
    if source.is_dir():
        raise StoreError(f"{str(source)!r} is a directory, not a FITS file")
    loaded = _load(source, hdu)
    if loaded["layout"] == "stored":
        return _stored_exposure(loaded, fwhm_key)
    return _plain_exposure(loaded, gain, saturation, read_noise, fwhm_key)


def read_masked_image(path: PathLike, **kwargs: Any) -> MaskedImage:
    """Read a FITS file and return its masked image; see :func:`read_exposure`."""
    return read_exposure(path, **kwargs).masked_image


def _load(source: Path, hdu: int | str | None) -> dict[str, Any]:
    """Open the file and copy out the headers and arrays needed, translating errors."""
    where = str(source)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(source, memmap=False, lazy_load_hdus=False)
        for warning in caught:
            text = str(warning.message)
            if "truncated" in text or "Error validating header" in text:
                hdul.close()
                raise InputError(f"{where!r} is truncated or corrupt: {text.strip()}")
        with hdul:
            return _extract(hdul, hdu, where)
    except DiffkernelError:
        raise
    except PermissionError as exc:
        raise StoreError(f"cannot open {where!r}: {exc}") from exc
    except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError) as exc:
        raise InputError(
            f"{where!r} is not a readable FITS file ({type(exc).__name__}: {exc})"
        ) from exc


def _extract(hdul: fits.HDUList, hdu: int | str | None, where: str) -> dict[str, Any]:
    primary_header = hdul[0].header.copy()
    if hdu is None:
        names = {h.name.upper(): i for i, h in enumerate(hdul)}
        found = [n for n in ("IMAGE", "MASK", "VARIANCE") if n in names]
        if "MASK" in found or "VARIANCE" in found:
            if len(found) < 3:
                missing = sorted({"IMAGE", "MASK", "VARIANCE"} - set(found))
                raise InputError(
                    f"{where!r} has {', '.join(found)} extension(s) but no "
                    f"{', '.join(missing)}: the stored exposure is incomplete"
                )
            out: dict[str, Any] = {"layout": "stored", "where": where, "primary": primary_header}
            for name in ("IMAGE", "MASK", "VARIANCE"):
                h = hdul[names[name]]
                out[name.lower() + "_header"] = h.header.copy()
                out[name.lower()] = _image_data(h, where, name)
            return out
        index = next((i for i, h in enumerate(hdul) if _is_2d_image(h)), None)
        if index is None:
            shapes = ", ".join(f"{i}:{_dims(h)}" for i, h in enumerate(hdul))
            raise InputError(
                f"{where!r} holds no 2-D image of at least 2x2 pixels in any of its "
                f"{len(hdul)} HDU(s) (their sizes: {shapes})"
            )
    else:
        try:
            index = hdul.index_of(hdu)
            hdul[index]
        except (KeyError, IndexError):
            names = [f"{i}:{h.name}" for i, h in enumerate(hdul)]
            raise InputError(f"{where!r} has no HDU {hdu!r}; it has {', '.join(names)}") from None
        if not _is_2d_image(hdul[index]):
            raise InputError(f"HDU {hdu!r} of {where!r} holds no 2-D image")
    chosen = hdul[index]
    header = chosen.header.copy()
    data = _image_data(chosen, where, f"HDU {index}")
    return {
        "layout": "plain",
        "where": where,
        "primary": primary_header,
        "header": header,
        "index": index,
        "data": data,
    }


def _dims(hdu: Any) -> str:
    """An HDU's size as NAXIS1xNAXIS2..., or what it is when it holds no image."""
    if not isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        return type(hdu).__name__
    naxis = int(hdu.header.get("NAXIS", 0))
    return "x".join(str(hdu.header.get(f"NAXIS{i}", 0)) for i in range(1, naxis + 1)) or "empty"


def _is_2d_image(hdu: Any) -> bool:
    if not isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        return False
    naxis = int(hdu.header.get("NAXIS", 0))
    dims = [int(hdu.header.get(f"NAXIS{i}", 0)) for i in range(1, naxis + 1)]
    return len(dims) >= 2 and all(d > 1 for d in dims[:2]) and all(d == 1 for d in dims[2:])


def _image_data(hdu: Any, where: str, what: str) -> np.ndarray:
    data = hdu.data
    if data is None:
        raise InputError(f"{what} of {where!r} holds no data")
    data = np.array(data)  # a copy, so the file can be closed
    if data.ndim > 2:
        data = data.reshape(data.shape[-2:])
    if data.ndim != 2:
        raise InputError(f"{what} of {where!r} is not a 2-D image (shape {data.shape})")
    return data


def _stored_exposure(loaded: dict[str, Any], fwhm_key: str) -> Exposure:
    where = loaded["where"]
    image = np.asarray(loaded["image"], dtype=np.float64)
    variance = np.asarray(loaded["variance"], dtype=np.float64)
    raw_mask = loaded["mask"]
    if not np.issubdtype(raw_mask.dtype, np.integer):
        raise InputError(f"MASK of {where!r} is not an integer image (dtype {raw_mask.dtype})")
    if not (image.shape == variance.shape == raw_mask.shape):
        raise InputError(
            f"IMAGE {image.shape}, MASK {raw_mask.shape} and VARIANCE {variance.shape} "
            f"of {where!r} differ in shape"
        )
    mask = raw_mask.astype(np.int32)
    planes = mask_planes_from_header(loaded["mask_header"]) or dict(DEFAULT_MASK_PLANES)
    mi = MaskedImage(image, variance, mask, planes)
    flag_no_data(mi, repr(where), "its VARIANCE extension must hold strictly positive variances")

    primary, image_header = loaded["primary"], loaded["image_header"]
    wcs = celestial_wcs(image_header) or celestial_wcs(primary)
    fwhm = positive_card(primary, PSF_FWHM_KEY)
    if fwhm is None:
        fwhm = positive_card(image_header, PSF_FWHM_KEY)
    if fwhm is None:
        fwhm = positive_card(primary, fwhm_key) or positive_card(image_header, fwhm_key)
    meta = header_meta(primary, drop_wcs_keys=wcs is not None)
    meta.pop(PSF_FWHM_KEY, None)
    return Exposure(mi, wcs=wcs, psf_fwhm=fwhm, meta=meta)


def _plain_exposure(
    loaded: dict[str, Any],
    gain: float | None,
    saturation: float | None,
    read_noise: float | None,
    fwhm_key: str,
) -> Exposure:
    header = loaded["header"]
    # An extension inherits the primary header's cards; its own cards win.
    headers = [header, loaded["primary"]] if loaded["index"] > 0 else [header]
    raw = loaded["data"]

    if saturation is None:
        saturation = first_number(headers, SATURATION_KEYS)
    if saturation is None:
        saturation = _integer_ceiling(raw, header)
    image = np.asarray(raw, dtype=np.float64)
    finite = np.isfinite(image)
    saturated = finite & (image >= saturation) if saturation is not None else np.zeros_like(finite)

    if gain is None:
        gain = first_number(headers, GAIN_KEYS, positive=True)
    if read_noise is None:
        read_noise = first_number(headers, READ_NOISE_KEYS, positive=True) or 0.0
    original_sky = first_number(headers, ORIGINAL_SKY_KEYS, positive=True)

    variance, info = estimate_variance(
        image,
        good=finite & ~saturated,
        gain=gain,
        read_noise=read_noise,
        original_sky=original_sky,
        where=loaded["where"],
    )
    image[~finite] = 0.0
    variance[~finite] = _NO_DATA_VARIANCE
    mi = MaskedImage(image, variance, None, dict(DEFAULT_MASK_PLANES))
    mi.set_plane("SAT", saturated)
    mi.set_plane("NO_DATA", ~finite)

    wcs = celestial_wcs(header)
    fwhm = None
    for h in headers:
        fwhm = positive_card(h, fwhm_key)
        if fwhm is not None:
            break
    meta: dict[str, Any] = {}
    for h in reversed(headers):
        meta.update(header_meta(h, drop_wcs_keys=wcs is not None))
    meta.update(info)
    if saturation is not None:
        meta["saturation"] = float(saturation)
    return Exposure(mi, wcs=wcs, psf_fwhm=fwhm, meta=meta)


def _integer_ceiling(raw: np.ndarray, header: fits.Header) -> float | None:
    """Largest value an integer image can hold (it marks saturation), else None."""
    if np.issubdtype(raw.dtype, np.integer):
        return float(np.iinfo(raw.dtype).max)
    bitpix = int(header.get("BITPIX", -64))
    if bitpix in (8, 16, 32, 64):
        bscale = float(header.get("BSCALE", 1.0))
        bzero = float(header.get("BZERO", 0.0))
        top = 255 if bitpix == 8 else 2 ** (bitpix - 1) - 1
        return top * bscale + bzero
    return None


def flag_no_data(mi: MaskedImage, where: str, fix: str) -> None:
    """Flag non-finite pixels and unusable variances NO_DATA, with placeholder values.

    Refuses a variance plane that is unusable wherever there is data: a sign error,
    or another plane stored in its place, rather than a few bad pixels. Flagging it
    all NO_DATA would only be refused later as an image without data.

    Parameters
    ----------
    mi : MaskedImage
        Flagged in place.
    where : str
        What to call the input in the error (its path).
    fix : str
        The end of the error: what the variance's source must hold.

    Raises
    ------
    InputError
        If the variance is negative, NaN or infinite at every pixel with data.
    """
    bad_image = ~np.isfinite(mi.image)
    with np.errstate(invalid="ignore"):
        negative = mi.variance < 0
        bad_variance = ~np.isfinite(mi.variance) | negative
    if not (bad_image.any() or bad_variance.any()):
        return
    has_data = ~bad_image & ~mi.plane("NO_DATA")
    n_data = int(np.count_nonzero(has_data))
    if n_data and np.count_nonzero(bad_variance & has_data) == n_data:
        n_negative = int(np.count_nonzero(negative & has_data))
        counts = (("negative", n_negative), ("NaN or infinite", n_data - n_negative))
        kinds = ", ".join(kind for kind, n in counts if n)
        raise InputError(
            f"{where}: variance is {kinds} at every pixel with data ({n_data} pixels); {fix}"
        )
    mi.image[bad_image] = 0.0
    mi.variance[bad_image | bad_variance] = _NO_DATA_VARIANCE
    mi.set_plane("NO_DATA", bad_image | bad_variance)
