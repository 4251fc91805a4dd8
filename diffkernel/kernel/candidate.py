"""Kernel candidates: stamps, basis-convolved stamps and sufficient statistics.

For a candidate with science stamp ``s`` (``S x S`` pixels), template cutout ``t``
(``S + K - 1`` on a side, so that a ``K x K`` convolution is exact over the stamp)
and per-pixel variance ``v``, the model is ``s ≈ C a`` where column ``j`` of ``C`` is
the template convolved with basis kernel ``j`` (plus a column of ones for the
differential background). Every fit and every quality statistic the task needs is
a function of a few moments of ``C`` and ``s``:

- fit:   ``M_fit = Cᵀ W_fit C``, ``B_fit = Cᵀ W_fit s``
- stats: ``M = Cᵀ W C``, ``B = Cᵀ W s``, ``sᵀ W s``, ``u = Cᵀ σ⁻¹``, ``Σ s/σ``, ``N``

with ``W = diag(1/v)`` and ``W_fit`` ``1/v_fit`` or ``1/mean(v_fit)`` (constant
variance weighting), ``v_fit`` the variance the fit is weighted by and ``v`` the
difference's own (see :func:`compute_stats`'s ``fit``). The residual mean and standard
deviation in units of sigma for *any* coefficient vector follow without pixels, so
the spatial fit, its assessment and the PCA refit run on these small matrices only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy import fft

from ..image import MaskedImage
from .basis import KernelBasis

__all__ = [
    "StampBatch",
    "CandidateStats",
    "FitMoments",
    "cut_stamps",
    "valid_convolutions",
    "convolve_stamps",
    "convolve_basis",
    "compute_stats",
    "fit_moments",
    "core_selector",
    "local_background_columns",
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


def take_rows(record, index: np.ndarray | slice):
    """A dataclass of per-candidate arrays (first axis: candidate) for a subset.

    Fields that are not arrays (sizes, or None for what was not computed) are kept.
    """
    values = {}
    for f in fields(record):
        v = getattr(record, f.name)
        values[f.name] = v[index] if isinstance(v, np.ndarray) else v
    return type(record)(**values)


def concatenate_rows(parts: list):
    """Dataclasses of per-candidate arrays of several batches stacked, in order.

    Fields that are not arrays are taken from the first part (the parts of one run
    agree on them).
    """
    first = parts[0]
    values = {}
    for f in fields(first):
        v = getattr(first, f.name)
        if isinstance(v, np.ndarray):
            values[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
        else:
            values[f.name] = v
    return type(first)(**values)


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
        windows = sliding_window_view(tc, (s, s), axis=(1, 2))  # (N, K, K, S, S)
        return np.ascontiguousarray(windows[:, ::-1, ::-1]).reshape(n, k * k, s, s)
    # Generic native images: direct valid convolution through windows.
    windows = sliding_window_view(tc, (s, s), axis=(1, 2))[:, ::-1, ::-1]
    return np.einsum("rji,njixy->nrxy", basis.native_images, windows, optimize=True)


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
    out = np.matmul(transform.T, native.reshape(n, native.shape[1], s * s))
    return out.reshape(n, basis.size, s, s)


def core_selector(stamp_size: int, core_radius: int) -> np.ndarray:
    """Boolean ``(S, S)`` mask of the ``2r x 2r`` core box of a stamp."""
    c = stamp_size // 2
    r = int(core_radius)
    sel = np.zeros((stamp_size, stamp_size), dtype=bool)
    sel[max(c - r, 0) : c + r, max(c - r, 0) : c + r] = True
    return sel


@dataclass
class CandidateStats:
    """Sufficient statistics of a batch of candidates (first axis: candidate).

    The last coefficient is the background when ``has_background``. ``var_science``
    ``(N,)`` and ``var_template`` ``(N, K, K)``, when made, are the means over the
    statistics' pixels of ``V_s / v`` and, per kernel pixel, of the template variance
    it sees over ``v``: the difference's variance under any kernel, relative to ``v``.
    """

    m_fit: np.ndarray
    b_fit: np.ndarray
    m: np.ndarray
    b: np.ndarray
    sws: np.ndarray
    u: np.ndarray
    su: np.ndarray
    npix: np.ndarray
    m_var: np.ndarray | None
    n_background: int
    stamp_half: int
    var_science: np.ndarray | None = None
    var_template: np.ndarray | None = None

    def __len__(self) -> int:
        return self.m.shape[0]

    @property
    def has_background(self) -> bool:
        """Whether background terms follow the kernel terms."""
        return self.n_background > 0

    @property
    def n_kernel(self) -> int:
        """Number of kernel terms."""
        return self.n_params - self.n_background

    @property
    def n_params(self) -> int:
        """Number of coefficients (kernel terms plus background)."""
        return self.m.shape[-1]

    def take(self, index: np.ndarray | slice) -> CandidateStats:
        """Statistics of a subset of candidates."""
        return take_rows(self, index)

    @staticmethod
    def concatenate(parts: list[CandidateStats]) -> CandidateStats:
        """Stack the statistics of several batches."""
        return concatenate_rows(parts)

    def transformed(self, kernel_transform: np.ndarray) -> CandidateStats:
        """Statistics in a derived basis whose kernels are ``current @ kernel_transform``.

        Parameters
        ----------
        kernel_transform : numpy.ndarray
            ``(n_kernel, m)``; the background terms, if any, are carried unchanged.
        """
        t = np.asarray(kernel_transform)
        if self.has_background:
            n, m = t.shape
            nb = self.n_background
            full = np.zeros((n + nb, m + nb))
            full[:n, :m] = t
            full[n:, m:] = np.eye(nb)
            t = full

        def mat(a):
            return None if a is None else np.einsum("ji,njk,kl->nil", t, a, t, optimize=True)

        return replace(
            self,
            m_fit=mat(self.m_fit),
            b_fit=self.b_fit @ t,
            m=mat(self.m),
            b=self.b @ t,
            u=self.u @ t,
            m_var=mat(self.m_var),
        )

    def residual_moments(
        self, coeffs: np.ndarray, kernels: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Residual mean, standard deviation and chi² in units of sigma.

        Parameters
        ----------
        coeffs : numpy.ndarray
            ``(N, n_params)`` coefficient vectors, one per candidate.
        kernels : numpy.ndarray, optional
            ``(N, K, K)``: their kernel images. With ``var_template``, sigma is then
            the difference's under them, not the statistics' ``v``: the moments are
            scaled by the stamp's mean ratio of the two variances (exact where that
            ratio is uniform, and for the kernels that made ``v``).
        """
        a = np.asarray(coeffs)
        chi2 = np.einsum("ni,nij,nj->n", a, self.m, a) - 2 * np.einsum("ni,ni->n", a, self.b)
        chi2 = np.maximum(chi2 + self.sws, 0.0)
        total = self.su - np.einsum("ni,ni->n", a, self.u)
        if kernels is not None and self.var_template is not None:
            ratio = self.var_science + np.einsum("nij,nij->n", kernels**2, self.var_template)
            total, chi2 = total / np.sqrt(ratio), chi2 / ratio
        mean = total / self.npix
        var = np.maximum(chi2 / self.npix - mean**2, 0.0) * self.npix / np.maximum(self.npix - 1, 1)
        return mean, np.sqrt(var), chi2


