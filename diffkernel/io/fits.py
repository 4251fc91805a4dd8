"""Read and write exposures as FITS files.

Two on-disk layouts are read:

* **multi-extension** (what :func:`write_exposure` writes, and LSST's ``afw`` layout): an
  empty primary HDU holding the metadata, then ``IMAGE``, ``MASK`` and ``VARIANCE`` image
  extensions, found by ``EXTNAME``. The ``MASK`` header names its planes with one card per
  plane, ``MP_<NAME> = bit``, as LSST writes them.
* **space-telescope products** (HST, JWST): ``SCI``, ``ERR`` (1-sigma, in the image's
  units: variance ``ERR**2``) and ``DQ`` (bit flags mapped onto mask planes by the
  mission's table) extensions; see :mod:`diffkernel.io.planes`. A file with several
  ``SCI`` extensions (chips) is read with ``hdu=("SCI", n)``.
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

Noise and mask planes may also come as separate files (HOTPANTS's ``-ini``/``-imi``):
``read_exposure(path, noise=..., mask=...)``, a noise file being a sigma image.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits

from ..errors import DiffkernelError, InputError, StoreError
from ..image import DEFAULT_MASK_PLANES, Exposure, MaskedImage
from ..prep.variance import estimate_variance
from .fits_write import write_exposure
from .header import (
    PSF_FWHM_KEY,
    celestial_wcs,
    first_number,
    header_meta,
    mask_planes_from_header,
    positive_card,
)
from .planes import dq_table, dq_to_mask, flag_no_data, read_plane, sigma_to_variance

__all__ = [
    "GAIN_KEYS",
    "exposure_from_hdus",
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


# --------------------------------------------------------------------------- reading


def read_exposure(
    path: PathLike,
    *,
    hdu: int | str | None = None,
    gain: float | None = None,
    saturation: float | None = None,
    read_noise: float | None = None,
    fwhm_key: str = "FWHM",
    noise: str | os.PathLike | None = None,
    mask: str | os.PathLike | None = None,
) -> Exposure:
    """Read an exposure from a FITS file, estimating the variance of a plain image.

    Parameters
    ----------
    path : str or os.PathLike
        FITS file (gzip-compressed and tile-compressed files work too).
    hdu : int, str or (str, int), optional
        Read this HDU as a plain image, skipping layout detection; ``("SCI", n)`` reads
        chip ``n`` of a space-telescope file with its ``ERR`` and ``DQ``. By default a file
        with ``IMAGE``/``MASK``/``VARIANCE`` extensions is read as a stored exposure, one
        with a ``SCI`` extension as a space-telescope product, any other file from its
        first HDU holding a 2-D image.
    gain : float, optional
        Gain in e-/ADU for the variance of a plain image; defaults to the header.
    saturation : float, optional
        Saturation level in ADU of a plain image; defaults to the header.
    read_noise : float, optional
        Read noise in electrons of a plain image; defaults to the header, else 0.
    fwhm_key : str, optional
        Header card holding the PSF FWHM in pixels. Default ``"FWHM"``.
    noise : str or os.PathLike, optional
        A FITS file holding the image's 1-sigma noise, in the image's units (HOTPANTS's
        ``-ini``/``-tni``): the variance is its square, replacing the file's own.
    mask : str or os.PathLike, optional
        A FITS file whose non-zero pixels are bad (HOTPANTS's ``-imi``/``-tmi``): they are
        flagged ``BAD``, in addition to the file's own mask.

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
    _check_numbers(gain, saturation, read_noise)
    source = Path(path)
    if not source.exists():
        raise StoreError(f"{str(source)!r} does not exist")
    if source.is_dir():
        raise StoreError(f"{str(source)!r} is a directory, not a FITS file")
    loaded = _load(source, hdu)
    return _exposure(loaded, gain, saturation, read_noise, fwhm_key, noise, mask)


def exposure_from_hdus(
    hdus: fits.HDUList | Any,
    *,
    name: str = "HDU",
    hdu: Any = None,
    gain: float | None = None,
    saturation: float | None = None,
    read_noise: float | None = None,
    fwhm_key: str = "FWHM",
) -> Exposure:
    """An exposure from FITS HDUs in memory, read as :func:`read_exposure` reads a file.

    Parameters
    ----------
    hdus : astropy.io.fits.HDUList, or one PrimaryHDU/ImageHDU/CompImageHDU
        The HDUs (one HDU is read as a plain image, its header giving GAIN, WCS, ...).
    name : str, optional
        What to call it in errors.
    hdu, gain, saturation, read_noise, fwhm_key
        As for :func:`read_exposure`.

    Returns
    -------
    Exposure

    Raises
    ------
    InputError
        As :func:`read_exposure`, or if ``hdus`` are not FITS HDUs.
    """
    _check_numbers(gain, saturation, read_noise)
    if isinstance(hdus, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU):
        header = hdus.header.copy()
        hdus = fits.HDUList([fits.PrimaryHDU(hdus.data, header=header)])
    if not isinstance(hdus, fits.HDUList):
        raise InputError(f"{name} must be FITS HDUs, got {type(hdus).__name__}")
    return _exposure(_extract(hdus, hdu, name), gain, saturation, read_noise, fwhm_key)


def _check_numbers(gain: Any, saturation: Any, read_noise: Any) -> None:
    for name, value in (("gain", gain), ("read_noise", read_noise)):
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise InputError(f"{name} must be a finite, non-negative number, got {value!r}")
    if gain is not None and gain == 0:
        raise InputError("gain must be positive (e-/ADU), got 0")
    if saturation is not None and not np.isfinite(saturation):
        raise InputError(f"saturation must be a finite number, got {saturation!r}")


def _exposure(
    loaded: dict[str, Any],
    gain: float | None,
    saturation: float | None,
    read_noise: float | None,
    fwhm_key: str,
    noise: PathLike | None = None,
    mask: PathLike | None = None,
) -> Exposure:
    """The exposure of a loaded layout, with separate noise and mask files applied."""
    where = loaded["where"]
    shape = (loaded.get("image") if "image" in loaded else loaded["data"]).shape
    given_variance = None
    if noise is not None:
        given_variance = sigma_to_variance(read_plane(noise, shape, f"noise of {where!r}"))
    if loaded["layout"] == "stored":
        exposure = _stored_exposure(loaded, fwhm_key, given_variance)
    elif loaded["layout"] == "space":
        exposure = _space_exposure(loaded, gain, saturation, read_noise, fwhm_key, given_variance)
    else:
        exposure = _plain_exposure(loaded, gain, saturation, read_noise, fwhm_key, given_variance)
    if mask is not None:
        exposure.masked_image.set_plane("BAD", read_plane(mask, shape, f"mask of {where!r}") != 0)
        exposure.meta["mask_file"] = str(mask)
    if noise is not None:
        exposure.meta["noise_file"] = str(noise)
    return exposure


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


def _extract(hdul: fits.HDUList, hdu: Any, where: str) -> dict[str, Any]:
    primary_header = hdul[0].header.copy()
    chips = [h for h in hdul if h.name.upper() == "SCI" and _is_2d_image(h)]
    names = {h.name.upper() for h in hdul}
    if isinstance(hdu, tuple) and len(hdu) == 2 and str(hdu[0]).upper() == "SCI":
        return _extract_space(hdul, int(hdu[1]), where)
    if hdu is None and chips and not names & {"IMAGE", "MASK", "VARIANCE"}:
        if len(chips) > 1:
            versions = ", ".join(str(h.ver) for h in chips)
            raise InputError(
                f"{where!r} has {len(chips)} SCI extensions (EXTVER {versions}): read one "
                f"chip with hdu=('SCI', n)"
            )
        return _extract_space(hdul, chips[0].ver, where)
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


def _extract_space(hdul: fits.HDUList, extver: int, where: str) -> dict[str, Any]:
    """SCI, ERR and DQ of one chip (EXTVER) of a space-telescope product."""

    def find(name: str) -> Any:
        try:
            return hdul[(name, extver)]
        except KeyError:
            return None

    sci = find("SCI")
    if sci is None or not _is_2d_image(sci):
        raise InputError(f"{where!r} has no 2-D SCI extension with EXTVER {extver}")
    out: dict[str, Any] = {
        "layout": "space",
        "where": where,
        "primary": hdul[0].header.copy(),
        "header": sci.header.copy(),
        "index": hdul.index_of(sci),
        "data": _image_data(sci, where, "SCI"),
    }
    for name in ("ERR", "DQ"):
        h = find(name)
        out[name.lower()] = None if h is None or h.data is None else _image_data(h, where, name)
        if out[name.lower()] is not None and out[name.lower()].shape != out["data"].shape:
            raise InputError(
                f"{name} {out[name.lower()].shape} and SCI {out['data'].shape} of {where!r} "
                "differ in shape"
            )
    return out


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
    # One copy, in native byte order (FITS is big-endian): the pixel code would make it
    # anyway, and the file's buffer is dropped at once rather than when the file
    # closes, so a large input is held once, not twice or three times.
    data = np.asarray(data, dtype=data.dtype.newbyteorder("="))
    if data.base is not None or not data.flags.owndata:
        data = data.copy()
    del hdu.data
    if data.ndim > 2:
        data = data.reshape(data.shape[-2:])
    if data.ndim != 2:
        raise InputError(f"{what} of {where!r} is not a 2-D image (shape {data.shape})")
    return data


def _stored_exposure(
    loaded: dict[str, Any], fwhm_key: str, given_variance: np.ndarray | None = None
) -> Exposure:
    where = loaded["where"]
    image = np.asarray(loaded["image"], dtype=np.float64)
    stored = loaded["variance"] if given_variance is None else given_variance
    variance = np.asarray(stored, dtype=np.float64)
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
    given_variance: np.ndarray | None = None,
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

    if given_variance is not None:
        variance, info = given_variance.copy(), {"variance_model": "given"}
    else:
        variance, info = estimate_variance(
            image,
            good=finite & ~saturated,
            gain=gain,
            read_noise=read_noise,
            original_sky=original_sky,
            where=loaded["where"],
        )
    mi = MaskedImage(image, variance, None, dict(DEFAULT_MASK_PLANES))
    mi.set_plane("SAT", saturated)
    if loaded.get("dq") is not None:
        convention, table = dq_table(loaded["primary"])
        mi.mask |= dq_to_mask(loaded["dq"], table, mi.mask_planes)
        info["dq_convention"] = convention
    # Non-finite pixels and variances (ERR <= 0, a given plane's holes) become NO_DATA.
    flag_no_data(mi, repr(loaded["where"]), "its noise plane must hold positive values")

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


def _space_exposure(
    loaded: dict[str, Any],
    gain: float | None,
    saturation: float | None,
    read_noise: float | None,
    fwhm_key: str,
    given_variance: np.ndarray | None,
) -> Exposure:
    """A SCI/ERR/DQ chip: variance ERR**2 (in the image's units), DQ bits as mask planes."""
    if given_variance is None and loaded["err"] is not None:
        given_variance = sigma_to_variance(loaded["err"])
    exposure = _plain_exposure(loaded, gain, saturation, read_noise, fwhm_key, given_variance)
    if loaded["err"] is not None:
        exposure.meta["variance_model"] = "ERR**2"
    return exposure


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
