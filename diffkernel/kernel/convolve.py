"""Spatially varying convolution of an image region with a fitted kernel model.

With kernel coefficients ``a_i(x, y) = Σ_k θ_ik f_k(x, y)``, the convolved image is
``Σ_k f_k(x, y) (Q_k ⊛ T)(x, y)`` where ``Q_k = Σ_i θ_ik b_i``: one ordinary
convolution per *spatial term* (6 for order 2), not one per pixel or per basis
kernel, with the kernel evaluated at each output pixel exactly as ip_diffim's
spatially varying convolution does. The convolutions share one forward FFT, and
since every spatial function is a product ``f_k = fy_k(y) fx_k(x)``, terms with the
same ``fx`` share their inverse FFT along x: after the inverse along y each term
is weighted by ``fy_k`` and the terms of one ``fx`` are summed, so order 2 takes 6
inverse passes along y but only 3 along x.

The variance is convolved with the square of the kernel, ``K(x, y)²``, written as an
amplitude times a shape: ``K² = a(x, y) S(x, y)`` with ``a = Σ K²`` the noise gain,
evaluated exactly at every pixel (a quadratic form in the spatial functions), and
the unit-sum shape ``S ≈ Σ_k f_k S_k`` fitted by least squares on a fixed grid over
the image. Where the variance is locally constant (the sky: almost every pixel)
the result is exact whatever the shape fit; at stars it is within ~0.2% for a
kernel whose noise gain varies by 20% over the image. It costs as many
convolutions as the image instead of the ``Σ_kl f_k f_l (Q_k Q_l ⊛ V)`` of the
exact product, and does not depend on how the image is cut into tiles. Mask bits of
the template spread over the kernel footprint (a bitwise OR, separable in x and y).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft
from scipy.ndimage import maximum_filter1d

from .device import ArrayBackend, array_backend
from .spatial import SpatialSolution

__all__ = [
    "spatial_term_kernels",
    "VarianceModel",
    "variance_model",
    "convolve_valid",
    "convolve_region",
    "spread_mask",
    "window",
    "KernelSpectra",
    "PRECISIONS",
]

#: Largest side of the blocks a region is convolved in: the FFT arrays of a
#: 512-px block (~1 MB each) stay in cache, those of a 1024-px one do not, and two
#: workers on one machine then compete for memory bandwidth.
FFT_BLOCK = 512

#: Points per side of the grid on which the shape of ``K²`` is fitted.
_VARIANCE_GRID = 16


def spatial_term_kernels(solution: SpatialSolution) -> np.ndarray:
    """Kernel images ``Q_k`` (``(n_terms, K, K)``) multiplying each spatial function."""
    images = solution.basis.images  # (nb, K, K)
    return np.einsum("ik,iyx->kyx", solution.kernel_coeffs, images)


@dataclass
class VarianceModel:
    """``K(x, y)² = a(x, y) Σ_k f_k(x, y) S_k``: noise gain times a unit-sum shape.

    Attributes
    ----------
    gram : numpy.ndarray
        ``(L, L)`` pixel sums ``Σ Q_k Q_l`` of the spatial terms' kernels, so that
        ``a(x, y) = fᵀ(x, y) G f(x, y)`` exactly.
    shapes : numpy.ndarray or KernelSpectra
        ``(L, K, K)`` shape kernels ``S_k``.
    """

    gram: np.ndarray
    shapes: np.ndarray | KernelSpectra

    def gain(self, fx: np.ndarray, fy: np.ndarray) -> np.ndarray:
        """``a(x, y) = Σ K(x, y)²`` on a grid, from the spatial functions' factors.

        Parameters
        ----------
        fx, fy : numpy.ndarray
            ``(L, W)`` and ``(L, H)`` factors (see
            :meth:`~diffkernel.kernel.spatial.SpatialFunctions.factors`).

        Returns
        -------
        numpy.ndarray
            ``(H, W)``.
        """
        n = len(self.gram)
        pairs_y = (fy[:, None, :] * fy[None, :, :]).reshape(n * n, -1)
        pairs_x = (fx[:, None, :] * fx[None, :, :]).reshape(n * n, -1)
        return (pairs_y.T * self.gram.ravel()) @ pairs_x


def variance_model(solution: SpatialSolution) -> VarianceModel:
    """The :class:`VarianceModel` of a solution.

    The gain is exact. The shape terms are fitted by least squares to ``K² / a`` on a
    fixed ``16 x 16`` grid spanning the spatial functions' domain, so the model
    depends only on the solution; for a spatially constant kernel it is exact.
    """
    functions = solution.kernel_functions
    terms = spatial_term_kernels(solution)  # (L, K, K)
    gram = np.einsum("kyx,lyx->kl", terms, terms)
    x0, y0, x1, y1 = functions.bbox
    gx = np.linspace(x0, x1, _VARIANCE_GRID)
    gy = np.linspace(y0, y1, _VARIANCE_GRID)
    xx, yy = np.meshgrid(gx, gy)
    f = functions.evaluate(xx.ravel(), yy.ravel())  # (G, L)
    kernels = np.tensordot(f, terms, axes=([1], [0]))  # (G, K, K)
    gain = np.einsum("gk,kl,gl->g", f, gram, f)
    shape = (kernels**2).reshape(len(f), -1) / gain[:, None]
    coeffs, *_ = np.linalg.lstsq(f, shape, rcond=None)
    return VarianceModel(gram, coeffs.reshape(terms.shape))


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


def window(
    array: np.ndarray,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    fill: float,
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Pixels ``[y0:y1, x0:x1]`` of the full image, from a part of it.

    ``array`` holds the full image's pixels from ``origin = (oy, ox)`` on; pixels
    outside it are set to ``fill``.
    """
    oy, ox = origin
    ny, nx = array.shape
    out = np.full((y1 - y0, x1 - x0), fill, dtype=array.dtype)
    sy0, sy1 = max(y0, oy), min(y1, oy + ny)
    sx0, sx1 = max(x0, ox), min(x1, ox + nx)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = array[
            sy0 - oy : sy1 - oy, sx0 - ox : sx1 - ox
        ]
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


