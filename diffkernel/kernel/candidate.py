"""Kernel candidates: stamps, basis-convolved stamps and sufficient statistics.

For a candidate with science stamp ``s`` (``S x S`` pixels), template cutout ``t``
(``S + K - 1`` on a side, so that a ``K x K`` convolution is exact over the stamp)
and per-pixel variance ``v``, the model is ``s ≈ C a`` where column ``j`` of ``C`` is
the template convolved with basis kernel ``j`` (plus a column of ones for the
differential background). Every fit and every quality statistic the task needs is
a function of a few moments of ``C`` and ``s``:

- fit:   ``M_fit = Cᵀ W_fit C``, ``B_fit = Cᵀ W_fit s``
- stats: ``M = Cᵀ W C``, ``B = Cᵀ W s``, ``sᵀ W s``, ``u = Cᵀ σ⁻¹``, ``Σ s/σ``, ``N``

with ``W = diag(1/v)`` and ``W_fit`` either ``W`` or ``1/mean(v)`` (constant variance
weighting). The residual mean and standard deviation in units of sigma for *any*
coefficient vector follow without pixels, so the spatial fit, its assessment and
the PCA refit run on these small matrices only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..image import MaskedImage
from .basis import KernelBasis

__all__ = [
    "StampBatch",
    "CandidateStats",
    "cut_stamps",
    "convolve_stamps",
    "convolve_basis",
    "compute_stats",
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
        return StampBatch(
            self.template[keep],
            self.template_variance[keep],
            self.science[keep],
            self.science_variance[keep],
        )

    def template_center(self) -> tuple[np.ndarray, np.ndarray]:
        """Template and template-variance pixels under the science stamp."""
        h = self.kernel_size // 2
        s = self.stamp_size
        return (
            self.template[:, h : h + s, h : h + s],
            self.template_variance[:, h : h + s, h : h + s],
        )


def take_rows(record, index: np.ndarray | slice):
    """A dataclass of per-candidate arrays (first axis: candidate) for a subset.

    Fields that are not arrays (sizes, or None for what was not computed) are kept.
    An index that picks consecutive rows in order gives views, not copies: the normal
    matrices of a delta-function basis are over a megabyte per candidate.
    """
    index = _as_slice(index)
    values = {}
    for f in fields(record):
        v = getattr(record, f.name)
        values[f.name] = v[index] if isinstance(v, np.ndarray) else v
    return type(record)(**values)


def _as_slice(index: np.ndarray | slice) -> np.ndarray | slice:
    """``index`` as a slice when it selects a run of consecutive rows in order."""
    if isinstance(index, slice):
        return index
    idx = np.asarray(index)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx) if idx.ndim == 1 else idx
    if idx.ndim != 1 or idx.size == 0 or idx.dtype.kind not in "iu" or idx[0] < 0:
        return index
    if np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[0]) + idx.size)
    return index


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

    The last coefficient is the background when ``has_background``.
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
            # Two batched products, the large one first: einsum's own plan copies the
            # (N, n, n) stack, a megabyte per candidate for a delta-function basis.
            return None if a is None else np.matmul(t.T, np.matmul(a, t))

        return replace(
            self,
            m_fit=mat(self.m_fit),
            b_fit=self.b_fit @ t,
            m=mat(self.m),
            b=self.b @ t,
            u=self.u @ t,
            m_var=mat(self.m_var),
        )

    def residual_moments(self, coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Residual mean, standard deviation and chi² in units of sigma.

        Parameters
        ----------
        coeffs : numpy.ndarray
            ``(N, n_params)`` coefficient vectors, one per candidate.
        """
        a = np.asarray(coeffs)
        chi2 = np.einsum("ni,nij,nj->n", a, self.m, a) - 2 * np.einsum("ni,ni->n", a, self.b)
        chi2 = np.maximum(chi2 + self.sws, 0.0)
        total = self.su - np.einsum("ni,ni->n", a, self.u)
        mean = total / self.npix
        var = np.maximum(chi2 / self.npix - mean**2, 0.0) * self.npix / np.maximum(self.npix - 1, 1)
        return mean, np.sqrt(var), chi2


