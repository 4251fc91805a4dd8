"""Masked images and exposures: the pixel containers every other module works on.

A :class:`MaskedImage` holds three aligned planes (image, variance, integer bit mask)
plus the mapping of mask-plane names to bits, as LSST's ``afw.image.MaskedImage`` does.
An :class:`Exposure` adds what is known about the sky: a WCS and the PSF width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "DEFAULT_MASK_PLANES",
    "MaskedImage",
    "Exposure",
    "pixel_validation_counts",
    "plane_bits",
    "report_validation",
    "UNUSABLE_PLANES",
    "unusable_planes",
    "with_mask_planes",
]

#: Mask planes that leave a pixel unusable whatever the kernel's ``badMaskPlanes``, for the
#: check that an input has a pixel left to fit and subtract: no data, or a pixel that the
#: instrument or pipeline condemned. (The fit leaves BAD pixels out only when
#: ``badMaskPlanes`` names the plane, but an image BAD everywhere has nothing to give.)
UNUSABLE_PLANES = ("NO_DATA", "BAD")


def with_mask_planes(planes: Mapping[str, int], names: Iterable[str]) -> dict[str, int]:
    """``planes`` plus each of ``names`` it lacks, on the lowest free bits, in order."""
    out = dict(planes)
    for name in names:
        if name not in out:
            out[name] = next(b for b in range(31) if b not in out.values())
    return out


def report_validation(name: str, counts: dict[str, int], bad_planes: Iterable[str]) -> None:
    """Raise the error :meth:`MaskedImage.validate` describes for these pixel counts.

    Parameters
    ----------
    name : str
        What to call the image ("template", "science").
    counts : dict of str to int
        :func:`pixel_validation_counts` of the image, or their sums over its tiles.
    bad_planes : iterable of str
        The exempt planes, named when the counts do not say which planes mask the image.

    Raises
    ------
    InputError
        Naming the image, the problem and how many pixels have it.
    """
    if counts.get("usable", counts["used"]) == 0:
        # Name the planes that do mask the pixels, the most common first: the fix
        # depends on which (an all-BAD mask is not an image without data).
        masked = sorted(
            (-n, key.removeprefix(_MASKED))
            for key, n in counts.items()
            if key.startswith(_MASKED) and n
        )
        planes = " or ".join(plane for _, plane in masked) or ", ".join(bad_planes)
        raise InputError(
            f"{name}: every pixel is masked {planes}: nothing to subtract; check the {name} "
            "image's mask (pixels in NO_DATA, BAD or the kernel's badMaskPlanes are not used)"
        )
    if counts["nan_image"]:
        raise InputError(
            f"{name}: {counts['nan_image']} pixel(s) are NaN or infinite but not masked "
            "NO_DATA; mask them or replace them"
        )
    if counts["nonfinite_variance"]:
        raise InputError(
            f"{name}: variance is NaN or infinite at "
            f"{_how_many(counts['nonfinite_variance'], counts['used'])}; variance must be "
            "finite and strictly positive"
        )
    if counts["nonpositive_variance"]:
        raise InputError(
            f"{name}: variance is zero or negative at "
            f"{_how_many(counts['nonpositive_variance'], counts['used'])}; variance must be "
            "strictly positive"
        )


#: Prefix of the :func:`pixel_validation_counts` keys that count the pixels of one plane.
_MASKED = "masked "


def _how_many(n: int, used: int) -> str:
    """``n`` unmasked pixels, said as all of them when they are (a wrong plane, not a few)."""
    if n == used:
        return f"every unmasked pixel ({n} pixels)"
    return f"{n} unmasked pixel(s)"


def _check_real(values: np.ndarray, name: str) -> None:
    """Refuse arrays that do not hold real numbers (complex, strings, objects, bools)."""
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(
        values.dtype, np.complexfloating
    ):
        raise InputError(f"{name} must hold real numbers, got dtype {values.dtype}")


#: Bits of the standard mask planes, in LSST's order.
DEFAULT_MASK_PLANES: dict[str, int] = {
    "BAD": 0,
    "SAT": 1,
    "INTRP": 2,
    "CR": 3,
    "EDGE": 4,
    "DETECTED": 5,
    "DETECTED_NEGATIVE": 6,
    "SUSPECT": 7,
    "NO_DATA": 8,
}


@dataclass
class MaskedImage:
    """An image with its variance and a bit mask of named planes.

    Parameters
    ----------
    image : numpy.ndarray
        2-D pixel values; converted to float64.
    variance : numpy.ndarray, optional
        Per-pixel variance, same shape as ``image``. Defaults to ones only when
        explicitly requested through :meth:`from_image`; here it is required.
    mask : numpy.ndarray, optional
        Integer bit mask, same shape; defaults to all zeros.
    mask_planes : dict of str to int, optional
        Mask plane name to bit number; defaults to :data:`DEFAULT_MASK_PLANES`.
    """

    image: np.ndarray
    variance: np.ndarray
    mask: np.ndarray | None = None
    mask_planes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MASK_PLANES))

    def __post_init__(self) -> None:
        image = np.asarray(self.image)
        if image.ndim != 2:
            raise InputError(f"image must be 2-D, got an array of shape {image.shape}")
        _check_real(image, "image")
        self.image = np.asarray(image, dtype=np.float64)
        variance = np.asarray(self.variance)
        if variance.shape != image.shape:
            raise InputError(
                f"variance shape {variance.shape} differs from image shape {image.shape}"
            )
        _check_real(variance, "variance")
        self.variance = np.asarray(variance, dtype=np.float64)
        if self.mask is None:
            self.mask = np.zeros(image.shape, dtype=np.int32)
        mask = np.asarray(self.mask)
        if mask.shape != image.shape:
            raise InputError(f"mask shape {mask.shape} differs from image shape {image.shape}")
        if not np.issubdtype(mask.dtype, np.integer):
            raise InputError(f"mask must be an integer bit mask, got dtype {mask.dtype}")
        if mask.size and not np.can_cast(mask.dtype, np.int32):
            # A wider mask would silently lose its high bits in the int32 conversion.
            low, high = int(mask.min()), int(mask.max())
            if low < 0 or high > np.iinfo(np.int32).max:
                raise InputError(
                    f"mask values must be bits 0..30 (0 <= value < 2**31), got values in "
                    f"[{low}, {high}] (dtype {mask.dtype})"
                )
        self.mask = mask.astype(np.int32, copy=False)
        planes = dict(self.mask_planes)
        for name, bit in planes.items():
            if not (0 <= int(bit) < 31):
                raise InputError(f"mask plane {name!r} has bit {bit}; bits must be in 0..30")
        if len(set(planes.values())) != len(planes):
            raise InputError(f"mask planes share bits: {planes}")
        self.mask_planes = {str(k): int(v) for k, v in planes.items()}

    @classmethod
    def from_image(
        cls,
        image: np.ndarray,
        variance: np.ndarray | float | None = None,
        mask: np.ndarray | None = None,
        mask_planes: Mapping[str, int] | None = None,
    ) -> MaskedImage:
        """Build a MaskedImage, broadcasting a scalar variance.

        Parameters
        ----------
        image : numpy.ndarray
            2-D pixel values.
        variance : numpy.ndarray or float, optional
            Variance plane or a constant variance. Required: pass it explicitly,
            since a guessed variance makes every statistic downstream dishonest.
        mask : numpy.ndarray, optional
            Integer bit mask.
        mask_planes : mapping, optional
            Mask plane name to bit.
        """
        image = np.asarray(image)
        if variance is None:
            raise InputError("variance is required: pass a plane or a constant")
        variance = np.asarray(variance)
        try:
            variance = np.broadcast_to(variance, image.shape).copy()
        except ValueError:
            raise InputError(
                f"variance of shape {variance.shape} does not match image shape {image.shape}; "
                "pass a plane of the image's shape or a constant"
            ) from None
        planes = dict(DEFAULT_MASK_PLANES if mask_planes is None else mask_planes)
        return cls(image, variance, mask, planes)

    @classmethod
    def from_validated(
        cls,
        image: np.ndarray,
        variance: np.ndarray,
        mask: np.ndarray,
        mask_planes: Mapping[str, int],
    ) -> MaskedImage:
        """Wrap planes that are already known to be valid, without copying them.

        No conversion and no check: the planes keep their dtype (float32 or float64
        pixels, integer mask). For pixels a validation pass has already accepted,
        such as the tiles of an input the Dask check stage went over.
        """
        out = cls.__new__(cls)
        out.image = image
        out.variance = variance
        out.mask = mask
        out.mask_planes = dict(mask_planes)
        return out

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(ny, nx)`` of the planes."""
        return self.image.shape  # type: ignore[return-value]

    def add_mask_plane(self, name: str) -> int:
        """Return the bit of plane ``name``, adding the plane if it is new."""
        if name in self.mask_planes:
            return self.mask_planes[name]
        used = set(self.mask_planes.values())
        bit = next(b for b in range(31) if b not in used)
        self.mask_planes[name] = bit
        return bit

    def bitmask(self, names: Iterable[str]) -> int:
        """Return the OR of the bits of the named planes; unknown names are ignored.

        A plane that this image does not define cannot be set in it, so ignoring
        it is exact, not lenient.
        """
        return plane_bits(self.mask_planes, names)

    def plane(self, name: str) -> np.ndarray:
        """Boolean array, True where plane ``name`` is set."""
        if name not in self.mask_planes:
            return np.zeros(self.shape, dtype=bool)
        return (self.mask & (1 << self.mask_planes[name])) != 0

    def set_plane(self, name: str, where: np.ndarray) -> None:
        """Set plane ``name`` (added if new) where ``where`` is True."""
        bit = self.add_mask_plane(name)
        self.mask[np.asarray(where, dtype=bool)] |= np.int32(1 << bit)

    def copy(self) -> MaskedImage:
        """Deep copy."""
        return MaskedImage(
            self.image.copy(), self.variance.copy(), self.mask.copy(), dict(self.mask_planes)
        )

    def validate(self, name: str = "image", bad_planes: Iterable[str] = ("NO_DATA",)) -> None:
        """Refuse pixels that would silently corrupt a fit.

        Pixels flagged in ``bad_planes`` may hold anything. Every other pixel must
        have a finite value and a finite, strictly positive variance.

        Parameters
        ----------
        name : str
            What to call this image in error messages ("template", "science").
        bad_planes : iterable of str
            Mask planes whose pixels are exempt from the checks.

        Raises
        ------
        InputError
            Naming the image, the problem and how many pixels have it.
        """
        report_validation(name, self.validation_counts(bad_planes), bad_planes)

    def validation_counts(self, bad_planes: Iterable[str] = ("NO_DATA",)) -> dict[str, int]:
        """Pixel counts behind :meth:`validate`, which add up over tiles of an image.

        Returns
        -------
        dict
            ``used`` (pixels not exempt), ``nan_image``, ``nonfinite_variance`` and
            ``nonpositive_variance`` among the used pixels; ``usable`` and the
            ``masked <PLANE>`` counts of :func:`pixel_validation_counts`, for the planes
            of :func:`unusable_planes`.
        """
        bad_planes = tuple(bad_planes)
        return pixel_validation_counts(
            self.image,
            self.variance,
            self.mask,
            self.bitmask(bad_planes),
            unusable_planes(self.mask_planes, bad_planes),
        )