class KernelSpectra:
    """Kernels with their FFTs at the shapes last asked for (two kept).

    Every full tile of an image has the same FFT shape, so the kernels' spectra
    are computed once per worker instead of once per tile (they cost as much as
    the tile's own FFTs). Pickles without the spectra.

    Parameters
    ----------
    kernels : numpy.ndarray
        ``(L, K, K)``.
    """

    _KEEP = 4

    def __init__(self, kernels: np.ndarray) -> None:
        self.kernels = np.asarray(kernels, dtype=np.float64)
        self._spectra: dict[tuple, np.ndarray] = {}

    def at(
        self,
        shape: tuple[int, int],
        workers: int | None = None,
        dtype=np.float64,
        backend: ArrayBackend | None = None,
    ) -> np.ndarray:
        """``rfft2`` of every kernel zero-padded to ``shape``, in ``dtype``'s precision.

        On ``backend``'s device (default: the CPU), where they are kept.
        """
        backend = backend or array_backend("cpu")
        key = (shape, np.dtype(dtype).str, backend.device)
        spectra = self._spectra.pop(key, None)
        if spectra is None:
            kernels = backend.to_device(self.kernels.astype(dtype))
            spectra = backend.rfft2(kernels, shape, workers=workers)
        self._spectra[key] = spectra
        while len(self._spectra) > self._KEEP:
            self._spectra.pop(next(iter(self._spectra)))
        return spectra

    def __getstate__(self) -> dict:
        return {"kernels": self.kernels}

    def __setstate__(self, state: dict) -> None:
        self.kernels = state["kernels"]
        self._spectra = {}


#: FFT precisions of the convolution: name to real dtype.
PRECISIONS = {"double": np.float64, "single": np.float32}


def _x_groups(functions) -> list[list[int]]:
    """Indices of the spatial terms grouped by their x factor (same degree in x)."""
    groups: dict[int, list[int]] = {}
    for index, (i, _) in enumerate(functions.powers()):
        groups.setdefault(i, []).append(index)
    return list(groups.values())


def _spatial_convolution(
    padded: np.ndarray,
    kernels: np.ndarray | KernelSpectra,
    fx: np.ndarray,
    fy: np.ndarray,
    x_groups: list[list[int]],
    workers: int | None,
    precision: str = "double",
    backend: ArrayBackend | None = None,
):
    """``Σ_l (fy_l ⊗ fx_l) · (padded ⊛ kernels_l)`` over the valid region.

    One forward FFT of the input. Per term, the product with the kernel's spectrum
    is transformed back along y only, over the valid rows, and weighted by ``fy_l``;
    the terms of one group (``x_groups``: terms sharing their ``fx``) are summed
    and transformed back along x once, then weighted by ``fx``. Everything runs in
    ``precision`` on ``backend``'s device (default: the CPU); the result stays there.
    """
    backend = backend or array_backend("cpu")
    if not isinstance(kernels, KernelSpectra):
        kernels = KernelSpectra(kernels)
    dtype = PRECISIONS[precision]
    hi, wi = padded.shape
    k = kernels.kernels.shape[-1]
    shape = (fft.next_fast_len(hi, real=True), fft.next_fast_len(wi, real=True))
    f_in = backend.rfft2(backend.to_device(padded.astype(dtype, copy=False)), shape, workers)
    spectra = kernels.at(shape, workers, dtype, backend)
    # Degree-0 factors are ones: the passes that would multiply by them are skipped.
    unit_x = np.all(fx == 1.0, axis=1)
    unit_y = np.all(fy == 1.0, axis=1)
    fx = backend.to_device(fx.astype(dtype))
    fy = backend.to_device(fy.astype(dtype))
    out = None
    for group in x_groups:
        summed = None
        for term in group:
            # Circular wrap-around only reaches the first K-1 rows, which 'valid' drops.
            rows = backend.ifft(f_in * spectra[term], 0, workers)[k - 1 : hi]
            if not unit_y[term]:
                rows *= fy[term][:, None]
            if summed is None:
                summed = rows
            else:
                summed += rows
        conv = backend.irfft(summed, shape[1], 1, workers)[:, k - 1 : wi]
        if not unit_x[group[0]]:
            conv *= fx[group[0]][None, :]
        if out is None:
            out = conv  # a view of this group's own transform: summed into in place
        else:
            out += conv
    if out is None:
        out = backend.xp.zeros((hi - k + 1, wi - k + 1), dtype=dtype)
    return out


