"""FITS header cards: metadata in and out of headers, mask-plane and PSF cards, the WCS.

Shared by the FITS files (:mod:`diffkernel.io.fits`), the NDData conversion
(:mod:`diffkernel.io.nddata`, whose ``meta`` is a FITS header) and the Zarr image groups
(:mod:`diffkernel.io.zarr.layout`, which store the WCS as its cards).

* An exposure's ``meta`` becomes cards with :func:`add_cards`, which leaves out what the
  file's structure owns (``NAXIS``, ``EXTNAME``, compression cards, ...), the ``MP_`` cards
  (written from the mask planes instead) and, when a WCS is written, the WCS cards (the
  WCS object is the truth); cards that are not valid FITS are reported, not written.
  :func:`header_meta` is the inverse.
* Mask planes are named by one card per plane, ``MP_<NAME> = bit``, as LSST writes them
  (:func:`add_mask_plane_cards`, :func:`mask_planes_from_header`), and a constant PSF
  width by :data:`PSF_FWHM_KEY` (:func:`add_psf_fwhm_card`).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from ..errors import InputError

__all__ = [
    "PSF_FWHM_KEY",
    "SOURCE_KEY",
    "add_cards",
    "add_mask_plane_cards",
    "add_psf_fwhm_card",
    "celestial_wcs",
    "first_number",
    "header_meta",
    "mask_planes_from_header",
    "positive_card",
    "wcs_header",
]

#: Card holding the PSF FWHM (pixels) in files written here.
PSF_FWHM_KEY = "PSFFWHM"
#: Metadata entry naming the file an image was ingested from (absolute path), so that a
#: result's provenance names the user's file rather than a temporary store.
SOURCE_KEY = "DKSOURCE"

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


# --------------------------------------------------------------------------- metadata


def add_cards(
    header: fits.Header, cards: Mapping[str, Any], *, drop_wcs_keys: bool, strict: bool
) -> list[str]:
    """Add valid FITS cards to ``header``; return the keys skipped (or raise if strict).

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header to add to; a key already there is replaced, never duplicated.
    cards : mapping
        Key to value, or to ``(value, comment)``. Values must be bool, int, finite float
        or printable ASCII str. Structural and ``MP_`` keys are left out.
    drop_wcs_keys : bool
        Leave out WCS keys too (when the WCS is written from the WCS object).
    strict : bool
        Raise for a card that is not valid FITS instead of skipping it.

    Returns
    -------
    list of str
        Keys skipped as not valid FITS.

    Raises
    ------
    InputError
        With ``strict``, for a card that is not valid FITS.
    """
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


def header_meta(header: fits.Header, *, drop_wcs_keys: bool) -> dict[str, Any]:
    """The metadata cards of a header: all but the structural (and, optionally, WCS) ones.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header read.
    drop_wcs_keys : bool
        Leave out WCS keys (when the WCS is kept as a WCS object).

    Returns
    -------
    dict
        Key to value, in header order.
    """
    meta: dict[str, Any] = {}
    for key, value in header.items():
        upper = key.upper()
        if upper in _STRUCTURAL_KEYS or _STRUCTURAL_RE.match(upper):
            continue
        if drop_wcs_keys and _WCS_KEY_RE.match(upper):
            continue
        meta[key] = value
    return meta


def first_number(
    headers: Iterable[fits.Header], keys: Iterable[str], *, positive: bool = False
) -> float | None:
    """The first finite number found under ``keys`` (in order) in ``headers`` (in order).

    Parameters
    ----------
    headers : iterable of astropy.io.fits.Header
        Headers searched, the one whose cards win first.
    keys : iterable of str
        Keywords tried, the preferred first.
    positive : bool, optional
        Accept only numbers > 0.

    Returns
    -------
    float or None
    """
    for key in keys:
        for header in headers:
            value = header.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                if np.isfinite(value) and (value > 0 or not positive):
                    return float(value)
    return None


def positive_card(header: Mapping[str, Any], key: str) -> float | None:
    """The value of card ``key`` when it is a finite number > 0, else None.

    Parameters
    ----------
    header : astropy.io.fits.Header or mapping
        Cards.
    key : str
        Keyword.

    Returns
    -------
    float or None
    """
    value = header.get(key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        if np.isfinite(value) and value > 0:
            return float(value)
    return None


# --------------------------------------------------------------------------- planes, PSF


def add_mask_plane_cards(header: fits.Header, mask_planes: Mapping[str, int]) -> None:
    """Name the mask planes with ``MP_<NAME> = bit`` cards, in bit order.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header to add to.
    mask_planes : mapping of str to int
        Plane name to bit.
    """
    with warnings.catch_warnings():
        # Long plane names need HIERARCH cards, exactly as LSST writes them.
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)
        for name, bit in sorted(mask_planes.items(), key=lambda item: item[1]):
            header[f"MP_{name}"] = int(bit)


def mask_planes_from_header(header: fits.Header) -> dict[str, int]:
    """The mask planes named by the ``MP_<NAME> = bit`` cards of a header.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header of a ``MASK`` extension.

    Returns
    -------
    dict of str to int
        Empty when there are no such cards.
    """
    planes = {}
    for key, value in header.items():
        if key.upper().startswith("MP_") and isinstance(value, int) and not isinstance(value, bool):
            planes[key[3:]] = int(value)
    return planes


def add_psf_fwhm_card(header: fits.Header, psf_fwhm: Any) -> None:
    """Write a constant PSF FWHM as :data:`PSF_FWHM_KEY`; a callable or None is not written.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header to add to.
    psf_fwhm : float, callable or None
        ``Exposure.psf_fwhm``.
    """
    if psf_fwhm is not None and not callable(psf_fwhm):
        header[PSF_FWHM_KEY] = (float(psf_fwhm), "PSF FWHM [pixels]")


# --------------------------------------------------------------------------- WCS


def wcs_header(wcs: Any) -> fits.Header | None:
    """The cards of a WCS, ``wcs.to_header(relax=True)`` (SIP terms included).

    Parameters
    ----------
    wcs : astropy.wcs.WCS, an object with ``low_level_wcs`` that is one, or None
        The WCS.

    Returns
    -------
    astropy.io.fits.Header or None
        None for None.

    Raises
    ------
    InputError
        If ``wcs`` is of another type.
    """
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


def celestial_wcs(header: fits.Header) -> WCS | None:
    """The 2-D celestial WCS of a header, or None when it has none or a broken one.

    Parameters
    ----------
    header : astropy.io.fits.Header
        Header read.

    Returns
    -------
    astropy.wcs.WCS or None
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FITSFixedWarning)
            wcs = WCS(header, naxis=2)
    except Exception:  # noqa: BLE001 - a broken WCS is no WCS, not an unreadable image
        return None
    return wcs if wcs.has_celestial else None
