"""Warping a template Exposure onto the science pixel grid (``warpingConfig``).

Uses ``reproject.reproject_interp`` on the image, variance and each mask plane.
The variance is interpolated with the same weights as the image, which slightly
overestimates it between pixels (the exact propagation uses squared weights): the
difference image's variance stays conservative rather than optimistic. Output
pixels that no template pixel covers, whose image interpolation draws on a
non-finite template pixel, or that come out non-finite, are set to NaN and flagged
``NO_DATA`` and ``EDGE``.

The warp is done in fixed tiles of :data:`WARP_TILE` output pixels, each from the
part of the template its footprint covers (plus a margin for the interpolation), so
memory stays bounded and the Dask path, which warps the same tiles in parallel,
gives the same pixels.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation

from ..errors import InputError
from ..image import Exposure, MaskedImage, with_mask_planes

__all__ = [
    "warp_exposure",
    "warp_region",
    "warp_tiles",
    "WARP_TILE",
    "check_overlap",
    "check_wcs",
]

#: Side of the output tiles warped at a time; fixed so that results never depend on
#: how the work is spread.
WARP_TILE = 1024

#: Template pixels read beyond a tile's footprint: the interpolation's reach, plus
#: room for the global spline prefilter of the bicubic/biquadratic kernels to decay
#: below 1e-12 (its influence falls by a factor 0.27 per pixel).
_MARGIN = {"nearest-neighbor": 2, "bilinear": 2, "biquadratic": 24, "bicubic": 24}

_ORDERS = {
    "nearest-neighbor": "nearest-neighbor",
    "bilinear": "bilinear",
    "biquadratic": "biquadratic",
    "bicubic": "bicubic",
}

#: The template pixels an interpolation draws on: a spline of order n uses n + 1 pixels
#: per axis (scipy's map_coordinates: round(t) for order 0, floor(t)..floor(t)+1 for 1,
#: round(t)-1..round(t)+1 for 2, floor(t)-1..floor(t)+2 for 3). That is where a
#: nearest or bilinear warp of a flag plane grown by ``grow`` pixels is non-zero.
_SUPPORT = {
    "nearest-neighbor": (0, "nearest-neighbor"),
    "bilinear": (0, "bilinear"),
    "biquadratic": (1, "nearest-neighbor"),
    "bicubic": (1, "bilinear"),
}


def warp_tiles(shape: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """``(y0, y1, x0, x1)`` of the warp tiles covering an image of ``shape``."""
    ny, nx = shape
    return [
        (y0, min(y0 + WARP_TILE, ny), x0, min(x0 + WARP_TILE, nx))
        for y0 in range(0, ny, WARP_TILE)
        for x0 in range(0, nx, WARP_TILE)
    ]


def _footprint_box(template_wcs, template_shape, science_wcs, y0, y1, x0, x1, margin):
    """Template pixel box covering the output tile's footprint, or None."""
    step = 16
    ys = np.unique(np.r_[np.arange(y0, y1, step), y1 - 1])
    xs = np.unique(np.r_[np.arange(x0, x1, step), x1 - 1])
    edge_x = np.concatenate([xs, xs, np.full(ys.size, x0), np.full(ys.size, x1 - 1)])
    edge_y = np.concatenate([np.full(xs.size, y0), np.full(xs.size, y1 - 1), ys, ys])
    world = science_wcs.pixel_to_world_values(edge_x.astype(float), edge_y.astype(float))
    tx, ty = template_wcs.world_to_pixel_values(*world)
    tx, ty = np.asarray(tx), np.asarray(ty)
    ok = np.isfinite(tx) & np.isfinite(ty)
    if not ok.any():
        return None
    ny, nx = template_shape
    bx0 = max(int(np.floor(tx[ok].min())) - margin, 0)
    bx1 = min(int(np.ceil(tx[ok].max())) + margin + 1, nx)
    by0 = max(int(np.floor(ty[ok].min())) - margin, 0)
    by1 = min(int(np.ceil(ty[ok].max())) + margin + 1, ny)
    if bx1 <= bx0 or by1 <= by0:
        return None
    return by0, by1, bx0, bx1


