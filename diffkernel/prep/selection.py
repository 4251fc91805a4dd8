"""Kernel candidates from a source list: placement, vetting, ranking and cells.

A source becomes a candidate when its whole template cutout (stamp plus kernel
border) lies inside the image, no pixel of that cutout or of the science stamp is
flagged in ``badMaskPlanes``, and it has enough signal to noise in both images.
Candidates are rated by the mean S/N of the science image in their core
(``candidateCoreRadius``; highest first) and placed in spatial cells of
``sizeCellX`` by ``sizeCellY`` pixels.
"""

from __future__ import annotations

import functools

import numpy as np
from astropy.table import Table
from numpy.lib.stride_tricks import as_strided

from ..errors import InputError
from ..image import Exposure, MaskedImage

__all__ = [
    "source_positions",
    "place_centres",
    "vet_positions",
    "assign_cells",
    "core_flux_snr",
    "aperture_flux_snr",
    "core_snr",
]


def source_positions(sources: Table, science: Exposure) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (0-based x, y) of a source table.

    Parameters
    ----------
    sources : astropy.table.Table
        Columns ``x``, ``y`` (pixels, 0-based), or ``ra``, ``dec`` (degrees) with a
        science WCS to convert them.
    science : Exposure
        The science exposure (its WCS is used for ``ra``/``dec``).
    """
    names = {n.lower(): n for n in sources.colnames}
    if "x" in names and "y" in names:
        x = _coordinate_column(sources, names["x"])
        y = _coordinate_column(sources, names["y"])
    elif "ra" in names and "dec" in names:
        if science.wcs is None:
            raise InputError(
                "kernelSources gives ra/dec but the science exposure has no WCS to place them"
            )
        x, y = science.wcs.world_to_pixel_values(
            _coordinate_column(sources, names["ra"]),
            _coordinate_column(sources, names["dec"]),
        )
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    else:
        raise InputError(f"kernelSources needs columns x, y or ra, dec; it has {sources.colnames}")
    return x, y


def _coordinate_column(sources: Table, name: str) -> np.ndarray:
    """Column ``name`` of the source table as a 1-D float64 array."""
    column = np.asarray(sources[name])
    if column.ndim != 1 or not (
        np.issubdtype(column.dtype, np.integer) or np.issubdtype(column.dtype, np.floating)
    ):
        raise InputError(
            f"kernelSources column {name!r} must hold one real number per source, got "
            f"dtype {column.dtype} and shape {column.shape}"
        )
    return column.astype(np.float64)


def place_centres(
    x: np.ndarray, y: np.ndarray, shape: tuple[int, int], margin: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rounded integer centres, and 'not finite' or 'edge' where a source cannot be used.

    'edge' means the ``(2 margin + 1)^2`` box around the centre leaves the image.
    Centres of non-finite positions are 0.
    """
    ny, nx = shape
    reason = np.full(len(x), "", dtype=object)
    finite = np.isfinite(x) & np.isfinite(y)
    reason[~finite] = "not finite"
    xc = np.where(finite, np.round(np.where(finite, x, 0)), 0).astype(np.intp)
    yc = np.where(finite, np.round(np.where(finite, y, 0)), 0).astype(np.intp)
    inside = (xc - margin >= 0) & (yc - margin >= 0) & (xc + margin < nx) & (yc + margin < ny)
    reason[(reason == "") & ~inside] = "edge"
    return xc, yc, reason


