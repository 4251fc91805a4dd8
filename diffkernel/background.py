"""Mesh background of an image (``useAfwBackground``), estimated with ``sep``.

``sep`` (the C core of Source Extractor) computes a clipped statistic in each mesh
box, median-filters the mesh and interpolates it with a bicubic spline; it is
several times faster than pure-Python mesh estimators on large images.
"""

from __future__ import annotations

import numpy as np
import sep

from .image import MaskedImage

__all__ = ["mesh_background"]


def mesh_background(masked_image: MaskedImage, config) -> np.ndarray:
    """Smooth background of an image on a mesh.

    Parameters
    ----------
    masked_image : MaskedImage
        Pixels to model; pixels in ``config.ignoredPixelMask`` planes are ignored.
    config : AfwBackgroundConfig
        ``binSize`` (mesh box in pixels), ``filterSize`` (median filter of the mesh)
        and ``statistic``. ``MEANCLIP`` uses sep's clipped mode estimate
        (``2.5 median - 1.5 mean`` when the distribution is crowded, else the clipped
        median), ``MEDIAN`` and ``MEAN`` the plain statistics of each box.

    Returns
    -------
    numpy.ndarray
        The background, same shape as the image.
    """
    image = np.ascontiguousarray(masked_image.image, dtype=np.float64)
    ignore = (masked_image.mask & masked_image.bitmask(config.ignoredPixelMask)) != 0
    ignore |= ~np.isfinite(image)
    data = np.where(ignore, 0.0, image)
    box = int(min(config.binSize, *image.shape))
    if config.statistic == "MEANCLIP":
        bkg = sep.Background(
            data, mask=ignore, bw=box, bh=box, fw=config.filterSize, fh=config.filterSize
        )
        return np.asarray(bkg.back(), dtype=np.float64)
    # Plain statistic per box, median-filtered and spline-interpolated like sep's.
    from scipy.interpolate import RectBivariateSpline
    from scipy.ndimage import median_filter

    ny, nx = image.shape
    nby, nbx = -(-ny // box), -(-nx // box)
    mesh = np.full((nby, nbx), np.nan)
    for j in range(nby):
        for i in range(nbx):
            sl = (slice(j * box, (j + 1) * box), slice(i * box, (i + 1) * box))
            good = image[sl][~ignore[sl]]
            if good.size:
                mesh[j, i] = np.median(good) if config.statistic == "MEDIAN" else good.mean()
    if np.isnan(mesh).all():
        return np.zeros_like(image)
    mesh = np.where(np.isnan(mesh), np.nanmedian(mesh), mesh)
    if config.filterSize > 1:
        mesh = median_filter(mesh, size=config.filterSize, mode="nearest")
    yc = (np.arange(nby) + 0.5) * box - 0.5
    xc = (np.arange(nbx) + 0.5) * box - 0.5
    ky, kx = min(3, nby - 1), min(3, nbx - 1)
    if ky == 0 or kx == 0:
        return _broadcast_mesh(mesh, yc, xc, ny, nx)
    spline = RectBivariateSpline(yc, xc, mesh, kx=ky, ky=kx)
    return spline(np.arange(ny), np.arange(nx))


def _broadcast_mesh(
    mesh: np.ndarray, yc: np.ndarray, xc: np.ndarray, ny: int, nx: int
) -> np.ndarray:
    """Linear interpolation of a mesh with a single row or column of boxes."""
    rows = np.array([np.interp(np.arange(nx), xc, mesh[j]) for j in range(mesh.shape[0])])
    return np.array([np.interp(np.arange(ny), yc, rows[:, i]) for i in range(nx)]).T