def plane_bits(mask_planes: Mapping[str, int], names: Iterable[str]) -> int:
    """The OR of the bits of the named planes; names ``mask_planes`` lacks are ignored."""
    value = 0
    for name in names:
        if name in mask_planes:
            value |= 1 << mask_planes[name]
    return value


def unusable_planes(mask_planes: Mapping[str, int], bad_planes: Iterable[str]) -> dict[str, int]:
    """The planes whose pixels are not used: :data:`UNUSABLE_PLANES` and ``bad_planes``.

    Parameters
    ----------
    mask_planes : mapping of str to int
        The image's mask plane name to bit.
    bad_planes : iterable of str
        The planes the run leaves out (NO_DATA and the kernel's ``badMaskPlanes``).

    Returns
    -------
    dict of str to int
        Name to bit of each such plane the image defines (one it lacks masks nothing).
    """
    names = dict.fromkeys((*UNUSABLE_PLANES, *bad_planes))
    return {name: mask_planes[name] for name in names if name in mask_planes}


def pixel_validation_counts(
    image: np.ndarray,
    variance: np.ndarray,
    mask: np.ndarray,
    exempt_bits: int,
    unusable: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """:meth:`MaskedImage.validation_counts` of raw planes in any real dtype.

    Every count is a number of pixels, so the counts of the tiles of an image add up
    to the image's.

    Parameters
    ----------
    image, variance, mask : numpy.ndarray
        The planes of one region (float32 or float64 pixels, integer mask).
    exempt_bits : int
        Mask bits whose pixels are not checked.
    unusable : mapping of str to int, optional
        Planes (name to bit) whose pixels cannot be used (:func:`unusable_planes`);
        the exempt bits always count as unusable.

    Returns
    -------
    dict of str to int
        ``used`` (pixels not exempt); ``nan_image``, ``nonfinite_variance`` and
        ``nonpositive_variance`` among them; ``usable`` (pixels in no exempt or
        unusable plane) and ``masked <PLANE>`` (pixels in that plane) for each plane
        of ``unusable``.
    """
    unusable = dict(unusable or {})
    unusable_bits = exempt_bits | plane_bits(unusable, unusable.keys())
    flagged = mask & unusable_bits
    # No exempt or unusable pixel (the usual case): one pass over the mask.
    n_usable = mask.size if not flagged.any() else int(np.count_nonzero(flagged == 0))
    used = None if n_usable == mask.size else (flagged & exempt_bits) == 0
    n_used = mask.size if used is None else int(np.count_nonzero(used))
    if n_used == mask.size:  # no exempt pixel: no gathering
        var = variance
        nan_image = image.size - int(np.count_nonzero(np.isfinite(image)))
    else:
        var = variance[used]
        nan_image = int(np.count_nonzero(used & ~np.isfinite(image)))
    finite_var = np.isfinite(var)
    counts = {
        "used": n_used,
        "nan_image": nan_image,
        "nonfinite_variance": var.size - int(np.count_nonzero(finite_var)),
        "nonpositive_variance": int(np.count_nonzero(finite_var & (var <= 0))),
        "usable": n_usable,
    }
    for name, bit in unusable.items():
        # A region with every pixel usable has none in any such plane.
        in_plane = 0 if n_usable == mask.size else np.count_nonzero(flagged & (1 << bit))
        counts[_MASKED + name] = int(in_plane)
    return counts


FwhmModel = float | Callable[[float, float], float]


@dataclass
class Exposure:
    """A masked image with what is known about its sky and PSF.

    Parameters
    ----------
    masked_image : MaskedImage
        The pixels.
    wcs : astropy.wcs.WCS, optional
        Celestial WCS of the pixel grid (0-based pixel coordinates, as astropy uses).
    psf_fwhm : float or callable, optional
        PSF full width at half maximum in pixels: a constant, or a function
        ``fwhm(x, y)`` giving it across the image (a PSF model).
    meta : dict, optional
        Header-like metadata (e.g. the FITS header cards) carried along.
    """

    masked_image: MaskedImage
    wcs: Any = None
    psf_fwhm: FwhmModel | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape ``(ny, nx)`` of the pixel grid."""
        return self.masked_image.shape

    @property
    def mask_planes(self) -> dict[str, int]:
        """The mask planes the pixels declare (name to bit)."""
        return self.masked_image.mask_planes

    def astype(self, dtype: Any) -> Exposure:
        """The exposure with image and variance of ``dtype`` (float32: as cameras deliver
        them and Zarr keeps them); mask, WCS, PSF and metadata carried over."""
        mi = self.masked_image
        return Exposure(
            MaskedImage(mi.image.astype(dtype), mi.variance.astype(dtype), mi.mask, mi.mask_planes),
            self.wcs,
            self.psf_fwhm,
            dict(self.meta),
        )

    def fwhm_at(self, x: float, y: float) -> float | None:
        """PSF FWHM in pixels at pixel ``(x, y)``, or None when unknown."""
        if self.psf_fwhm is None:
            return None
        if callable(self.psf_fwhm):
            return float(self.psf_fwhm(x, y))
        return float(self.psf_fwhm)


def as_exposure(data: MaskedImage | Exposure, name: str) -> Exposure:
    """Wrap a MaskedImage in an Exposure; pass an Exposure through.

    Raises
    ------
    InputError
        If ``data`` is neither.
    """
    if isinstance(data, Exposure):
        return data
    if isinstance(data, MaskedImage):
        return Exposure(data)
    raise InputError(
        f"{name} must be a diffkernel Exposure or MaskedImage, got {type(data).__name__}; "
        "use diffkernel.io.fits.read_exposure or MaskedImage.from_image to build one"
    )
