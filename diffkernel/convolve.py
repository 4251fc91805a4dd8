"""Spatially varying convolution of an image region with a fitted kernel model.

With kernel coefficients ``a_i(x, y) = Σ_k θ_ik f_k(x, y)``, the convolved image is
``Σ_k f_k(x, y) (Q_k ⊛ T)(x, y)`` where ``Q_k = Σ_i θ_ik b_i``: one ordinary
convolution per *spatial term* (6 for order 2), not one per pixel or per basis
kernel, with the kernel evaluated at each output pixel exactly as ip_diffim's
spatially varying convolution does. The convolutions share one forward FFT.

The variance is convolved with the square of the kernel taken at the region's
centre: the variance plane is smooth and the kernel changes little over a tile,
so this keeps the variance honest at a fraction of the cost of the exact
``Σ_kl f_k f_l (Q_k Q_l ⊛ V)``. Mask bits of the template spread over the kernel
footprint (a bitwise OR, separable in x and y).
"""

from __future__ import annotations

import numpy as np
from scipy import fft
from scipy.ndimage import maximum_filter1d

from .spatial import SpatialSolution

__all__ = ["spatial_term_kernels", "convolve_valid", "convolve_region", "spread_mask"]


def spatial_term_kernels(solution: SpatialSolution) -> np.ndarray:
    """Kernel images ``Q_k`` (``(n_terms, K, K)``) multiplying each spatial function."""
    images = solution.basis.images  # (nb, K, K)
    return np.einsum("ik,iyx->kyx", solution.kernel_coeffs, images)


def convolve_valid(
    padded: np.ndarray, kernels: np.ndarray, workers: int | None = None
) -> np.ndarray:
    """'Valid' convolutions of one padded array with several kernels by FFT.

    Parameters
    ----------
    padded : numpy.ndarray
        ``(H + K - 1, W + K - 1)`` input.
    kernels : numpy.ndarray
        ``(L, K, K)``.

    Returns
    -------
    numpy.ndarray
        ``(L, H, W)``.
    """
    hi, wi = padded.shape
    k = kernels.shape[-1]
    # Circular wrap-around only touches the first K-1 rows/columns, which 'valid' drops.
    shape = (fft.next_fast_len(hi, real=True), fft.next_fast_len(wi, real=True))
    f_in = fft.rfft2(padded, shape, workers=workers)
    f_k = fft.rfft2(kernels, shape, workers=workers)
    out = fft.irfft2(f_in[None] * f_k, shape, workers=workers)
    return out[:, k - 1 : hi, k - 1 : wi]


def _window(array: np.ndarray, y0: int, y1: int, x0: int, x1: int, fill: float) -> np.ndarray:
    """``array[y0:y1, x0:x1]`` with out-of-bounds pixels set to ``fill``."""
    ny, nx = array.shape
    out = np.full((y1 - y0, x1 - x0), fill, dtype=array.dtype)
    sy0, sy1 = max(y0, 0), min(y1, ny)
    sx0, sx1 = max(x0, 0), min(x1, nx)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[sy0:sy1, sx0:sx1]
    return out


def spread_mask(mask: np.ndarray, half: int) -> np.ndarray:
    """OR of the mask bits over a ``(2 half + 1)^2`` box around each pixel."""
    out = np.zeros_like(mask)
    present = np.bitwise_or.reduce(mask, axis=None) if mask.size else 0
    bit = 0
    while present >> bit:
        if (present >> bit) & 1:
            plane = ((mask >> bit) & 1).astype(np.uint8)
            plane = maximum_filter1d(plane, 2 * half + 1, axis=0, mode="constant")
            plane = maximum_filter1d(plane, 2 * half + 1, axis=1, mode="constant")
            out |= plane.astype(mask.dtype) << bit
        bit += 1
    return out


def convolve_region(
    template_image: np.ndarray,
    template_variance: np.ndarray,
    template_mask: np.ndarray,
    solution: SpatialSolution,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    term_kernels: np.ndarray | None = None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convolve the template over the output region ``[y0:y1, x0:x1]``.

    Pixels outside the image count as zero; callers flag the border.
    Non-finite template pixels must have been replaced beforehand.

    Returns
    -------
    image, variance, mask : numpy.ndarray
        The convolved template and its variance and spread mask over the region.
    """
    k = solution.basis.kernel_size
    h = k // 2
    if term_kernels is None:
        term_kernels = spatial_term_kernels(solution)
    pad_img = _window(template_image, y0 - h, y1 + h, x0 - h, x1 + h, 0.0)
    convolved = convolve_valid(pad_img, term_kernels, workers)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    f = solution.kernel_functions.evaluate(xx, yy)  # (H, W, L)
    image = np.einsum("lyx,yxl->yx", convolved, f)
    kc = solution.coefficients_at((x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0)
    k_center = solution.basis.kernel_image(kc)
    pad_var = _window(template_variance, y0 - h, y1 + h, x0 - h, x1 + h, 0.0)
    variance = convolve_valid(pad_var, (k_center**2)[None], workers)[0]
    pad_mask = _window(template_mask, y0 - h, y1 + h, x0 - h, x1 + h, 0)
    mask = spread_mask(pad_mask, h)[h : h + (y1 - y0), h : h + (x1 - x0)]
    return image, variance, mask
