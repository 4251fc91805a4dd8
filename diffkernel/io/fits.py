"""Read and write exposures as FITS files, and convert them to and from astropy NDData.

Two on-disk layouts are read:

* **multi-extension** (what :func:`write_exposure` writes, and LSST's ``afw`` layout): an
  empty primary HDU holding the metadata, then ``IMAGE``, ``MASK`` and ``VARIANCE`` image
  extensions, found by ``EXTNAME``. The ``MASK`` header names its planes with one card per
  plane, ``MP_<NAME> = bit``, as LSST writes them.
* **a plain image**: one 2-D image HDU (the primary, or the first HDU holding a 2-D image)
  with no variance and no mask. The variance is then *estimated*; see below.

Variance of a plain image
-------------------------
Everything downstream weights pixels by ``1 / variance`` and judges a difference image by
``difference / sqrt(variance)``, so the estimated plane must be honest: on blank sky,
``(image - background) / sqrt(variance)`` must have unit scatter. The reader measures

* the sky level: the sigma-clipped median of the good pixels;
* the sky noise: the sigma-clipped MAD standard deviation of the good pixels *after removing
  a coarse background map* (clipped medians in 64-pixel boxes, median-filtered over 3x3
  boxes, interpolated bilinearly). Without that step a sky gradient or an extended galaxy
  widens the pixel histogram and inflates the noise;

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

NDData
------
:func:`to_nddata` returns a :class:`~astropy.nddata.CCDData` whose ``mask`` is the boolean
"a defect plane is set" (every plane except ``DETECTED`` and ``DETECTED_NEGATIVE``, which
annotate rather than condemn), whose ``flags`` is the full int32 bit mask and whose ``meta``
(a FITS header) carries the plane names as ``MP_<NAME>`` cards (the same convention as the
``MASK`` HDU) and the PSF width as ``PSFFWHM``, so :func:`from_nddata` rebuilds the exposure
exactly. A CCDData written to disk and read back keeps only the boolean mask, which
:func:`from_nddata` turns into the ``BAD`` plane.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
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
from astropy.stats import sigma_clipped_stats
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator

from ..errors import DiffkernelError, InputError, StoreError
from ..image import DEFAULT_MASK_PLANES, Exposure, MaskedImage, as_exposure

__all__ = [
    "write_exposure",
    "read_exposure",
    "read_masked_image",
    "to_nddata",
    "from_nddata",
    "estimate_variance",
]

PathLike = str | os.PathLike

#: Header keywords tried, in order, for the gain (e-/ADU), read noise (e-) and saturation (ADU).
GAIN_KEYS = ("GAIN", "EGAIN", "GAINA")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "RON")
SATURATION_KEYS = ("ESATUR", "SATURATE", "SATURATI")
#: Keywords giving the sky level before it was subtracted (ADU).
ORIGINAL_SKY_KEYS = ("AVSKY", "SKYBRITE", "SKYLEVEL")
#: Card holding the PSF FWHM (pixels) in files written here.
PSF_FWHM_KEY = "PSFFWHM"
#: Planes that annotate pixels rather than mark them unusable.
ANNOTATION_PLANES = ("DETECTED", "DETECTED_NEGATIVE")

#: Poisson statistics must predict the measured sky variance to within this factor.
_POISSON_TOLERANCE = 1.25
#: Accepted range of measured / predicted sky variance when rescaling the source term.
_RESAMPLING_RANGE = (1.0 / 3.0, 1.5)
#: The sky counts as not subtracted when its level exceeds this many sky sigmas.
_PEDESTAL_SIGMAS = 5.0
#: Box size (pixels) of the coarse background map used to measure the sky noise.
_BACKGROUND_BOX = 64
#: Variance given to NO_DATA pixels; the flag, not this value, is what matters.
_NO_DATA_VARIANCE = 1.0

_STRUCTURAL_KEYS = frozenset(
    {
        "SIMPLE",
        "BITPIX",
        "NAXIS",
        "EXTEND",
        "XTENSION",
        "PCOUNT",
        "GCOUNT",
        "BZERO",
        "BSCALE",
        "BLANK",
        "EXTNAME",
        "EXTVER",
        "EXTLEVEL",
        "INHERIT",
        "CHECKSUM",
        "DATASUM",
        "END",
        "",
        "COMMENT",
        "HISTORY",
    }
)
_STRUCTURAL_RE = re.compile(
    r"^(NAXIS\d+|TFORM\d+|TTYPE\d+|TDIM\d+|TUNIT\d+|ZIMAGE|ZSIMPLE|ZEXTEND|ZTENSION|ZBITPIX|"
    r"ZNAXIS\d*|ZTILE\d+|ZCMPTYPE|ZNAME\d+|ZVAL\d+|ZBLOCKED|ZPCOUNT|ZGCOUNT|ZHECKSUM|ZDATASUM|"
    r"ZQUANTIZ|ZDITHER0|ZBLANK|ZSCALE|ZZERO|ZMASKCMP)$"
)
_WCS_KEY_RE = re.compile(
    r"^(WCSAXES|WCSNAME|CTYPE\d|CRPIX\d|CRVAL\d|CDELT\d|CUNIT\d|CROTA\d|CD\d_\d|PC\d_\d|"
    r"PV\d_\d+|PS\d_\d+|LONPOLE|LATPOLE|RADESYS|RADECSYS|EQUINOX|EPOCH|MJDREF|"
    r"A_ORDER|B_ORDER|AP_ORDER|BP_ORDER|A_\d+_\d+|B_\d+_\d+|AP_\d+_\d+|BP_\d+_\d+|"
    r"A_DMAX|B_DMAX)$"
)


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

    The file is written to a temporary file in the same directory and moved into place, so
    ``path`` either holds the complete new file or is left untouched.

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
    _atomic_write(hdul, target, overwrite)


def _check_writable(target: Path, overwrite: bool) -> None:
    parent = target.parent
    if not parent.is_dir():
        raise StoreError(f"cannot write {str(target)!r}: directory {str(parent)!r} does not exist")
    if target.is_dir():
        raise StoreError(f"cannot write {str(target)!r}: it is a directory")
    if target.exists() and not overwrite:
        raise StoreError(f"{str(target)!r} already exists; pass overwrite=True to replace it")


def _build_hdulist(
    exposure: Exposure, extra_header: Mapping[str, Any] | fits.Header | None
) -> fits.HDUList:
    mi = exposure.masked_image
    wcs_header = _wcs_header(exposure.wcs)

    primary = fits.PrimaryHDU()
    skipped = _add_cards(
        primary.header, exposure.meta, drop_wcs_keys=wcs_header is not None, strict=False
    )
    if skipped:
        warnings.warn(
            f"meta entries not valid as FITS cards were not written: {', '.join(skipped)}",
            UserWarning,
            stacklevel=3,
        )
    if extra_header is not None:
        extra = extra_header.items() if isinstance(extra_header, fits.Header) else extra_header
        _add_cards(primary.header, dict(extra), drop_wcs_keys=False, strict=True)
    fwhm = exposure.psf_fwhm
    if fwhm is not None and not callable(fwhm):
        primary.header[PSF_FWHM_KEY] = (float(fwhm), "PSF FWHM [pixels]")
    if wcs_header is not None:
        primary.header.update(wcs_header)

    image = fits.ImageHDU(np.asarray(mi.image, dtype=np.float64), name="IMAGE")
    mask = fits.ImageHDU(np.asarray(mi.mask, dtype=np.int32), name="MASK")
    variance = fits.ImageHDU(np.asarray(mi.variance, dtype=np.float64), name="VARIANCE")
    with warnings.catch_warnings():
        # Long plane names need HIERARCH cards, exactly as LSST writes them.
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        for name, bit in sorted(mi.mask_planes.items(), key=lambda item: item[1]):
            mask.header[f"MP_{name}"] = int(bit)
    for hdu in (image, mask, variance):
        if wcs_header is not None:
            hdu.header.update(wcs_header)
    return fits.HDUList([primary, image, mask, variance])


def _wcs_header(wcs: Any) -> fits.Header | None:
    if wcs is None:
        return None
    if not isinstance(wcs, WCS):
        low_level = getattr(wcs, "low_level_wcs", None)
        if not isinstance(low_level, WCS):
            raise InputError(
                f"exposure.wcs must be an astropy.wcs.WCS to be written, got {type(wcs).__name__}"
            )
        wcs = low_level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FITSFixedWarning)
        return wcs.to_header(relax=True)


def _add_cards(
    header: fits.Header, cards: Mapping[str, Any], *, drop_wcs_keys: bool, strict: bool
) -> list[str]:
    """Add valid FITS cards to ``header``; return the keys skipped (or raise if strict)."""
    skipped = []
    for key, value in cards.items():
        key = str(key)
        upper = key.upper()
        if upper in _STRUCTURAL_KEYS or _STRUCTURAL_RE.match(upper) or upper.startswith("MP_"):
            continue
        if drop_wcs_keys and _WCS_KEY_RE.match(upper):
            continue
        try:
            card = _make_card(key, value)
        except (ValueError, TypeError) as exc:
            if strict:
                raise InputError(
                    f"extra_header card {key!r} = {value!r} is not valid FITS: {exc}"
                ) from exc
            skipped.append(key)
            continue
        if key in header:
            del header[key]  # a later source overrides, never duplicates, a keyword
        header.append(card, end=True)
    return skipped


def _make_card(key: str, value: Any) -> fits.Card:
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], str):
        value, comment = value
    else:
        comment = ""
    if isinstance(value, np.generic):
        value = value.item()
    if not isinstance(value, bool | int | float | str):
        raise TypeError(f"values must be bool, int, float or str, not {type(value).__name__}")
    if isinstance(value, float) and not np.isfinite(value):
        raise ValueError("non-finite numbers are not allowed in FITS headers")
    if isinstance(value, str) and not (value.isascii() and value.isprintable()):
        raise ValueError("strings must be printable ASCII")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        card = fits.Card(key, value, comment)
        card.verify("exception")
        str(card)  # formats the card; raises for what cannot be written
    return card


def _atomic_write(hdul: fits.HDUList, target: Path, overwrite: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        # mkstemp creates the file private (0600); give it the mode a plain open() would.
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            hdul.writeto(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, target)
        else:
            _link_exclusive(tmp, target)
    except DiffkernelError:
        raise
    except Exception as exc:
        raise StoreError(f"failed to write {str(target)!r}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _link_exclusive(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target`` unless ``target`` exists, without a check-then-act race."""
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise StoreError(
            f"{str(target)!r} already exists; pass overwrite=True to replace it"
        ) from None
    except OSError:
        # Hard links unsupported on this file system: fall back to a checked replace.
        if target.exists():
            raise StoreError(
                f"{str(target)!r} already exists; pass overwrite=True to replace it"
            ) from None
        os.replace(tmp, target)


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
            raise InputError(f"{where!r} holds no 2-D image in any of its {len(hdul)} HDU(s)")
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
    planes = _planes_from_header(loaded["mask_header"]) or dict(DEFAULT_MASK_PLANES)
    mi = MaskedImage(image, variance, mask, planes)
    _flag_no_data(mi, repr(where), "its VARIANCE extension must hold strictly positive variances")

    primary, image_header = loaded["primary"], loaded["image_header"]
    wcs = _celestial_wcs(image_header) or _celestial_wcs(primary)
    fwhm = _positive(primary, PSF_FWHM_KEY)
    if fwhm is None:
        fwhm = _positive(image_header, PSF_FWHM_KEY)
    if fwhm is None:
        fwhm = _positive(primary, fwhm_key) or _positive(image_header, fwhm_key)
    meta = _meta(primary, drop_wcs_keys=wcs is not None)
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
        saturation = _first_number(headers, SATURATION_KEYS)
    if saturation is None:
        saturation = _integer_ceiling(raw, header)
    image = np.asarray(raw, dtype=np.float64)
    finite = np.isfinite(image)
    saturated = finite & (image >= saturation) if saturation is not None else np.zeros_like(finite)

    if gain is None:
        gain = _first_number(headers, GAIN_KEYS, positive=True)
    if read_noise is None:
        read_noise = _first_number(headers, READ_NOISE_KEYS, positive=True) or 0.0
    original_sky = _first_number(headers, ORIGINAL_SKY_KEYS, positive=True)

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

    wcs = _celestial_wcs(header)
    fwhm = None
    for h in headers:
        fwhm = _positive(h, fwhm_key)
        if fwhm is not None:
            break
    meta: dict[str, Any] = {}
    for h in reversed(headers):
        meta.update(_meta(h, drop_wcs_keys=wcs is not None))
    meta.update(info)
    if saturation is not None:
        meta["saturation"] = float(saturation)
    return Exposure(mi, wcs=wcs, psf_fwhm=fwhm, meta=meta)


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
    """Return the sky level, the sky noise about a coarse background map, and that map."""
    _, level, _ = sigma_clipped_stats(image, mask=~good, sigma=3.0, maxiters=10)
    background = _background_map(image, good, float(level))
    _, _, noise = sigma_clipped_stats(
        image - background, mask=~good, sigma=3.0, maxiters=10, stdfunc="mad_std"
    )
    return float(level), float(noise), background


