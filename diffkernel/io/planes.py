"""Noise and bad pixels as other software delivers them: SCI/ERR/DQ, separate files.

Two conventions besides LSST's IMAGE/MASK/VARIANCE (read by :mod:`diffkernel.io.fits`):

* **Space-telescope products** (HST, JWST): a ``SCI`` extension (the image), an ``ERR``
  extension holding the 1-sigma uncertainty *in the image's own units* (e.g. MJy/sr for a
  JWST ``_cal``/``_i2d`` file, e-/s or counts for HST), so the variance is ``ERR**2``, and a
  ``DQ`` extension of bit flags, mapped onto the mask planes by :func:`dq_to_mask` with the
  table of the mission named by the primary header's ``TELESCOP`` (:data:`JWST_DQ`,
  :data:`HST_DQ`; any other: every set bit is ``BAD``). ``DQ`` is optional; without
  ``ERR`` the variance is estimated as for a plain image.
* **HOTPANTS-style separate files** (``-ini``/``-tni`` noise, ``-imi``/``-tmi`` mask): a
  noise image is a **sigma** image in the image's units, as HOTPANTS takes it, so the
  variance is its square (a variance image: pass its square root); a mask image flags
  ``BAD`` every pixel where it is non-zero. Both must have the image's shape.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from astropy.io import fits

from ..errors import InputError, StoreError
from ..image import MaskedImage

__all__ = [
    "HST_DQ",
    "JWST_DQ",
    "dq_table",
    "dq_to_mask",
    "flag_no_data",
    "read_plane",
    "sigma_to_variance",
]

#: Variance given to NO_DATA pixels; the flag, not this value, is what matters.
_NO_DATA_VARIANCE = 1.0

#: JWST pixel DQ bits (jwst.datamodels.dqflags) to the mask planes they set. DO_NOT_USE is
#: set by the JWST pipeline on every pixel it judges unusable, whatever the reason.
JWST_DQ: dict[int, str] = {
    1 << 0: "BAD",  # DO_NOT_USE
    1 << 1: "SAT",  # SATURATED
    1 << 2: "CR",  # JUMP_DET
    1 << 3: "NO_DATA",  # DROPOUT
    1 << 4: "CR",  # OUTLIER
    1 << 5: "SUSPECT",  # PERSISTENCE
    1 << 6: "SUSPECT",  # AD_FLOOR
    1 << 9: "NO_DATA",  # NON_SCIENCE
    1 << 10: "BAD",  # DEAD
    1 << 11: "BAD",  # HOT
    1 << 12: "SUSPECT",  # WARM
    1 << 13: "SUSPECT",  # LOW_QE
    1 << 16: "SUSPECT",  # NONLINEAR
    1 << 30: "BAD",  # OTHER_BAD_PIXEL
    1 << 31: "NO_DATA",  # REFERENCE_PIXEL
}
#: HST (ACS, WFC3) DQ bits to mask planes.
HST_DQ: dict[int, str] = {
    1: "NO_DATA",  # lost during compression
    2: "NO_DATA",  # replaced by fill value
    4: "BAD",  # bad detector pixel
    8: "BAD",  # masked by aperture feature
    16: "BAD",  # hot pixel
    32: "SUSPECT",  # CTE tail / unstable
    64: "SUSPECT",  # warm pixel
    128: "SUSPECT",  # bad column / bias structure
    256: "SAT",  # full-well saturation
    512: "SUSPECT",  # bad pixel in a reference file
    1024: "SUSPECT",  # charge trap
    2048: "SAT",  # A-to-D saturation
    4096: "CR",  # cosmic ray (AstroDrizzle)
    8192: "CR",  # cosmic ray (CR-SPLIT)
    16384: "SUSPECT",  # ghost or crosstalk
}


def dq_table(header: Mapping) -> tuple[str, dict[int, str] | None]:
    """The DQ convention of a file from its ``TELESCOP`` card: name and bit table.

    Parameters
    ----------
    header : astropy.io.fits.Header or mapping
        The primary header.

    Returns
    -------
    (str, dict or None)
        ``("JWST", JWST_DQ)``, ``("HST", HST_DQ)`` or ``("unknown", None)`` (every set bit
        is then ``BAD``).
    """
    telescope = str(header.get("TELESCOP", "")).strip().upper()
    if telescope == "JWST":
        return "JWST", JWST_DQ
    if telescope == "HST":
        return "HST", HST_DQ
    return "unknown", None


def dq_to_mask(
    dq: np.ndarray, table: Mapping[int, str] | None, mask_planes: Mapping[str, int]
) -> np.ndarray:
    """A DQ array as an int32 mask in ``mask_planes``' bits.

    Parameters
    ----------
    dq : numpy.ndarray
        Integer bit flags.
    table : mapping of int to str, or None
        DQ bit value to plane name (bits not listed are ignored); None: any set bit is BAD.
    mask_planes : mapping of str to int
        Plane name to bit of the mask written.

    Returns
    -------
    numpy.ndarray
        int32, ``dq``'s shape.

    Raises
    ------
    InputError
        If ``dq`` is not an integer array.
    """
    if not np.issubdtype(dq.dtype, np.integer):
        raise InputError(f"the DQ extension must hold integer flags, not {dq.dtype}")
    flags = dq.astype(np.int64)
    mask = np.zeros(dq.shape, dtype=np.int32)
    if table is None:
        mask[flags != 0] |= np.int32(1 << mask_planes["BAD"])
        return mask
    for bit, plane in table.items():
        mask[(flags & bit) != 0] |= np.int32(1 << mask_planes[plane])
    return mask


def sigma_to_variance(sigma: np.ndarray) -> np.ndarray:
    """Variance from a 1-sigma image; pixels with sigma <= 0 or not finite become NaN.

    NaN marks them for :func:`flag_no_data` (a zero sigma, as ERR holds
    outside the data, is no measurement).
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(sigma) & (sigma > 0), sigma * sigma, np.nan)


def read_plane(path: str | os.PathLike, shape: tuple[int, int], what: str) -> np.ndarray:
    """The first 2-D image of a FITS file, checked against the image's shape.

    Parameters
    ----------
    path : str or os.PathLike
        The file (a noise or mask image).
    shape : (int, int)
        The image's shape, which the plane must have.
    what : str
        What the file is, for the errors (e.g. ``"science noise"``).

    Returns
    -------
    numpy.ndarray

    Raises
    ------
    StoreError
        If the file does not exist.
    InputError
        If it is not FITS, holds no 2-D image, or its shape differs.
    """
    source = Path(path)
    if not source.is_file():
        raise StoreError(f"{what} file {str(source)!r} does not exist")
    try:
        with fits.open(source, memmap=False) as hdul:
            data = next(
                (np.array(h.data) for h in hdul if h.is_image and getattr(h.data, "ndim", 0) >= 2),
                None,
            )
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"{what} file {str(source)!r} is not readable FITS: {exc}") from exc
    if data is None:
        raise InputError(f"{what} file {str(source)!r} holds no 2-D image")
    data = data.reshape(data.shape[-2:])
    if data.shape != tuple(shape):
        raise InputError(
            f"{what} file {str(source)!r} is {data.shape[0]}x{data.shape[1]}, "
            f"the image {shape[0]}x{shape[1]}: they must match pixel for pixel"
        )
    return data


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