def compute_stats(
    convolved: np.ndarray,
    science: np.ndarray,
    variance: np.ndarray,
    *,
    background_order: int | None,
    constant_variance_weighting: bool,
    stats_selector: np.ndarray | None = None,
    with_uncertainty: bool = False,
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
    """
    n, nk, s, _ = convolved.shape
    p = s * s
    sci = science.reshape(n, p)
    var = variance.reshape(n, p)
    w = 1.0 / var
    sig_inv = np.sqrt(w)
    n_bg = 0
    cols = None
    if background_order is not None:
        cols = local_background_columns(s, background_order)
        n_bg = cols.shape[0]
    # The design matrix C has the kernel columns (the convolved stamps, used in place:
    # a copy of them is as large as a delta-function fit's whole working set) and the
    # background's. Every weighted moment is a product of the whitened A = C W^1/2
    # with itself or with the whitened science, a few batched BLAS products each.
    kern = convolved.reshape(n, nk, p)
    a_k = kern * sig_inv[:, None, :]
    a_b = None if cols is None else cols * sig_inv[:, None, :]
    z = sci * sig_inv
    m_w = b_w = None
    if not constant_variance_weighting or stats_selector is None:
        # (With constant weighting and core statistics, nothing uses them.)
        m_w, b_w = _moments(a_k, a_b, z)
    if constant_variance_weighting:
        w_const = 1.0 / var.mean(axis=1)
        m_fit, b_fit = _moments(kern, cols, sci)
        m_fit *= w_const[:, None, None]
        b_fit *= w_const[:, None]
        m_var = None
        if with_uncertainty:
            root = np.sqrt(var) * w_const[:, None]
            m_var = _moments(kern * root[:, None, :], _times(cols, root), None)[0]
    else:
        m_fit, b_fit = m_w, b_w
        m_var = m_w if with_uncertainty else None
    if stats_selector is None:
        m, b, z_s = m_w, b_w, z
        u = _column_sums(a_k, a_b)
    else:
        sel = np.flatnonzero(np.asarray(stats_selector).reshape(p))
        a_ks, z_s = a_k[:, :, sel], z[:, sel]
        a_bs = None if a_b is None else a_b[:, :, sel]
        m, b = _moments(a_ks, a_bs, z_s)
        u = _column_sums(a_ks, a_bs)
    return CandidateStats(
        m_fit=m_fit,
        b_fit=b_fit,
        m=m,
        b=b,
        sws=np.einsum("np,np->n", z_s, z_s),
        u=u,
        su=z_s.sum(axis=1),
        npix=np.full(n, z_s.shape[1], dtype=np.float64),
        m_var=m_var,
        n_background=n_bg,
        stamp_half=s // 2,
    )


def _times(cols: np.ndarray | None, weights: np.ndarray) -> np.ndarray | None:
    """Background columns ``(n_bg, P)`` times per-candidate pixel weights ``(N, P)``."""
    return None if cols is None else cols * weights[:, None, :]


def _moments(
    kern: np.ndarray, bg: np.ndarray | None, y: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """``D Dᵀ`` and ``D y`` of the design ``D = [kern; bg]``, built block by block.

    Parameters
    ----------
    kern : numpy.ndarray
        ``(N, nk, P)`` kernel columns.
    bg : numpy.ndarray or None
        ``(N, nb, P)`` or ``(nb, P)`` background columns.
    y : numpy.ndarray or None
        ``(N, P)``; None for no vector.
    """
    n, nk, _ = kern.shape
    nb = 0 if bg is None else bg.shape[-2]
    gram = np.empty((n, nk + nb, nk + nb))
    # kern @ kernᵀ with the same operand on both sides: BLAS's symmetric rank-k update.
    np.matmul(kern, np.swapaxes(kern, 1, 2), out=gram[:, :nk, :nk])
    vec = None if y is None else np.empty((n, nk + nb))
    if y is not None:
        vec[:, :nk] = np.matmul(kern, y[:, :, None])[:, :, 0]
    if nb:
        bg_t = np.swapaxes(bg, -1, -2)
        cross = np.matmul(kern, bg_t)
        gram[:, :nk, nk:] = cross
        gram[:, nk:, :nk] = np.swapaxes(cross, 1, 2)
        gram[:, nk:, nk:] = np.matmul(bg, bg_t)
        if y is not None:
            vec[:, nk:] = np.matmul(bg, y[:, :, None])[..., 0]
    return gram, vec


def _column_sums(kern: np.ndarray, bg: np.ndarray | None) -> np.ndarray:
    """Sum over pixels of every design column, ``(N, nk + nb)``."""
    sums = kern.sum(axis=2)
    if bg is None:
        return sums
    return np.concatenate([sums, np.broadcast_to(bg.sum(axis=-1), (len(sums), bg.shape[-2]))], 1)


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
