"""Difference images: convolve the template with the fitted kernel and subtract.

``D = S - K(x, y) ⊛ T - b(x, y)``, computed tile by tile with a kernel-sized halo so
memory stays bounded; the variance is ``V_S + K² ⊛ V_T`` and the mask the science
mask OR the template mask spread over the kernel footprint. Pixels within half a
kernel of the image border, where the convolution saw no data, are set to NaN and
flagged ``NO_DATA`` and ``EDGE``.
"""

from __future__ import annotations

import numpy as np

from .convolve import convolve_region, spatial_term_kernels
from .errors import InputError
from .image import Exposure, MaskedImage, as_exposure

__all__ = ["subtract_images", "difference_tile", "prepare_inputs"]


def difference_tile(
    template: MaskedImage,
    science: MaskedImage,
    solution,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    term_kernels: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Difference image, variance and mask over ``[y0:y1, x0:x1]``.

    Parameters
    ----------
    template, science : MaskedImage
        Prepared inputs (see :func:`prepare_inputs`): aligned, same shape, mask
        planes shared, mesh backgrounds removed and non-finite template pixels zeroed.
    solution : SpatialSolution
        The kernel and background model.
    """
    conv, conv_var, conv_mask = convolve_region(
        template.image, template.variance, template.mask, solution, y0, y1, x0, x1, term_kernels
    )
    yy, xx = np.mgrid[y0:y1, x0:x1]
    diff = science.image[y0:y1, x0:x1] - conv - solution.background_at(xx, yy)
    var = science.variance[y0:y1, x0:x1] + conv_var
    mask = science.mask[y0:y1, x0:x1] | conv_mask
    h = solution.basis.kernel_size // 2
    ny, nx = science.shape
    border = (yy < h) | (xx < h) | (yy >= ny - h) | (xx >= nx - h)
    if border.any():
        edge_bits = (1 << science.mask_planes["NO_DATA"]) | (1 << science.mask_planes["EDGE"])
        mask = np.where(border, mask | edge_bits, mask)
        diff = np.where(border, np.nan, diff)
        var = np.where(border, np.nan, var)
    return diff, var, mask


def prepare_inputs(template, science, result) -> tuple[MaskedImage, MaskedImage]:
    """Template and science as the subtraction needs them.

    The template is the aligned one the kernel was fitted on; both lose the mesh
    backgrounds fitted with ``useAfwBackground``; template mask bits are renamed
    onto the science's planes (adding any it lacks, and NO_DATA and EDGE); template
    pixels that are not finite (masked NO_DATA) become zero with zero variance so
    they cannot spread NaN (their mask bits still spread).
    """
    t = result.alignedTemplate
    if t is None:
        t = as_exposure(template, "template").masked_image
    s = as_exposure(science, "science").masked_image
    if t.shape != s.shape:
        raise InputError(f"template shape {t.shape} differs from science shape {s.shape}")
    planes = dict(s.mask_planes)
    for name in list(t.mask_planes) + ["NO_DATA", "EDGE"]:
        if name not in planes:
            planes[name] = next(b for b in range(31) if b not in planes.values())
    t_mask = np.zeros_like(t.mask)
    for name, bit in t.mask_planes.items():
        t_mask |= ((t.mask >> bit) & 1).astype(np.int32) << planes[name]
    t_img = t.image
    if result.templateBackground is not None:
        t_img = t_img - result.templateBackground
    t_var = t.variance
    bad = ~np.isfinite(t_img) | ~np.isfinite(t_var)
    if bad.any():
        t_img = np.where(bad, 0.0, t_img)
        t_var = np.where(bad, 0.0, t_var)
    s_img = s.image
    if result.scienceBackground is not None:
        s_img = s_img - result.scienceBackground
    return (
        MaskedImage(t_img, t_var, t_mask, planes),
        MaskedImage(s_img, s.variance, s.mask, planes),
    )


def subtract_images(
    template: MaskedImage | Exposure,
    science: MaskedImage | Exposure,
    result,
    tile_size: int = 1024,
) -> MaskedImage:
    """Difference image of ``science`` minus the PSF-matched ``template``.

    Parameters
    ----------
    template, science : MaskedImage or Exposure
        The images ``result`` was fitted on (aligned; same shape).
    result : MakeKernelResult
        Output of :meth:`MakeKernelTask.run`.
    tile_size : int
        Side of the tiles processed at a time (memory bound).

    Returns
    -------
    MaskedImage
        Difference image with propagated variance and mask (science mask planes).
    """
    t, s = prepare_inputs(template, science, result)
    ny, nx = s.shape
    diff = np.empty((ny, nx))
    var = np.empty((ny, nx))
    mask = np.empty((ny, nx), dtype=np.int32)
    terms = spatial_term_kernels(result.spatialSolution)
    for y0 in range(0, ny, tile_size):
        for x0 in range(0, nx, tile_size):
            y1, x1 = min(y0 + tile_size, ny), min(x0 + tile_size, nx)
            d, v, m = difference_tile(t, s, result.spatialSolution, y0, y1, x0, x1, terms)
            diff[y0:y1, x0:x1], var[y0:y1, x0:x1], mask[y0:y1, x0:x1] = d, v, m
    return MaskedImage(diff, var, mask, dict(s.mask_planes))