def convolve_region(
    padded_image: np.ndarray,
    padded_variance: np.ndarray,
    padded_mask: np.ndarray,
    solution: SpatialSolution,
    y0: int,
    x0: int,
    term_kernels: np.ndarray | KernelSpectra | None = None,
    kernel_squared: VarianceModel | None = None,
    workers: int | None = None,
    precision: str = "double",
    device: str = "cpu",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convolve the template over an output region starting at ``(y0, x0)``.

    Parameters
    ----------
    padded_image, padded_variance, padded_mask : numpy.ndarray
        Template pixels over the output region grown by half a kernel on every side
        (see :func:`window`); pixels outside the image count as zero and non-finite
        ones must have been replaced beforehand. Callers flag the border.
    solution : SpatialSolution
        The kernel model.
    y0, x0 : int
        Full-image coordinates of the output region's first pixel.
    term_kernels : numpy.ndarray or KernelSpectra, optional
        :func:`spatial_term_kernels` of the solution, when already computed (as
        :class:`KernelSpectra` to reuse their FFTs from tile to tile).
    kernel_squared : VarianceModel, optional
        :func:`variance_model` of the solution, when already computed (its shapes
        as :class:`KernelSpectra` to reuse their FFTs).
    precision : {"double", "single"}
        Precision of the FFTs and of the results. Single precision is about three
        times faster; its error is ~1e-6 of a tile's brightest convolved value
        (measured on a 4096^2 pair: at most 3e-5 and typically 5e-6 of the pixel's
        noise sigma).
    device : {"cpu", "gpu"}
        Where the FFTs run (see :mod:`diffkernel.kernel.device`); the GPU takes the region
        in one block and needs CuPy. Inputs and outputs are host (numpy) arrays.

    Returns
    -------
    image, variance, mask : numpy.ndarray
        The convolved template and its variance (float32 or float64, as
        ``precision``) and spread mask over the region.
    """
    h = solution.basis.kernel_size // 2
    if term_kernels is None:
        term_kernels = spatial_term_kernels(solution)
    if kernel_squared is None:
        kernel_squared = variance_model(solution)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    height = padded_image.shape[0] - 2 * h
    width = padded_image.shape[1] - 2 * h
    functions = solution.kernel_functions
    fx, fy = functions.factors(np.arange(x0, x0 + width), np.arange(y0, y0 + height))
    groups = _x_groups(functions)
    dtype = PRECISIONS[precision]
    backend = array_backend(device)
    image = backend.xp.empty((height, width), dtype=dtype)
    shaped = backend.xp.empty((height, width), dtype=dtype)
    # On the CPU, blocks of at most FFT_BLOCK pixels a side keep each FFT's arrays in
    # cache; a GPU is best fed the whole region at once.
    block = FFT_BLOCK if backend.on_host else max(height, width, 1)
    for by in range(0, height, block):
        ey = min(by + block, height)
        for bx in range(0, width, block):
            ex = min(bx + block, width)
            window_rows = slice(by, ey + 2 * h)
            window_cols = slice(bx, ex + 2 * h)
            bfx, bfy = fx[:, bx:ex], fy[:, by:ey]
            for out, padded, kernels in (
                (image, padded_image, term_kernels),
                (shaped, padded_variance, kernel_squared.shapes),
            ):
                out[by:ey, bx:ex] = _spatial_convolution(
                    padded[window_rows, window_cols],
                    kernels,
                    bfx,
                    bfy,
                    groups,
                    workers,
                    precision,
                    backend,
                )
    shaped *= backend.to_device(kernel_squared.gain(fx, fy).astype(dtype, copy=False))
    image, shaped = backend.to_host(image), backend.to_host(shaped)
    mask = spread_mask(padded_mask, h)[h : h + height, h : h + width]
    return image, shaped, mask