def vet_positions(
    template: MaskedImage,
    science: MaskedImage,
    x: np.ndarray,
    y: np.ndarray,
    half_stamp: int,
    half_kernel: int,
    bad_planes: tuple[str, ...],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer centres and the first rejection reason of each source ('' if none).

    Returns
    -------
    xc, yc : numpy.ndarray
        Rounded integer centres.
    reason : numpy.ndarray of str
        '' (usable), 'not finite', 'edge', 'masked' or 'duplicate'.
    """
    ny, nx = template.shape
    n = len(x)
    ht = half_stamp + half_kernel
    xc, yc, reason = place_centres(x, y, template.shape, ht)
    inside = reason == ""
    bad_t = (template.mask & template.bitmask(bad_planes)) != 0
    bad_s = (science.mask & science.bitmask(bad_planes)) != 0
    # Counting masked pixels over every cutout at once: summed-area tables.
    count_t = _box_counts(bad_t, xc, yc, ht)
    count_s = _box_counts(bad_s, xc, yc, half_stamp)
    masked = inside & ((count_t > 0) | (count_s > 0))
    reason[(reason == "") & masked] = "masked"
    # Two sources on one pixel would be one candidate twice.
    key = yc * nx + xc
    _, first = np.unique(np.where(reason == "", key, -1 - np.arange(n)), return_index=True)
    dup = np.ones(n, dtype=bool)
    dup[first] = False
    reason[(reason == "") & dup] = "duplicate"
    return xc, yc, reason


def _box_counts(flags: np.ndarray, xc: np.ndarray, yc: np.ndarray, half: int) -> np.ndarray:
    """Number of True pixels in the ``(2 half + 1)^2`` box at each centre (clipped)."""
    if not flags.any():  # the usual case: nothing to count
        return np.zeros(len(xc), dtype=np.int64)
    ny, nx = flags.shape
    sat = np.zeros((ny + 1, nx + 1), dtype=np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(flags, axis=0), axis=1)
    x0 = np.clip(xc - half, 0, nx)
    x1 = np.clip(xc + half + 1, 0, nx)
    y0 = np.clip(yc - half, 0, ny)
    y1 = np.clip(yc + half + 1, 0, ny)
    return sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]


def core_flux_snr(
    stamps: np.ndarray, variances: np.ndarray, radius: float
) -> tuple[np.ndarray, np.ndarray]:
    """Background-subtracted flux in a circular aperture, and its signal to noise.

    The background is the median of the stamp's outer ring (pixels beyond
    ``0.8`` of the half-width).

    Parameters
    ----------
    stamps, variances : numpy.ndarray
        ``(N, S, S)``.
    radius : float
        Aperture radius in pixels.
    """
    n, s, _ = stamps.shape
    c = s // 2
    # The stamps stacked into one (N S, S) plane, centre i at (c, i S + c).
    column = stamps.reshape(n * s, s)
    return aperture_flux_snr(
        column, variances.reshape(n * s, s), np.full(n, c), np.arange(n) * s + c, c, radius
    )


def aperture_flux_snr(
    image: np.ndarray,
    variance: np.ndarray,
    xc: np.ndarray,
    yc: np.ndarray,
    half: int,
    radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`core_flux_snr` of the ``(2 half + 1)^2`` stamps at integer centres.

    The pixels of each aperture and ring are gathered straight from ``image`` and
    ``variance`` (any float dtype; summed in float64), with no stamps cut: the same
    values in the same order, so the same results, at a third of the memory traffic.

    Parameters
    ----------
    image, variance : numpy.ndarray
        2-D planes holding every stamp.
    xc, yc : numpy.ndarray
        Integer centres, at least ``half`` pixels inside the planes.
    half : int
        Half-width of the stamps.
    radius : float
        Aperture radius in pixels.
    """
    ring_dy, ring_dx, ap_dy, ap_dx = _aperture_offsets(int(half), float(radius))
    sky = _row_medians(_gather(image, xc, yc, ring_dy, ring_dx))
    flux = (_gather(image, xc, yc, ap_dy, ap_dx) - sky[:, None]).sum(axis=1)
    noise = np.sqrt(_gather(variance, xc, yc, ap_dy, ap_dx).sum(axis=1))
    return flux, flux / noise