@dataclass
class FitMoments:
    """The moments single-kernel fits solve: ``m_fit``, ``b_fit``, ``m_var`` (or None).

    What :func:`~diffkernel.kernel.fit.fit_single_kernels` reads of a
    :class:`CandidateStats`, made alone to fit a batch before its residual statistics,
    which are in units of the difference's variance under the fitted kernel.
    """

    m_fit: np.ndarray
    b_fit: np.ndarray
    m_var: np.ndarray | None
    n_background: int

    def __len__(self) -> int:
        return self.m_fit.shape[0]


def _design(convolved: np.ndarray, background_order: int | None) -> tuple[np.ndarray, int]:
    """The design matrix ``C`` ``(N, n_params, S*S)``: kernel columns, then background's."""
    n, nk, s, _ = convolved.shape
    p = s * s
    n_bg = 0
    cols = None
    if background_order is not None:
        cols = local_background_columns(s, background_order)
        n_bg = cols.shape[0]
    c = np.empty((n, nk + n_bg, p))
    c[:, :nk] = convolved.reshape(n, nk, p)
    if cols is not None:
        c[:, nk:] = cols
    return c, n_bg


def fit_moments(
    convolved: np.ndarray,
    science: np.ndarray,
    variance: np.ndarray,
    *,
    background_order: int | None,
    constant_variance_weighting: bool,
    with_uncertainty: bool = False,
) -> FitMoments:
    """The moments a batch's single-kernel fits solve, without the residual statistics.

    Parameters are those of :func:`compute_stats`; ``variance`` weights the fit.
    """
    n, _, s, _ = convolved.shape
    c, n_bg = _design(convolved, background_order)
    sci, var = science.reshape(n, s * s), variance.reshape(n, s * s)
    if constant_variance_weighting:
        w_const = 1.0 / var.mean(axis=1)
        m_fit = np.matmul(c, np.swapaxes(c, 1, 2)) * w_const[:, None, None]
        b_fit = np.matmul(c, sci[:, :, None])[:, :, 0] * w_const[:, None]
        m_var = (
            np.matmul(c * (var * w_const[:, None] ** 2)[:, None, :], np.swapaxes(c, 1, 2))
            if with_uncertainty
            else None
        )
        return FitMoments(m_fit, b_fit, m_var, n_bg)
    sig_inv = np.sqrt(1.0 / var)
    a, z = c * sig_inv[:, None, :], sci * sig_inv
    m_w = np.matmul(a, np.swapaxes(a, 1, 2))
    b_w = np.matmul(a, z[:, :, None])[:, :, 0]
    return FitMoments(m_w, b_w, m_w if with_uncertainty else None, n_bg)