def _background_map(image: np.ndarray, good: np.ndarray, level: float) -> np.ndarray:
    """Clipped medians in boxes, median-filtered over 3x3 boxes, interpolated bilinearly.

    The interpolation extrapolates linearly beyond the outer box centres, so a sky gradient
    is followed up to the image edges.
    """
    ny, nx = image.shape
    box = _BACKGROUND_BOX
    if min(ny, nx) < 2 * box:
        box = min(ny, nx) // 2
    if box < 8:
        return np.full(image.shape, level)
    my, mx = -(-ny // box), -(-nx // box)
    padded = np.full((my * box, mx * box), np.nan)
    padded[:ny, :nx] = np.where(good, image, np.nan)
    tiles = padded.reshape(my, box, mx, box).transpose(0, 2, 1, 3).reshape(my, mx, box * box)
    valid = np.isfinite(tiles)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyUserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        _, medians, _ = sigma_clipped_stats(tiles, mask=~valid, sigma=3.0, maxiters=5, axis=2)
    medians = np.asarray(np.ma.filled(medians, np.nan), dtype=np.float64)
    medians[valid.sum(axis=2) < 0.25 * box * box] = np.nan
    medians = np.where(np.isfinite(medians), medians, level)
    medians = ndimage.median_filter(medians, size=3, mode="nearest")
    if my < 2 or mx < 2:
        return np.full(image.shape, float(np.median(medians)))
    # Centres of the boxes; the last box in each direction may be cut short by the edge.
    cy = np.minimum(np.arange(my) * box + (box - 1) / 2, (np.arange(my) * box + ny - 1) / 2)
    cx = np.minimum(np.arange(mx) * box + (box - 1) / 2, (np.arange(mx) * box + nx - 1) / 2)
    interp = RegularGridInterpolator((cy, cx), medians, bounds_error=False, fill_value=None)
    yy, xx = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    return interp((yy, xx))


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


def _flag_no_data(mi: MaskedImage, where: str, fix: str) -> None:
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


def _planes_from_header(header: fits.Header) -> dict[str, int]:
    planes = {}
    for key, value in header.items():
        if key.upper().startswith("MP_") and isinstance(value, int) and not isinstance(value, bool):
            planes[key[3:]] = int(value)
    return planes


def _celestial_wcs(header: fits.Header) -> WCS | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, naxis=2)
    except Exception:  # noqa: BLE001 - a broken WCS is no WCS, not an unreadable image
        return None
    return wcs if wcs.has_celestial else None


