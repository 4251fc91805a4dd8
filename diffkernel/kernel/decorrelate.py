"""Decorrelation of the difference image and its score image, block by block.

Convolving one image of the pair with the kernel ``K`` correlates the difference's
noise: with white noise of variances ``σ_c²`` in the convolved image and ``σ_r²`` in
the reference, the difference's noise power is ``σ_r² + σ_c² |K̂(k)|²``. Filtering
the difference with

    ``φ̂(k) = sqrt((σ_r² + κ² σ_c²) / (σ_r² + σ_c² |K̂(k)|²))``,   ``κ = Σ K``,

makes it flat again (Reiss & Lupton 2016, DMTN-021; ip_diffim's decorrelation):
``φ̂(0) = 1``, so fluxes are kept, and the filtered noise is white with variance
``σ_r² + κ² σ_c²``. The formula holds in either direction of the convolution: the
"convolved" image is the template (``convolveTemplate``) or the science image
(``convolveScience``).

The kernel varies over the image, and so do the noise levels, so the filter is built
per :data:`DECORRELATION_BLOCK`-px block of a fixed grid anchored at the image's
first pixel: ``K`` at the block's centre, ``σ_c²`` and ``σ_r²`` the medians of the
two variance planes over the block's unmasked pixels. The grid does not depend on how
the image is cut into tiles, so the result does not either. The filter is computed
in Fourier space on a grid four times the kernel's side, brought back to real space,
cut to the kernel's side and normalized to unit sum.

The variance plane of the filtered difference is the unfiltered one times
``(σ_r² Σφ² + σ_c² Σ(φ⊛K)²) / (σ_r² + σ_c² ΣK²)``: exact for locally constant
variance, and it keeps the unfiltered plane's spatial structure (stars' Poisson
variance). Mask bits spread over the filter's footprint (where ``|φ|`` is at least
:data:`FOOTPRINT_FRACTION` of its peak); the pixels within the filter's half-width of
the unconvolved border become ``NO_DATA`` and ``EDGE`` too.

The score image (:func:`score_psf`) is the difference cross-correlated with its own
PSF ``P`` (the science PSF, after ``K`` when the science image was convolved, after
``φ`` when decorrelated), divided by the standard deviation of that sum: for a point
source its peak is its S/N.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import fft

from .convolve import convolve_valid, spread_mask

__all__ = [
    "DECORRELATION_BLOCK",
    "FOOTPRINT_FRACTION",
    "DifferenceFilters",
    "block_boxes",
    "block_noise",
    "kernel_image_at",
    "decorrelation_kernel",
    "make_filters",
    "filter_region",
    "autocorrelation",
]

#: Side of the blocks that each get their own decorrelation kernel and score PSF.
DECORRELATION_BLOCK = 512

#: Fraction of the filter's peak above which its pixels spread mask bits.
FOOTPRINT_FRACTION = 0.002

Box = tuple[int, int, int, int]


def block_boxes(shape: tuple[int, int], block: int = DECORRELATION_BLOCK) -> list[Box]:
    """The blocks ``(y0, y1, x0, x1)`` of an image, in row-major order."""
    ny, nx = shape
    return [
        (y0, min(y0 + block, ny), x0, min(x0 + block, nx))
        for y0 in range(0, ny, block)
        for x0 in range(0, nx, block)
    ]


def _median_variance(image: np.ndarray, variance: np.ndarray, mask: np.ndarray) -> float:
    """Median of the usable variances: unmasked (else any), finite and positive."""
    usable = np.isfinite(variance) & (variance > 0) & np.isfinite(image)
    values = variance[usable & (mask == 0)]
    if values.size < 16:  # a block all masked: its noise is still what its pixels have
        values = variance[usable]
    return float(np.median(values)) if values.size else 0.0


def block_noise(convolved, reference) -> tuple[float, float]:
    """``(σ_c², σ_r²)``: median variances of a block of the convolved and reference images.

    Parameters
    ----------
    convolved, reference : MaskedImage
        The block of each image (any of the two may have zero-filled pixels with zero
        variance: they are left out, as are masked and non-finite ones).
    """
    return (
        _median_variance(convolved.image, convolved.variance, convolved.mask),
        _median_variance(reference.image, reference.variance, reference.mask),
    )


def kernel_image_at(solution, x: float, y: float) -> np.ndarray:
    """The ``(K, K)`` kernel image of a :class:`~diffkernel.kernel.spatial.SpatialSolution`."""
    coeffs = solution.coefficients_at(float(x), float(y))
    return np.tensordot(coeffs, solution.basis.images, axes=1)


def _grid(size: int) -> int:
    return fft.next_fast_len(max(4 * size, 64))


def _spectrum(kernel: np.ndarray, n: int) -> np.ndarray:
    """2-D FFT of a centred odd kernel on an ``n x n`` grid, its centre at the origin."""
    k = kernel.shape[0]
    padded = np.zeros((n, n))
    padded[:k, :k] = kernel
    return fft.fft2(np.roll(padded, (-(k // 2), -(k // 2)), axis=(0, 1)))


def _real_kernel(spectrum: np.ndarray, size: int) -> np.ndarray:
    """The real-space kernel of a spectrum, cut to ``size`` around the origin."""
    n = spectrum.shape[0]
    full = np.fft.fftshift(np.real(fft.ifft2(spectrum)))
    c, h = n // 2, size // 2
    return full[c - h : c + h + 1, c - h : c + h + 1].copy()


def decorrelation_kernel(
    kernel: np.ndarray, var_convolved: float, var_reference: float, size: int | None = None
) -> np.ndarray:
    """The unit-sum decorrelation filter ``φ`` of a kernel and two noise levels.

    Parameters
    ----------
    kernel : numpy.ndarray
        ``(K, K)`` matching kernel (odd side), with its photometric sum.
    var_convolved, var_reference : float
        Per-pixel noise variances of the convolved image and of the reference.
    size : int, optional
        Odd side of the filter; default ``K``.

    Returns
    -------
    numpy.ndarray
        ``(size, size)``; a unit impulse when there is no noise to decorrelate.
    """
    size = kernel.shape[0] if size is None else int(size)
    if not (var_convolved > 0 and np.isfinite(var_convolved) and np.isfinite(var_reference)):
        delta = np.zeros((size, size))
        delta[size // 2, size // 2] = 1.0
        return delta
    n = _grid(max(size, kernel.shape[0]))
    power = np.abs(_spectrum(kernel, n)) ** 2
    kappa = float(kernel.sum())
    numerator = var_reference + kappa**2 * var_convolved
    denominator = np.maximum(var_reference + var_convolved * power, 1e-12 * numerator)
    phi = _real_kernel(np.sqrt(numerator / denominator), size)
    return phi / phi.sum()


def _sum_sq(spectrum: np.ndarray) -> float:
    """Σ of the squared pixels of a kernel from its full FFT (Parseval)."""
    return float(np.mean(np.abs(spectrum) ** 2))


def _gaussian(size: int, fwhm: float) -> np.ndarray:
    """A unit-sum circular Gaussian sampled at pixel centres."""
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    r = np.arange(size) - size // 2
    g = np.exp(-0.5 * (r / sigma) ** 2)
    image = np.outer(g, g)
    return image / image.sum()


@dataclass
class DifferenceFilters:
    """The filters of a difference image, one set per block, and what they were made from.

    Attributes
    ----------
    shape : tuple of int
        ``(ny, nx)`` of the image.
    block : int
        Side of the blocks (:func:`block_boxes`).
    decorrelate : bool
        Whether the difference is decorrelated (else the filter is an impulse).
    score : bool
        Whether a score image is made.
    noise : numpy.ndarray
        ``(nby, nbx, 2)``: ``σ_c²``, ``σ_r²`` of each block.
    kernels : numpy.ndarray
        ``(nby, nbx, D, D)`` decorrelation filters (``D = 1`` when not decorrelating).
    variance_scale : numpy.ndarray
        ``(nby, nbx)`` factor on the unfiltered variance plane.
    psfs : numpy.ndarray
        ``(nby, nbx, P, P)`` unit-sum PSF of the (filtered) difference, for the score
        (``P = 1`` when no score is made).
    score_scale : numpy.ndarray
        ``(nby, nbx)`` factor on ``V ⋆ P²`` that gives the variance of ``D ⋆ P`` (1 for
        white noise; more for correlated noise).
    mask_half : int
        Half-side of the box over which the filter spreads mask bits.
    """

    shape: tuple[int, int]
    block: int
    decorrelate: bool
    score: bool
    noise: np.ndarray
    kernels: np.ndarray
    variance_scale: np.ndarray
    psfs: np.ndarray
    score_scale: np.ndarray
    mask_half: int
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def half(self) -> int:
        """Half-width of the decorrelation filter."""
        return self.kernels.shape[-1] // 2

    @property
    def psf_half(self) -> int:
        """Half-width of the score's PSF."""
        return self.psfs.shape[-1] // 2

    @property
    def margin(self) -> int:
        """How far around a region the unfiltered difference must be known."""
        return self.half + (self.psf_half if self.score else 0)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays, by name, to store."""
        return {
            "noise": self.noise,
            "kernels": self.kernels,
            "variance_scale": self.variance_scale,
            "psfs": self.psfs,
            "score_scale": self.score_scale,
        }

    def attributes(self) -> dict[str, Any]:
        """The scalars, to store (see :meth:`from_stored`)."""
        return {
            "shape": list(self.shape),
            "block": self.block,
            "decorrelate": self.decorrelate,
            "score": self.score,
            "mask_half": self.mask_half,
            **self.attrs,
        }

    @classmethod
    def from_stored(cls, attrs: dict[str, Any], arrays: dict[str, np.ndarray]) -> DifferenceFilters:
        """The filters as :meth:`attributes` and :meth:`arrays` gave them."""
        known = ("shape", "block", "decorrelate", "score", "mask_half")
        return cls(
            shape=tuple(int(v) for v in attrs["shape"]),
            block=int(attrs["block"]),
            decorrelate=bool(attrs["decorrelate"]),
            score=bool(attrs["score"]),
            mask_half=int(attrs["mask_half"]),
            attrs={k: v for k, v in attrs.items() if k not in known},
            **{name: np.asarray(arrays[name]) for name in cls.array_names()},
        )

    @staticmethod
    def array_names() -> tuple[str, ...]:
        """Names of the stored arrays."""
        return ("noise", "kernels", "variance_scale", "psfs", "score_scale")

    def blocks_in(self, y0: int, y1: int, x0: int, x1: int):
        """``(by, bx, (py0, py1, px0, px1))`` for each block a region overlaps."""
        ny, nx = self.shape
        b = self.block
        for by in range(max(y0, 0) // b, (min(y1, ny) - 1) // b + 1):
            for bx in range(max(x0, 0) // b, (min(x1, nx) - 1) // b + 1):
                yield by, bx, (max(y0, by * b), min(y1, (by + 1) * b),
                               max(x0, bx * b), min(x1, (bx + 1) * b))  # fmt: skip


def make_filters(
    solution,
    shape: tuple[int, int],
    noise: np.ndarray,
    *,
    decorrelate: bool = True,
    score: bool = False,
    mode: str = "convolveTemplate",
    science_fwhm: float | None = None,
    block: int = DECORRELATION_BLOCK,
) -> DifferenceFilters:
    """The :class:`DifferenceFilters` of a solution on an image.

    Parameters
    ----------
    solution : SpatialSolution
        The kernel (evaluated at each block's centre).
    shape : tuple of int
        ``(ny, nx)``.
    noise : numpy.ndarray
        ``(nby, nbx, 2)`` noise variances of the blocks (:func:`block_noise`).
    decorrelate, score : bool
        What to build.
    mode : {"convolveTemplate", "convolveScience"}
        Which image was convolved: the science PSF is then seen through ``K``.
    science_fwhm : float, optional
        FWHM of the science image's PSF, pixels; needed for the score.
    block : int
        Side of the blocks.
    """
    size = solution.basis.kernel_size
    ny, nx = shape
    nby, nbx = -(-ny // block), -(-nx // block)
    d_size = size if decorrelate else 1
    p_size = size if score else 1
    kernels = np.zeros((nby, nbx, d_size, d_size))
    psfs = np.zeros((nby, nbx, p_size, p_size))
    variance_scale = np.ones((nby, nbx))
    score_scale = np.ones((nby, nbx))
    n = _grid(size)
    base_psf = None
    if score:
        if science_fwhm is None or not np.isfinite(science_fwhm) or science_fwhm <= 0:
            from ..errors import ConfigError

            raise ConfigError(
                "the score image needs the science PSF's FWHM: give the science exposure a "
                "psf_fwhm or keep scaleByFwhm on, or turn the score off"
            )
        base_psf = _gaussian(size, float(science_fwhm))
    footprint = 0
    for by in range(nby):
        for bx in range(nbx):
            yc = (by * block + min((by + 1) * block, ny) - 1) / 2.0
            xc = (bx * block + min((bx + 1) * block, nx) - 1) / 2.0
            kernel = kernel_image_at(solution, xc, yc)
            var_c, var_r = (float(v) for v in noise[by, bx])
            if decorrelate:
                phi = decorrelation_kernel(kernel, var_c, var_r, d_size)
            else:
                phi = np.ones((1, 1))
            kernels[by, bx] = phi
            f_phi, f_k = _spectrum(phi, n), _spectrum(kernel, n)
            before = var_r + var_c * float(np.sum(kernel**2))
            after = var_r * _sum_sq(f_phi) + var_c * _sum_sq(f_phi * f_k)
            if before > 0:
                variance_scale[by, bx] = after / before
            peak = np.abs(phi).max()
            rows, cols = np.nonzero(np.abs(phi) >= FOOTPRINT_FRACTION * peak)
            c = d_size // 2
            footprint = max(footprint, int(np.max(np.abs(rows - c))), int(np.max(np.abs(cols - c))))
            if score:
                f_p = _spectrum(base_psf, n)
                if mode == "convolveScience":
                    f_p = f_p * f_k
                f_p = f_p * f_phi
                psf = _real_kernel(f_p, p_size)
                psf /= psf.sum()
                psfs[by, bx] = psf
                f_psf = _spectrum(psf, n)
                var_num = var_r * _sum_sq(f_psf * f_phi) + var_c * _sum_sq(f_psf * f_phi * f_k)
                var_den = after * float(np.sum(psf**2))
                if var_den > 0:
                    score_scale[by, bx] = var_num / var_den
            else:
                psfs[by, bx] = 1.0
    return DifferenceFilters(
        shape=(int(ny), int(nx)),
        block=int(block),
        decorrelate=bool(decorrelate),
        score=bool(score),
        noise=np.asarray(noise, dtype=np.float64),
        kernels=kernels,
        variance_scale=variance_scale,
        psfs=psfs,
        score_scale=score_scale,
        mask_half=footprint if decorrelate else 0,
        attrs={"mode": mode, "science_fwhm": science_fwhm},
    )


def _blockwise(
    values: np.ndarray,
    origin: tuple[int, int],
    out_box: Box,
    filters: DifferenceFilters,
    kernels: np.ndarray,
) -> np.ndarray:
    """Convolve ``values`` (from ``origin`` on) with each block's kernel, over ``out_box``.

    ``values`` must cover ``out_box`` grown by the kernels' half-width; non-finite
    values count as zero.
    """
    y0, y1, x0, x1 = out_box
    half = kernels.shape[-1] // 2
    out = np.zeros((y1 - y0, x1 - x0))
    oy, ox = origin
    for by, bx, (py0, py1, px0, px1) in filters.blocks_in(y0, y1, x0, x1):
        piece = values[py0 - half - oy : py1 + half - oy, px0 - half - ox : px1 + half - ox]
        piece = np.where(np.isfinite(piece), piece, 0.0)
        if half == 0:
            result = piece * kernels[by, bx, 0, 0]
        else:
            result = convolve_valid(piece, kernels[by, bx][None])[0]
        out[py0 - y0 : py1 - y0, px0 - x0 : px1 - x0] = result
    # Pixels outside the image (out_box may reach beyond it) stay zero.
    return out


def _per_block(filters: DifferenceFilters, values: np.ndarray, out_box: Box) -> np.ndarray:
    """A per-block scalar array spread onto the pixels of ``out_box`` (1 outside the image)."""
    y0, y1, x0, x1 = out_box
    out = np.ones((y1 - y0, x1 - x0))
    for by, bx, (py0, py1, px0, px1) in filters.blocks_in(y0, y1, x0, x1):
        out[py0 - y0 : py1 - y0, px0 - x0 : px1 - x0] = values[by, bx]
    return out


def filter_region(
    diff: np.ndarray,
    var: np.ndarray,
    mask: np.ndarray,
    origin: tuple[int, int],
    box: Box,
    filters: DifferenceFilters,
    edge: int,
    edge_bits: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Decorrelate a region of the difference and make its score image.

    Parameters
    ----------
    diff, var, mask : numpy.ndarray
        The unfiltered difference from ``origin`` on, covering ``box`` grown by
        :attr:`DifferenceFilters.margin` (pixels off the image are NaN).
    origin : tuple of int
        Full-image ``(y, x)`` of ``diff[0, 0]``.
    box : tuple of int
        ``(y0, y1, x0, x1)`` to return.
    filters : DifferenceFilters
        The filters.
    edge : int
        Width of the unconvolved border of the unfiltered difference (the kernel's
        half-width); the filters widen it.
    edge_bits : int
        Mask bits (NO_DATA | EDGE) of that border.

    Returns
    -------
    tuple
        Difference, variance, mask over ``box``, and the score (None without one).
    """
    y0, y1, x0, x1 = box
    ny, nx = filters.shape
    oy, ox = origin
    g = filters.psf_half if filters.score else 0
    wide = (y0 - g, y1 + g, x0 - g, x1 + g)

    def cut(a: np.ndarray, b: Box) -> np.ndarray:
        return a[b[0] - oy : b[1] - oy, b[2] - ox : b[3] - ox]

    if filters.decorrelate:
        d = _blockwise(diff, origin, wide, filters, filters.kernels)
        v = cut(var, wide) * _per_block(filters, filters.variance_scale, wide)
        m_half = filters.mask_half
        grown = (wide[0] - m_half, wide[1] + m_half, wide[2] - m_half, wide[3] + m_half)
        m = spread_mask(cut(mask, grown), m_half)[
            m_half : m_half + wide[1] - wide[0], m_half : m_half + wide[3] - wide[2]
        ]
        d = np.where(np.isfinite(cut(diff, wide)), d, np.nan)
    else:
        d, v, m = cut(diff, wide).copy(), cut(var, wide).copy(), cut(mask, wide).copy()
    d_edge = edge + filters.half
    d, v, m = _border(d, v, m, wide, (ny, nx), d_edge, edge_bits)
    inner = (slice(g, g + y1 - y0), slice(g, g + x1 - x0))
    score = None
    if filters.score:
        flipped = filters.psfs[:, :, ::-1, ::-1]
        num = _blockwise(d, wide[::2], box, filters, flipped)
        den = _blockwise(v, wide[::2], box, filters, flipped**2)
        den *= _per_block(filters, filters.score_scale, box)
        with np.errstate(invalid="ignore", divide="ignore"):
            score = num / np.sqrt(den)
        score = _border(score, None, None, box, (ny, nx), d_edge + g, 0)[0]
        score = np.where(np.isfinite(d[inner]), score, np.nan)
    return d[inner], v[inner], m[inner], score


def _border(d, v, m, box: Box, shape: tuple[int, int], width: int, bits: int):
    """NaN (and ``bits``) on the pixels of ``box`` within ``width`` of the image's edge.

    In place, on the border's rows and columns only (the arrays are the caller's own).
    """
    y0, y1, x0, x1 = box
    ny, nx = shape
    h, w = y1 - y0, x1 - x0
    top, bottom = min(max(width - y0, 0), h), min(max(ny - width - y0, 0), h)
    left, right = min(max(width - x0, 0), w), min(max(nx - width - x0, 0), w)
    for rows, cols in (
        (slice(0, top), slice(None)),
        (slice(bottom, None), slice(None)),
        (slice(None), slice(0, left)),
        (slice(None), slice(right, None)),
    ):
        d[rows, cols] = np.nan
        if v is not None:
            v[rows, cols] = np.nan
        if m is not None:
            m[rows, cols] |= bits
    return d, v, m


def autocorrelation(
    image: np.ndarray, variance: np.ndarray, mask: np.ndarray, lags=(1, 2), clip: float = 5.0
) -> dict[str, float]:
    """Correlation of ``image / sqrt(variance)`` with itself shifted by each lag in x and y.

    Only unmasked, finite pixels with ``|z| < clip`` (the sky) enter, in pairs where
    both are such. Also gives the robust (MAD) standard deviation of ``z``.

    Returns
    -------
    dict
        ``x1``, ``y1``, ``x2``, ``y2``... and ``robust_std``.
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        z = image / np.sqrt(variance)
    good = np.isfinite(z) & (mask == 0)
    median = float(np.median(z[good]))
    good &= np.abs(z - median) < clip
    z = np.where(good, z - median, 0.0)
    out: dict[str, float] = {}
    for lag in lags:
        for axis, name in ((1, "x"), (0, "y")):
            a = [slice(None), slice(None)]
            b = [slice(None), slice(None)]
            a[axis], b[axis] = slice(None, -lag), slice(lag, None)
            pair = good[tuple(a)] & good[tuple(b)]
            za, zb = z[tuple(a)][pair], z[tuple(b)][pair]
            out[f"{name}{lag}"] = float(np.sum(za * zb) / np.sqrt(np.sum(za**2) * np.sum(zb**2)))
    zg = z[good]
    out["robust_std"] = float(1.4826 * np.median(np.abs(zg - np.median(zg))))
    return out