def core_snr(
    image: np.ndarray,
    variance: np.ndarray,
    xc: np.ndarray,
    yc: np.ndarray,
    half: int,
    core_radius: int,
) -> np.ndarray:
    """Mean signal to noise per pixel in the core of each stamp: a candidate's rating.

    As ip_diffim's ``KernelCandidate`` rates candidates (the mean of pixel / sigma over
    the core of the image matched to), with the local sky, the median of the stamp's
    outer ring as in :func:`aperture_flux_snr`, subtracted first, since inputs here may
    keep their sky. The core is the ``2 r x 2 r`` box of the core statistics
    (:func:`~diffkernel.kernel.candidate.core_selector`: offsets ``-r .. r - 1``).

    Parameters
    ----------
    image, variance : numpy.ndarray
        2-D planes holding every stamp.
    xc, yc : numpy.ndarray
        Integer centres, at least ``half`` pixels inside the planes.
    half : int
        Half-width of the stamps (``half >= core_radius``).
    core_radius : int
        ``candidateCoreRadius``.
    """
    ring_dy, ring_dx, _, _ = _aperture_offsets(int(half), 0.0)
    r = int(core_radius)
    dy, dx = (d.ravel() for d in np.mgrid[-r:r, -r:r])
    sky = _row_medians(_gather(image, xc, yc, ring_dy, ring_dx))
    signal = _gather(image, xc, yc, dy, dx) - sky[:, None]
    return (signal / np.sqrt(_gather(variance, xc, yc, dy, dx))).mean(axis=1)


def _gather(
    plane: np.ndarray, xc: np.ndarray, yc: np.ndarray, dy: np.ndarray, dx: np.ndarray
) -> np.ndarray:
    """``(N, P)`` pixels at offsets ``(dy, dx)`` from each integer centre, as float64."""
    xc = np.asarray(xc, dtype=np.intp)[:, None]
    yc = np.asarray(yc, dtype=np.intp)[:, None]
    flat = _flat_rows(plane)
    if flat is not None:  # one flat index per pixel: several times faster
        flat, width = flat
        values = np.take(flat, (yc * width + xc) + (dy * width + dx))
    else:
        values = plane[yc + dy, xc + dx]
    return values.astype(np.float64, copy=False)


def _flat_rows(plane: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``plane``'s pixels as one flat view and its row pitch, or None.

    For a plane whose rows are contiguous (a C-contiguous array, or a region view
    of a bigger one), pixel ``(y, x)`` is ``flat[y * pitch + x]``; the view spans
    only the plane's own rows. None for any other layout.
    """
    item = plane.itemsize
    if plane.ndim != 2 or plane.size == 0:
        return None
    if plane.flags.c_contiguous:
        return plane.reshape(-1), plane.shape[1]
    row, column = plane.strides
    if column != item or row <= 0 or row % item:
        return None
    pitch = row // item
    span = (plane.shape[0] - 1) * pitch + plane.shape[1]
    return as_strided(plane, shape=(span,), strides=(item,), writeable=False), pitch


@functools.lru_cache(maxsize=8)
def _aperture_offsets(half: int, radius: float) -> tuple[np.ndarray, ...]:
    """Row and column offsets of the ring and of the aperture, in stamp raster order."""
    s = 2 * half + 1
    yy, xx = np.mgrid[0:s, 0:s] - half
    rr = np.hypot(xx, yy).ravel()
    ring = np.flatnonzero(rr >= 0.8 * half)
    aperture = np.flatnonzero(rr <= radius)
    offsets = (ring // s - half, ring % s - half, aperture // s - half, aperture % s - half)
    for values in offsets:
        values.flags.writeable = False
    return offsets


def _row_medians(values: np.ndarray) -> np.ndarray:
    """Median of each row, exactly as :func:`numpy.median` gives it.

    Pixels read from float32 storage are exactly representable in float32, and a
    vectorised float32 sort finds their middle values several times faster than
    a float64 partition; the two middle values are then averaged in float64, so the
    result is the same either way.
    """
    narrow = values.astype(np.float32)
    if values.shape[1] == 0 or not np.array_equal(narrow, values):
        return np.median(values, axis=1)
    ordered = np.sort(narrow, axis=1)
    k = values.shape[1]
    upper = ordered[:, k // 2].astype(np.float64)
    if k % 2:
        return upper
    lower = ordered[:, k // 2 - 1].astype(np.float64)
    return (lower + upper) / 2.0


def assign_cells(
    xc: np.ndarray, yc: np.ndarray, shape: tuple[int, int], size_x: int, size_y: int
) -> np.ndarray:
    """Cell index ``row * n_cells_x + column`` of each centre."""
    nx = shape[1]
    n_cells_x = -(-nx // size_x)
    return (np.asarray(yc) // size_y) * n_cells_x + np.asarray(xc) // size_x