def _meta(header: fits.Header, *, drop_wcs_keys: bool) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, value in header.items():
        upper = key.upper()
        if upper in _STRUCTURAL_KEYS or _STRUCTURAL_RE.match(upper):
            continue
        if drop_wcs_keys and _WCS_KEY_RE.match(upper):
            continue
        meta[key] = value
    return meta


def _first_number(
    headers: Iterable[fits.Header], keys: Iterable[str], *, positive: bool = False
) -> float | None:
    for key in keys:
        for header in headers:
            value = header.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if np.isfinite(value) and (value > 0 or not positive):
                    return float(value)
    return None


def _positive(header: Mapping[str, Any], key: str) -> float | None:
    value = header.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if np.isfinite(value) and value > 0:
            return float(value)
    return None


# --------------------------------------------------------------------------- NDData


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
    wcs = exp.wcs
    if wcs is not None and not isinstance(wcs, WCS):
        wcs = getattr(wcs, "low_level_wcs", wcs)
    meta = fits.Header()
    skipped = _add_cards(meta, exp.meta, drop_wcs_keys=wcs is not None, strict=False)
    if skipped:
        warnings.warn(
            f"meta entries not valid as FITS cards were left out: {', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        for name, bit in sorted(mi.mask_planes.items(), key=lambda item: item[1]):
            meta[f"MP_{name}"] = int(bit)
    if exp.psf_fwhm is not None and not callable(exp.psf_fwhm):
        meta[PSF_FWHM_KEY] = (float(exp.psf_fwhm), "PSF FWHM [pixels]")
    wcs = exp.wcs
    if wcs is not None and not isinstance(wcs, WCS):
        wcs = getattr(wcs, "low_level_wcs", wcs)
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
        meta = _meta(nd.meta, drop_wcs_keys=nd.wcs is not None)
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
    _flag_no_data(mi, "NDData", "its uncertainty must give positive, finite variances")

    fwhm = _positive(meta, PSF_FWHM_KEY)
    meta = {
        k: v
        for k, v in meta.items()
        if not str(k).upper().startswith("MP_") and str(k).upper() != PSF_FWHM_KEY
    }
    wcs = nd.wcs
    if wcs is not None and not isinstance(wcs, WCS):
        wcs = getattr(wcs, "low_level_wcs", wcs)
    return Exposure(mi, wcs=wcs, psf_fwhm=fwhm, meta=meta)


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