def compute_stats(
    convolved: np.ndarray,
    science: np.ndarray,
    variance: np.ndarray,
    *,
    background_order: int | None,
    constant_variance_weighting: bool,
    stats_selector: np.ndarray | None = None,
    with_uncertainty: bool = False,
    fit: FitMoments | None = None,
) -> CandidateStats:
    """Sufficient statistics of a batch from its basis-convolved stamps.

    Parameters
    ----------
    convolved : numpy.ndarray
        ``(N, n_kernel, S, S)`` template stamps convolved with each basis kernel.
    science, variance : numpy.ndarray
        ``(N, S, S)`` science stamps and the variance of the difference.
    background_order : int or None
        Degree of the local background polynomial fitted with the kernel (its
        columns are the monomials of :func:`local_background_columns`); None for no
        background.
    constant_variance_weighting : bool
        Weight the fit by the stamp's mean inverse variance instead of per pixel.
    stats_selector : numpy.ndarray, optional
        ``(S, S)`` boolean mask of the pixels the quality statistics use (the core).
    with_uncertainty : bool
        Also keep ``Cᵀ W_fit V W_fit C`` for coefficient covariances.
    fit : FitMoments, optional
        The fit's moments, made beforehand (:func:`fit_moments`) with another
        variance; ``variance`` then sets the units of the residual statistics only
        (and ``constant_variance_weighting`` and ``with_uncertainty`` are the
        ``fit``'s).

    Raises
    ------
    ValueError
        When ``fit`` is of another number of candidates or background terms.
    """
    n, _, s, _ = convolved.shape
    p = s * s
    if fit is None:
        fit = fit_moments(
            convolved,
            science,
            variance,
            background_order=background_order,
            constant_variance_weighting=constant_variance_weighting,
            with_uncertainty=with_uncertainty,
        )
    c, n_bg = _design(convolved, background_order)
    if len(fit) != n or fit.n_background != n_bg:
        raise ValueError(
            f"fit moments of {len(fit)} candidates with {fit.n_background} background "
            f"terms given for {n} candidates with {n_bg}"
        )
    sig_inv = np.sqrt(1.0 / variance.reshape(n, p))
    a, z = c * sig_inv[:, None, :], science.reshape(n, p) * sig_inv
    if stats_selector is not None:
        sel = np.flatnonzero(np.asarray(stats_selector).reshape(p))
        a, z = a[:, :, sel], z[:, sel]
    m = np.matmul(a, np.swapaxes(a, 1, 2))
    b = np.matmul(a, z[:, :, None])[:, :, 0]
    return CandidateStats(
        m_fit=fit.m_fit,
        b_fit=fit.b_fit,
        m=m,
        b=b,
        sws=np.einsum("np,np->n", z, z),
        u=a.sum(axis=2),
        su=z.sum(axis=1),
        npix=np.full(n, z.shape[1], dtype=np.float64),
        m_var=fit.m_var,
        n_background=n_bg,
        stamp_half=s // 2,
    )


@functools.lru_cache(maxsize=16)
def local_background_columns(stamp_size: int, order: int) -> np.ndarray:
    """Local background monomials over a stamp, ``(n_terms, S*S)`` (read-only, cached).

    Term ``(i, j)`` (ordered by total degree, as the spatial functions are) is
    ``u^i v^j`` with ``u, v`` the pixel offsets from the stamp centre divided by the
    half-width. The first term is the constant, so the background at the centre is
    the first background coefficient.
    """
    half = stamp_size // 2
    off = (np.arange(stamp_size) - half) / max(half, 1)
    v, u = np.meshgrid(off, off, indexing="ij")
    powers = [(t - j, j) for t in range(order + 1) for j in range(t + 1)]
    columns = np.stack([(u**i * v**j).ravel() for i, j in powers])
    columns.flags.writeable = False
    return columns