def warp_region(
    read_template,
    template_wcs,
    template_shape: tuple[int, int],
    template_planes: dict[str, int],
    science_wcs,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    config,
) -> tuple[MaskedImage, bool]:
    """Warp the template onto the science pixels ``[y0:y1, x0:x1]``.

    Parameters
    ----------
    read_template : callable
        ``read_template(y0, y1, x0, x1) -> MaskedImage`` over template pixels.
    template_wcs, science_wcs : astropy.wcs.WCS
        Celestial WCS of the two images.
    template_shape : tuple of int
        Shape of the whole template.
    template_planes : dict
        Template mask planes (the warped tile uses them plus NO_DATA and EDGE).
    y0, y1, x0, x1 : int
        Output tile in science pixels.
    config : WarpingConfig
        Interpolation kernels and ``growFullMask``.

    Returns
    -------
    tile : MaskedImage
        The warped tile.
    covered : bool
        Whether any template pixel landed in the tile.
    """
    from reproject import reproject_interp  # 0.5 s to import; only warps need it

    shape = (y1 - y0, x1 - x0)
    planes = with_mask_planes(template_planes, ("NO_DATA", "EDGE"))
    margin = max(_MARGIN[config.warpingKernelName], _MARGIN[config.maskWarpingKernelName])
    box = _footprint_box(template_wcs, template_shape, science_wcs, y0, y1, x0, x1, margin)
    image = np.full(shape, np.nan)
    variance = np.full(shape, np.nan)
    mask = np.zeros(shape, dtype=np.int32)
    covered = np.zeros(shape, dtype=bool)
    if box is not None:
        by0, by1, bx0, bx1 = box
        part = read_template(by0, by1, bx0, bx1)
        wcs_in = template_wcs.slice((slice(by0, by1), slice(bx0, bx1)))
        wcs_out = science_wcs.slice((slice(y0, y1), slice(x0, x1)))
        order = _ORDERS[config.warpingKernelName]
        # Non-finite pixels (NO_DATA) would spread NaN over the whole tile through the
        # spline prefilter of the bicubic kernels: they are warped as zeros, and every
        # output pixel they reach is flagged missing below.
        bad = ~np.isfinite(part.image) | ~np.isfinite(part.variance)
        image, footprint = reproject_interp(
            (np.where(bad, 0.0, part.image), wcs_in), wcs_out, shape_out=shape, order=order
        )
        variance, _ = reproject_interp(
            (np.where(bad, 0.0, part.variance), wcs_in), wcs_out, shape_out=shape, order=order
        )
        covered = footprint > 0

        def reach(flags: np.ndarray) -> np.ndarray:
            return _reach(flags, config.warpingKernelName, wcs_in, wcs_out, shape)

        if bad.any():
            covered &= ~reach(bad)
        mask_order = _ORDERS[config.maskWarpingKernelName]
        grow = set(config.growFullMask)
        for name, bit in part.mask_planes.items():
            plane = ((part.mask >> bit) & 1).astype(np.float64)
            if not plane.any():
                continue
            warped, _ = reproject_interp(
                (plane, wcs_in), wcs_out, shape_out=shape, order=mask_order
            )
            hit = np.nan_to_num(warped, nan=0.0) >= 0.5
            if name in grow:
                # Whatever the mask kernel, the plane covers every pixel whose image
                # value drew on a flagged pixel: those values are contaminated.
                hit |= reach(plane > 0)
            mask[hit] |= np.int32(1 << planes[name])
    out = MaskedImage(image, variance, mask, planes)
    missing = ~covered | ~np.isfinite(out.image) | ~np.isfinite(out.variance)
    out.set_plane("NO_DATA", missing)
    out.set_plane("EDGE", missing)
    out.image[missing] = np.nan
    out.variance[missing] = np.nan
    return out, bool(covered.any())


def _reach(flags: np.ndarray, kernel: str, wcs_in, wcs_out, shape) -> np.ndarray:
    """Output pixels whose ``kernel`` interpolation draws on a True pixel of ``flags``."""
    from reproject import reproject_interp  # 0.5 s to import; only warps need it

    grow, order = _SUPPORT[kernel]
    if grow:
        flags = binary_dilation(flags, structure=np.ones((2 * grow + 1, 2 * grow + 1), bool))
    warped, _ = reproject_interp(
        (flags.astype(np.float64), wcs_in), wcs_out, shape_out=shape, order=order
    )
    return np.nan_to_num(warped, nan=0.0) > 0


def check_overlap(covered: list[bool]) -> None:
    """Refuse a warp in which no tile received any template pixel."""
    if not any(covered):
        raise InputError(
            "the template and science exposures do not overlap on the sky (no WCS overlap)"
        )


def check_wcs(template_wcs, science_wcs) -> None:
    """Refuse alignment without a WCS on both images."""
    if template_wcs is None or science_wcs is None:
        which = "template" if template_wcs is None else "science"
        raise InputError(f"alignment needs a WCS on both exposures; the {which} has none")


def warp_exposure(template: Exposure, science: Exposure, config) -> Exposure:
    """Resample ``template`` onto the pixel grid of ``science``.

    Parameters
    ----------
    template, science : Exposure
        Both need a celestial WCS.
    config : WarpingConfig
        ``warpingKernelName`` (image and variance), ``maskWarpingKernelName`` (each
        plane is set where its warp with this kernel is at least one half) and
        ``growFullMask`` (these planes are also set on every pixel whose image
        interpolation draws on a template pixel that has them: the full width of the
        image kernel, 1 to 4 pixels per axis).

    Raises
    ------
    InputError
        When a WCS is missing or the two images do not overlap on the sky.
    """
    check_wcs(template.wcs, science.wcs)
    mi = template.masked_image
    ny, nx = science.shape

    def read(y0: int, y1: int, x0: int, x1: int) -> MaskedImage:
        return MaskedImage(
            mi.image[y0:y1, x0:x1],
            mi.variance[y0:y1, x0:x1],
            mi.mask[y0:y1, x0:x1],
            mi.mask_planes,
        )

    image = np.empty((ny, nx))
    variance = np.empty((ny, nx))
    mask = np.empty((ny, nx), dtype=np.int32)
    covered = []
    planes = None
    for y0, y1, x0, x1 in warp_tiles((ny, nx)):
        tile, hit = warp_region(
            read, template.wcs, mi.shape, mi.mask_planes, science.wcs, y0, y1, x0, x1, config
        )
        image[y0:y1, x0:x1] = tile.image
        variance[y0:y1, x0:x1] = tile.variance
        mask[y0:y1, x0:x1] = tile.mask
        covered.append(hit)
        planes = tile.mask_planes
    check_overlap(covered)
    out = MaskedImage(image, variance, mask, planes)
    return Exposure(out, science.wcs, template.psf_fwhm, dict(template.meta))
