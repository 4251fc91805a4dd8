"""Kernel candidates: stamps and basis-convolved stamps.

For a candidate with science stamp ``s`` (``S x S`` pixels) and template cutout ``t``
(``S + K - 1`` on a side, so that a ``K x K`` convolution is exact over the stamp),
the columns of the model ``s ≈ C a`` are the template convolved with each basis
kernel; :mod:`~diffkernel.kernel.moments` makes the sufficient statistics of ``C``
and ``s`` that every fit and quality statistic uses.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft

from ..image import MaskedImage
from .basis import KernelBasis
from .moments import FitMoments, take_rows

__all__ = [
    "StampBatch",
    "cut_stamps",
    "valid_convolutions",
    "convolve_stamps",
    "convolve_basis",
    "basis_columns",
    "ShiftedTemplates",
    "noise_corrected",
]


@dataclass
class StampBatch:
    """Stamps of a batch of candidates (all arrays indexed by candidate first).

    Attributes
    ----------
    template : numpy.ndarray
        ``(N, S+K-1, S+K-1)`` template cutouts.
    template_variance : numpy.ndarray
        Same shape, template variance.
    science, science_variance : numpy.ndarray
        ``(N, S, S)`` science stamps and variance.
    """

    template: np.ndarray
    template_variance: np.ndarray
    science: np.ndarray
    science_variance: np.ndarray

    @property
    def stamp_size(self) -> int:
        """Side ``S`` of the science stamp."""
        return self.science.shape[-1]

    @property
    def kernel_size(self) -> int:
        """Side ``K`` of the kernel the cutouts were cut for."""
        return self.template.shape[-1] - self.science.shape[-1] + 1

    def take(self, keep: np.ndarray) -> StampBatch:
        """The stamps of a subset of the batch."""
        return take_rows(self, keep)

    def difference_variance(self, kernels: np.ndarray) -> np.ndarray:
        """Variance ``V_s + K² ⊛ V_t`` of ``science - K ⊛ template``, ``(N, S, S)``.

        The difference image's own variance, for ``kernels`` ``(N, K, K)`` (one per
        candidate): pixels' noise is independent.
        """
        kernels = np.asarray(kernels, dtype=np.float64)
        return self.science_variance + valid_convolutions(self.template_variance, kernels**2)

    def template_noise_response(self, weights: np.ndarray) -> np.ndarray:
        """Per kernel pixel, the template variance it carries under ``weights``, ``(N, K, K)``.

        ``R[a, b] = Σ_p w(p) V_t(p - (a, b))`` (in the kernel's pixel layout): the noise of
        the template convolved with a unit pixel at ``(a, b)``, summed with the weights
        ``(N, S, S)`` over the stamp. Pixels' noise being independent, what the noise of
        the convolved template adds on average to the normal matrix of kernels
        ``B`` (rows: kernel images) is ``B diag(R) Bᵀ``.
        """
        weights = np.asarray(weights, dtype=np.float64)
        # A correlation: the window offsets run opposite to the kernel's pixels.
        per_offset = valid_convolutions(self.template_variance, weights[:, ::-1, ::-1])
        return np.ascontiguousarray(per_offset[:, ::-1, ::-1])

    def template_center(self) -> tuple[np.ndarray, np.ndarray]:
        """Template and template-variance pixels under the science stamp."""
        h = self.kernel_size // 2
        s = self.stamp_size
        return (
            self.template[:, h : h + s, h : h + s],
            self.template_variance[:, h : h + s, h : h + s],
        )


def valid_convolutions(images: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Each image ``(N, H, W)`` convolved with its own kernel ``(N, k, l)``: the valid part.

    By FFT at the image's size (cyclic, which the valid part does not see): for stamps,
    four times faster than a sum over the kernel's pixels.
    """
    shape = images.shape[-2:]
    kh, kw = kernels.shape[-2:]
    product = fft.rfft2(images, axes=(-2, -1)) * fft.rfft2(kernels, shape, axes=(-2, -1))
    return fft.irfft2(product, shape, axes=(-2, -1))[..., kh - 1 :, kw - 1 :]


def cut_stamps(
    template: MaskedImage,
    science: MaskedImage,
    xc: np.ndarray,
    yc: np.ndarray,
    half_stamp: int,
    half_kernel: int,
) -> StampBatch:
    """Cut stamps centred on integer pixels ``(xc, yc)``; all must lie inside the image."""
    hs, hk = int(half_stamp), int(half_kernel)
    ht = hs + hk
    xc = np.asarray(xc, dtype=np.intp)
    yc = np.asarray(yc, dtype=np.intp)
    wt, ws = 2 * ht + 1, 2 * hs + 1
    # Window views index whole cutouts at once: one contiguous copy per row, far
    # cheaper than gathering every pixel through index arrays.
    t_img = sliding_window_view(template.image, (wt, wt))
    t_var = sliding_window_view(template.variance, (wt, wt))
    s_img = sliding_window_view(science.image, (ws, ws))
    s_var = sliding_window_view(science.variance, (ws, ws))
    return StampBatch(
        *(
            cutouts.astype(np.float64, copy=False)  # pixels may come as stored (float32)
            for cutouts in (
                t_img[yc - ht, xc - ht],
                t_var[yc - ht, xc - ht],
                s_img[yc - hs, xc - hs],
                s_var[yc - hs, xc - hs],
            )
        )
    )


def _toeplitz_valid(filters: np.ndarray, n_in: int) -> np.ndarray:
    """Matrices ``A`` with ``A @ x`` = 'valid' convolution of ``x`` with each filter."""
    n_f, k = filters.shape
    n_out = n_in - k + 1
    a = np.zeros((n_f, n_out, n_in))
    rows = np.arange(n_out)
    for m in range(k):
        a[:, rows, rows + m] = filters[:, k - 1 - m][:, None]
    return a


@dataclass(frozen=True)
class _SeparablePlan:
    """The 1-D passes of a separable basis for cutouts of one size.

    Attributes
    ----------
    x_matrix : numpy.ndarray
        ``(Ht, n_fx * S)``: the unique x filters' 'valid' convolution matrices, side
        by side, so the x pass of every row of every cutout is one matrix product.
    y_matrices : numpy.ndarray
        ``(n_fy, S, Ht)``: the unique y filters' matrices.
    groups : tuple
        Per unique y filter ``u``: ``(u, x_filters, start)``: the x filters it pairs
        with (a slice when they are consecutive, as for Alard-Lupton bases, else an
        index array) and where the group's outputs start in :attr:`order`.
    order : numpy.ndarray
        Native function of each output, in the order the y pass produces them.
    """

    x_matrix: np.ndarray
    y_matrices: np.ndarray
    groups: tuple
    order: np.ndarray


_PLANS: dict[tuple, _SeparablePlan] = {}


def _first_appearance_unique(filters: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique rows in the order they first appear, and each row's index among them."""
    unique, first, inverse = np.unique(filters, axis=0, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.intp)
    rank[np.argsort(first, kind="stable")] = np.arange(len(first))
    return unique[np.argsort(first, kind="stable")], rank[inverse.ravel()]


def _separable_plan(fx: np.ndarray, fy: np.ndarray, ht: int) -> _SeparablePlan:
    """The (cached) :class:`_SeparablePlan` of filters ``fx``, ``fy`` for cutouts of ``ht``."""
    key = (fx.shape, fx.tobytes(), fy.tobytes(), ht)
    plan = _PLANS.get(key)
    if plan is None:
        # Unique 1-D filters: many native functions share their x (or y) factor.
        ux, ix = _first_appearance_unique(fx)
        uy, iy = _first_appearance_unique(fy)
        groups, order = [], []
        for u in range(len(uy)):
            natives = np.flatnonzero(iy == u)
            natives = natives[np.argsort(ix[natives], kind="stable")]
            x_filters = ix[natives]
            lo = int(x_filters[0])
            if np.array_equal(x_filters, np.arange(lo, lo + len(x_filters))):
                x_filters = slice(lo, lo + len(natives))
            groups.append((u, x_filters, len(order)))
            order.extend(natives.tolist())
        ax = _toeplitz_valid(ux, ht)  # (nfx, S, Ht)
        plan = _SeparablePlan(
            np.ascontiguousarray(ax.reshape(-1, ht).T),
            _toeplitz_valid(uy, ht),
            tuple(groups),
            np.asarray(order, dtype=np.intp),
        )
        if len(_PLANS) >= 8:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def _separable_convolutions(plan: _SeparablePlan, tc: np.ndarray, s: int) -> np.ndarray:
    """Native convolutions ``(N, n_native, S, S)`` in ``plan.order``."""
    n, ht, _ = tc.shape
    n_fx = plan.x_matrix.shape[1] // s
    # x pass of every row of every cutout: (N Ht, Ht) @ (Ht, n_fx S).
    xpass = (tc.reshape(n * ht, ht) @ plan.x_matrix).reshape(n, ht, n_fx, s)
    out = np.empty((n, len(plan.order), s, s))
    # y pass, one product per unique y filter over all the x filters it pairs with.
    for u, x_filters, start in plan.groups:
        picked = xpass[:, :, x_filters, :]
        m = picked.shape[2]
        block = np.matmul(plan.y_matrices[u], picked.reshape(n, ht, m * s))
        out[:, start : start + m] = block.reshape(n, s, m, s).transpose(0, 2, 1, 3)
    return out


def convolve_stamps(basis: KernelBasis, template_cutouts: np.ndarray) -> np.ndarray:
    """Convolve template cutouts with every *native* function of ``basis``.

    Parameters
    ----------
    basis : KernelBasis
        Basis of kernel size ``K``.
    template_cutouts : numpy.ndarray
        ``(N, S+K-1, S+K-1)``.

    Returns
    -------
    numpy.ndarray
        ``(N, n_native, S, S)``: the exact ('valid') convolutions over the stamp.
    """
    tc = np.asarray(template_cutouts, dtype=np.float64)
    k = basis.kernel_size
    n, ht, _ = tc.shape
    s = ht - k + 1
    if basis.separable is not None:
        plan = _separable_plan(*basis.separable, ht)
        out = np.empty((n, basis.n_native, s, s))
        out[:, plan.order] = _separable_convolutions(plan, tc, s)
        return out
    if basis.kind == "delta-function":
        return _shifted(tc, k)
    # Generic native images: direct valid convolution through windows.
    windows = sliding_window_view(tc, (s, s), axis=(1, 2))[:, ::-1, ::-1]
    return np.einsum("rji,njixy->nrxy", basis.native_images, windows, optimize=True)


def _shifted(tc: np.ndarray, k: int) -> np.ndarray:
    """The delta-function columns ``(N, K*K, S, S)``: every shift of the cutouts.

    Column ``(a, b)`` (row-major) is the cutout at offset ``(K-1-a, K-1-b)``, the
    'valid' convolution with a unit pixel at ``(a, b)``. Made one kernel row at a
    time from windows over x: a 5-d reversed window view copies element by element.
    """
    n, ht, _ = tc.shape
    s = ht - k + 1
    out = np.empty((n, k, k, s, s))
    rows = sliding_window_view(tc, s, axis=2)  # rows[n, u, b, x] = tc[n, u, b + x]
    for a in range(k):
        out[:, k - 1 - a] = rows[:, a : a + s, ::-1, :].transpose(0, 2, 1, 3)
    return out.reshape(n, k * k, s, s)


class ShiftedTemplates:
    """The columns of a delta-function basis, made a few candidates at a time.

    What :func:`~diffkernel.kernel.moments.fit_moments` and
    :func:`~diffkernel.kernel.moments.compute_stats` read of the convolved stamps: a
    ``shape`` and slices over candidates, here made when asked. All of a cell's
    columns at once are 6.5 MB a candidate for a 21 x 21 kernel, which the moments
    need only one block of candidates at a time.

    Parameters
    ----------
    template_cutouts : numpy.ndarray
        ``(N, S+K-1, S+K-1)``.
    kernel_size : int
        ``K``.
    """

    def __init__(self, template_cutouts: np.ndarray, kernel_size: int):
        self.template = np.asarray(template_cutouts, dtype=np.float64)
        self.kernel_size = int(kernel_size)
        n, ht, _ = self.template.shape
        s = ht - self.kernel_size + 1
        self.shape = (n, self.kernel_size**2, s, s)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        """The columns ``(n, K*K, S, S)`` of the candidates ``index`` (a slice)."""
        return _shifted(self.template[index], self.kernel_size)


def basis_columns(
    basis: KernelBasis, template_cutouts: np.ndarray
) -> np.ndarray | ShiftedTemplates:
    """The model's kernel columns for the moments: :func:`convolve_basis`, or lazily.

    A delta-function basis (its own native set) gives :class:`ShiftedTemplates`;
    any other basis its convolved stamps.
    """
    if basis.kind == "delta-function" and _is_identity(basis.transform):
        return ShiftedTemplates(template_cutouts, basis.kernel_size)
    return convolve_basis(basis, template_cutouts)


def convolve_basis(basis: KernelBasis, template_cutouts: np.ndarray) -> np.ndarray:
    """Template cutouts convolved with every kernel of ``basis``, ``(N, n_basis, S, S)``.

    The native convolutions (:func:`convolve_stamps`) combined by the basis
    transform in one batched matrix product (for a separable basis, in the order
    the y pass makes them, with the transform's rows permuted to match).
    """
    tc = np.asarray(template_cutouts, dtype=np.float64)
    n, ht, _ = tc.shape
    s = ht - basis.kernel_size + 1
    transform = basis.transform
    if basis.separable is not None:
        plan = _separable_plan(*basis.separable, ht)
        native = _separable_convolutions(plan, tc, s)
        transform = transform[plan.order]
    else:
        native = convolve_stamps(basis, tc)
        if _is_identity(transform):
            # A delta-function basis is its native set: multiplying by the identity
            # would cost as much as both normal matrices together.
            return native
    out = np.matmul(transform.T, native.reshape(n, native.shape[1], s * s))
    return out.reshape(n, basis.size, s, s)


def _is_identity(t: np.ndarray) -> bool:
    """Whether ``t`` is a square identity matrix (cheaper than comparing to ``np.eye``)."""
    n = t.shape[0]
    return t.shape == (n, n) and np.count_nonzero(t) == n and bool(np.all(np.diagonal(t) == 1))


def noise_corrected(
    moments: FitMoments,
    stamps: StampBatch,
    basis: KernelBasis,
    variance: np.ndarray,
    *,
    constant_variance_weighting: bool,
    correct: bool = True,
) -> FitMoments:
    """The fit's moments less what the convolved image's own noise adds to them.

    Least squares on a noisy convolved image shrinks the kernel (errors in variables):
    the noise adds ``B diag(R) Bᵀ`` to the normal matrix on average
    (:meth:`StampBatch.template_noise_response`, ``R`` under the fit's weights: the
    inverse of ``variance``, or of its stamp mean with constant variance weighting,
    as ``moments`` were made) and nothing to its vector; taking it out leaves normal
    equations unbiased for the kernel. The covariance moments (``m_var``) keep it:
    they are what the data scatter by. ``correct`` False returns ``moments``
    (``correctConvolvedNoise``).
    """
    if not correct:
        return moments
    n = variance.shape[0]
    weights = 1.0 / variance
    if constant_variance_weighting:
        mean_weight = 1.0 / variance.reshape(n, -1).mean(axis=1)
        weights = np.broadcast_to(mean_weight[:, None, None], variance.shape)
    response = stamps.template_noise_response(weights).reshape(n, -1)
    nk = basis.size
    m_fit = moments.m_fit.copy()
    kernel_block = m_fit[:, :nk, :nk]
    if basis.kind == "delta-function" and _is_identity(basis.transform):
        # The basis kernels are the unit pixels, in the same order: a diagonal.
        kernel_block[:, np.arange(nk), np.arange(nk)] -= response
    else:
        images = basis.images.reshape(nk, -1)
        # (einsum's loops: BLAS's rounding would depend on its thread count.)
        kernel_block -= np.einsum("ip,np,jp->nij", images, response, images)
    return replace(moments, m_fit=m_fit)
