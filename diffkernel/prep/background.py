"""Mesh background of an image (``useAfwBackground``), estimated with ``sep``.

``sep`` (the C core of Source Extractor) computes a clipped statistic in each mesh
box, median-filters the mesh and interpolates it with a bicubic spline; it is
several times faster than pure-Python mesh estimators on large images.

This is the one sky model of the package: the subtraction's background
(:func:`mesh_background`, from an :class:`~diffkernel.config.AfwBackgroundConfig`) and
the sky about which the noise of an image without a variance plane is measured
(:mod:`diffkernel.prep.variance`) are both :func:`sky_mesh`.
"""

from __future__ import annotations

import numpy as np
import sep

from ..image import MaskedImage

__all__ = ["mesh_background", "sky_mesh"]


def mesh_background(masked_image: MaskedImage, config) -> np.ndarray:
    """Smooth background of an image on a mesh.

    Parameters
    ----------
    masked_image : MaskedImage
        Pixels to model; pixels in ``config.ignoredPixelMask`` planes are ignored.
    config : AfwBackgroundConfig
        ``binSize`` (mesh box in pixels), ``filterSize`` (median filter of the mesh)
        and ``statistic``; see :func:`sky_mesh`.

    Returns
    -------
    numpy.ndarray
        The background, same shape as the image.
    """
    ignore = (masked_image.mask & masked_image.bitmask(config.ignoredPixelMask)) != 0
    return sky_mesh(
        masked_image.image,
        ignore,
        bin_size=config.binSize,
        filter_size=config.filterSize,
        statistic=config.statistic,
    )


def sky_mesh(
    image: np.ndarray,
    ignore: np.ndarray,
    *,
    bin_size: int,
    filter_size: int,
    statistic: str = "MEANCLIP",
) -> np.ndarray:
    """Smooth sky of an image: a statistic in mesh boxes, median-filtered, interpolated.

    Parameters
    ----------
    image : numpy.ndarray
        2-D pixel values.
    ignore : numpy.ndarray of bool
        Pixels left out of the estimate; non-finite pixels are left out too.
    bin_size : int
        Mesh box side in pixels (clipped to the image).
    filter_size : int
        Side of the median filter run over the mesh (odd; 1: none).
    statistic : {"MEANCLIP", "MEDIAN", "MEAN"}, optional
        ``MEANCLIP`` uses sep's clipped mode estimate (``2.5 median - 1.5 mean`` when
        the distribution is crowded, else the clipped median) and a bicubic spline;
        ``MEDIAN`` and ``MEAN`` the plain statistics of each box, interpolated linearly
        between box centres.

    Returns
    -------
    numpy.ndarray
        The sky, float64, same shape as the image.
    """
    image = np.ascontiguousarray(image, dtype=np.float64)
    ignore = np.asarray(ignore, dtype=bool) | ~np.isfinite(image)
    data = np.where(ignore, 0.0, image)
    if statistic == "MEANCLIP":
        bkg = sep.Background(
            data,
            mask=ignore,
            bw=min(int(bin_size), image.shape[1]),
            bh=min(int(bin_size), image.shape[0]),
            fw=filter_size,
            fh=filter_size,
        )
        return np.asarray(bkg.back(), dtype=np.float64)
    # Plain statistic per box, median-filtered, then interpolated linearly between box
    # centres (and extrapolated linearly beyond the outer ones, so a gradient is
    # followed to the image edge).
    from scipy.interpolate import RegularGridInterpolator
    from scipy.ndimage import median_filter

    ny, nx = image.shape
    by, bx = min(int(bin_size), ny), min(int(bin_size), nx)
    y_edges = np.append(np.arange(0, ny, by), ny)
    x_edges = np.append(np.arange(0, nx, bx), nx)
    mesh = np.full((len(y_edges) - 1, len(x_edges) - 1), np.nan)
    for j in range(mesh.shape[0]):
        for i in range(mesh.shape[1]):
            sl = (slice(y_edges[j], y_edges[j + 1]), slice(x_edges[i], x_edges[i + 1]))
            good = image[sl][~ignore[sl]]
            if good.size:
                mesh[j, i] = np.median(good) if statistic == "MEDIAN" else good.mean()
    if np.isnan(mesh).all():
        return np.zeros_like(image)
    mesh = np.where(np.isnan(mesh), np.nanmedian(mesh), mesh)
    if filter_size > 1:
        mesh = median_filter(mesh, size=filter_size, mode="nearest")
    yc = (y_edges[:-1] + y_edges[1:] - 1) / 2.0
    xc = (x_edges[:-1] + x_edges[1:] - 1) / 2.0
    if len(yc) == 1:
        yc, mesh = np.array([yc[0] - 1.0, yc[0] + 1.0]), np.vstack([mesh, mesh])
    if len(xc) == 1:
        xc, mesh = np.array([xc[0] - 1.0, xc[0] + 1.0]), np.hstack([mesh, mesh])
    interp = RegularGridInterpolator((yc, xc), mesh, bounds_error=False, fill_value=None)
    yy, xx = np.mgrid[0:ny, 0:nx]
    return interp(np.stack([yy.ravel(), xx.ravel()], axis=1)).reshape(ny, nx)
