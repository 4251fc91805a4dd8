"""Sufficient statistics of kernel candidates: the moments every fit and statistic uses.

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
A delta-function basis (441 terms for a 21 x 21 kernel) keeps instead the pixels the
statistics are made of (:class:`ResidualPixels`): a convolution per coefficient vector
is far cheaper than its ``M``.

The moments are built block by block (kernel columns, background columns) from the
convolved stamps in place: for a delta-function basis a copy of the design matrix is
as large as the fit's whole working set.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields, is_dataclass, replace

import numpy as np
from scipy import fft

__all__ = [
    "CandidateStats",
    "FitMoments",
    "ResidualPixels",
    "compute_stats",
    "fit_moments",
    "core_selector",
    "local_background_columns",
    "take_rows",
    "concatenate_rows",
]


def take_rows(record, index: np.ndarray | slice):
    """A dataclass of per-candidate arrays (first axis: candidate) for a subset.

    Fields that are not arrays (sizes, or None for what was not computed) and fields
    marked ``shared`` in their metadata (the same for every candidate) are kept;
    nested records of per-candidate arrays are subset in turn. An index that picks
    consecutive rows in order gives views, not copies: the normal matrices of a
    delta-function basis are over a megabyte per candidate.
    """
    index = _as_slice(index)
    values = {}
    for f in fields(record):
        v = getattr(record, f.name)
        if f.metadata.get("shared"):
            values[f.name] = v
        elif isinstance(v, np.ndarray):
            values[f.name] = v[index]
        elif is_dataclass(v) and not isinstance(v, type):
            values[f.name] = take_rows(v, index)
        else:
            values[f.name] = v
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

    Fields that are not arrays, or are marked ``shared``, are taken from the first part
    (the parts of one run agree on them); nested records are stacked in turn.
    """
    first = parts[0]
    values = {}
    for f in fields(first):
        v = getattr(first, f.name)
        if f.metadata.get("shared"):
            values[f.name] = v
        elif isinstance(v, np.ndarray):
            values[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
        elif is_dataclass(v) and not isinstance(v, type):
            values[f.name] = concatenate_rows([getattr(p, f.name) for p in parts])
        else:
            values[f.name] = v
    return type(first)(**values)


def core_selector(stamp_size: int, core_radius: int) -> np.ndarray:
    """Boolean ``(S, S)`` mask of the ``2r x 2r`` core box of a stamp."""
    c = stamp_size // 2
    r = int(core_radius)
    sel = np.zeros((stamp_size, stamp_size), dtype=bool)
    sel[max(c - r, 0) : c + r, max(c - r, 0) : c + r] = True
    return sel


@dataclass
class ResidualPixels:
    """What the residual statistics of a delta-function basis are computed from: pixels.

    A delta-function basis's kernel columns are shifts of the template cutout, so the
    model of any coefficient vector is one convolution of the cutout with its kernel
    image: far cheaper per vector than the ``(K² + n_bg)²`` matrix ``Cᵀ W C`` whose
    quadratic form would give the same sums (for a 21 x 21 kernel, building it cost
    about twice a whole Alard-Lupton fit per candidate).

    Attributes
    ----------
    template : numpy.ndarray
        ``(N, S+K-1, S+K-1)`` template cutouts.
    science, sigma_inverse : numpy.ndarray
        ``(N, S, S)`` science stamps and the inverse sigma the residuals are in units of.
    selector : numpy.ndarray or None
        ``(S, S)`` boolean mask of the statistics' pixels; None for the whole stamp.
    background_order : int or None
        Degree of the local background (:func:`local_background_columns`).
    transform : numpy.ndarray or None
        ``(K*K, n_kernel)``: the delta-function coefficients of each kernel term of
        a derived basis (:meth:`CandidateStats.transformed`); None for the identity.
    """

    template: np.ndarray
    science: np.ndarray
    sigma_inverse: np.ndarray
    selector: np.ndarray | None = field(default=None, metadata={"shared": True})
    background_order: int | None = field(default=None, metadata={"shared": True})
    transform: np.ndarray | None = field(default=None, metadata={"shared": True})

    def transformed(self, kernel_transform: np.ndarray) -> ResidualPixels:
        """The same pixels for a basis whose kernels are ``current @ kernel_transform``."""
        t = np.asarray(kernel_transform, dtype=np.float64)
        return replace(self, transform=t if self.transform is None else self.transform @ t)

    def residual_sums(self, coeffs: np.ndarray, n_kernel: int) -> tuple[np.ndarray, np.ndarray]:
        """Sum and sum of squares of the residuals in units of sigma, each ``(N,)``.

        The residual is ``science - template ⊛ kernel - background`` over the
        statistics' pixels, times the inverse sigma.
        """
        a = np.asarray(coeffs, dtype=np.float64)
        n, s, _ = self.science.shape
        k = self.template.shape[-1] - s + 1
        delta = a[:, :n_kernel] if self.transform is None else a[:, :n_kernel] @ self.transform.T
        kernels = delta.reshape(n, k, k)
        # Convolution by FFT at the cutout's size: the valid part does not see the wrap.
        shape = self.template.shape[-2:]
        product = fft.rfft2(self.template, axes=(-2, -1)) * fft.rfft2(kernels, shape, axes=(-2, -1))
        model = fft.irfft2(product, shape, axes=(-2, -1))[:, k - 1 :, k - 1 :]
        if self.background_order is not None:
            cols = local_background_columns(s, self.background_order)
            model = model + (a[:, n_kernel:] @ cols).reshape(n, s, s)
        resid = ((self.science - model) * self.sigma_inverse).reshape(n, s * s)
        if self.selector is not None:
            resid = resid[:, np.flatnonzero(np.asarray(self.selector).reshape(s * s))]
        return resid.sum(axis=1), np.einsum("np,np->n", resid, resid)


@dataclass
class CandidateStats:
    """Sufficient statistics of a batch of candidates (first axis: candidate).

    The last coefficient is the background when ``has_background``. ``var_science``
    ``(N,)`` and ``var_template`` ``(N, K, K)``, when made, are the means over the
    statistics' pixels of ``V_s / v`` and, per kernel pixel, of the template variance
    it sees over ``v``: the difference's variance under any kernel, relative to ``v``.
    With ``pixels`` (a delta-function basis), the residual statistics come from them
    and ``m``, ``b``, ``sws``, ``u`` and ``su`` are None.
    """

    m_fit: np.ndarray
    b_fit: np.ndarray
    m: np.ndarray | None
    b: np.ndarray | None
    sws: np.ndarray | None
    u: np.ndarray | None
    su: np.ndarray | None
    npix: np.ndarray
    m_var: np.ndarray | None
    n_background: int
    stamp_half: int
    var_science: np.ndarray | None = None
    var_template: np.ndarray | None = None
    pixels: ResidualPixels | None = None

    def __len__(self) -> int:
        return self.m_fit.shape[0]

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
        return self.m_fit.shape[-1]

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
        pixels = None if self.pixels is None else self.pixels.transformed(t)
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

        def vec(a):
            return None if a is None else a @ t

        return replace(
            self,
            m_fit=mat(self.m_fit),
            b_fit=self.b_fit @ t,
            m=mat(self.m),
            b=vec(self.b),
            u=vec(self.u),
            m_var=mat(self.m_var),
            pixels=pixels,
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
        if self.pixels is not None:
            total, chi2 = self.pixels.residual_sums(a, self.n_kernel)
        else:
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


def _background(stamp_size: int, background_order: int | None) -> np.ndarray | None:
    """The background columns ``(n_bg, S*S)`` of a stamp, or None without a background."""
    if background_order is None:
        return None
    return local_background_columns(stamp_size, background_order)


# Design arrays (the columns of a few candidates, whitened) are made this many bytes at a
# time: a delta-function candidate's are 6.5 MB, and arrays this size stay in memory the
# allocator reuses; stacks of hundreds of megabytes are fresh pages every time, which
# cost more to touch than the products cost to compute.
_BLOCK_BYTES = 1 << 23


def _blocks(n: int, n_columns: int, n_pixels: int) -> list[slice]:
    """Slices of the candidates whose design arrays hold about ``_BLOCK_BYTES``."""
    step = max(1, _BLOCK_BYTES // (8 * max(n_columns * n_pixels, 1)))
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


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
    n, nk, s, _ = convolved.shape
    p = s * s
    cols = _background(s, background_order)
    n_bg = 0 if cols is None else cols.shape[0]
    n_par = nk + n_bg
    sci, var = science.reshape(n, p), variance.reshape(n, p)
    m_fit, b_fit = np.empty((n, n_par, n_par)), np.empty((n, n_par))
    uncertainty = with_uncertainty and constant_variance_weighting
    m_var = np.empty((n, n_par, n_par)) if uncertainty else None
    w_const = 1.0 / var.mean(axis=1)
    sig_inv = np.sqrt(1.0 / var)
    for blk in _blocks(n, nk, p):
        kern = np.asarray(convolved[blk]).reshape(-1, nk, p)
        if constant_variance_weighting:
            _moments(kern, cols, sci[blk], m_fit[blk], b_fit[blk])
            if uncertainty:
                root = np.sqrt(var[blk]) * w_const[blk, None]
                _moments(kern * root[:, None, :], _times(cols, root), None, m_var[blk])
        else:
            si = sig_inv[blk]
            kern = kern * si[:, None, :]
            _moments(kern, _times(cols, si), sci[blk] * si, m_fit[blk], b_fit[blk])
    if constant_variance_weighting:
        m_fit *= w_const[:, None, None]
        b_fit *= w_const[:, None]
    elif with_uncertainty:
        m_var = m_fit
    return FitMoments(m_fit, b_fit, m_var, n_bg)


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
    residual_template: np.ndarray | None = None,
) -> CandidateStats:
    """Sufficient statistics of a batch from its basis-convolved stamps.

    Parameters
    ----------
    convolved : numpy.ndarray
        ``(N, n_kernel, S, S)`` template stamps convolved with each basis kernel, or
        any object of that ``shape`` whose slices over candidates are such arrays
        (:class:`~diffkernel.kernel.candidate.ShiftedTemplates`).
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
    residual_template : numpy.ndarray, optional
        ``(N, S+K-1, S+K-1)`` template cutouts when ``convolved`` are their shifts
        (a delta-function basis in its own native order): the residual statistics
        are then computed from the pixels (:class:`ResidualPixels`), not from a
        normal matrix of the statistics' weights.

    Raises
    ------
    ValueError
        When ``fit`` is of another number of candidates or background terms.
    """
    n, nk, s, _ = convolved.shape
    p = s * s
    cols = _background(s, background_order)
    n_bg = 0 if cols is None else cols.shape[0]
    # Whole-stamp statistics of a fit weighted per pixel by this same variance are
    # the fit's own moments: made once.
    shared = fit is None and stats_selector is None and not constant_variance_weighting
    if fit is None:
        fit = fit_moments(
            convolved,
            science,
            variance,
            background_order=background_order,
            constant_variance_weighting=constant_variance_weighting,
            with_uncertainty=with_uncertainty,
        )
    if len(fit) != n or fit.n_background != n_bg:
        raise ValueError(
            f"fit moments of {len(fit)} candidates with {fit.n_background} background "
            f"terms given for {n} candidates with {n_bg}"
        )
    sig_inv = np.sqrt(1.0 / variance.reshape(n, p))
    if residual_template is not None:
        npix = p if stats_selector is None else int(np.count_nonzero(stats_selector))
        pixels = ResidualPixels(
            np.asarray(residual_template, dtype=np.float64),
            np.asarray(science, dtype=np.float64),
            sig_inv.reshape(n, s, s),
            None if stats_selector is None else np.asarray(stats_selector, dtype=bool),
            background_order,
        )
        return CandidateStats(
            m_fit=fit.m_fit,
            b_fit=fit.b_fit,
            m=None,
            b=None,
            sws=None,
            u=None,
            su=None,
            npix=np.full(n, npix, dtype=np.float64),
            m_var=fit.m_var,
            n_background=n_bg,
            stamp_half=s // 2,
            pixels=pixels,
        )
    z = science.reshape(n, p) * sig_inv
    sel = slice(None)
    if stats_selector is not None:
        sel = np.flatnonzero(np.asarray(stats_selector).reshape(p))
        z = z[:, sel]
    a_b = _times(cols, sig_inv)
    a_b = None if a_b is None else a_b[:, :, sel]
    n_par = nk + n_bg
    if shared:
        m, b = fit.m_fit, fit.b_fit
    else:
        m, b = np.empty((n, n_par, n_par)), np.empty((n, n_par))
    u = np.empty((n, n_par))
    for blk in _blocks(n, nk, p):
        a_k = np.asarray(convolved[blk]).reshape(-1, nk, p)
        a_k = (a_k * sig_inv[blk, None, :])[:, :, sel]
        bg = None if a_b is None else a_b[blk]
        if not shared:
            _moments(a_k, bg, z[blk], m[blk], b[blk])
        u[blk] = _column_sums(a_k, bg)
    return CandidateStats(
        m_fit=fit.m_fit,
        b_fit=fit.b_fit,
        m=m,
        b=b,
        sws=np.einsum("np,np->n", z, z),
        u=u,
        su=z.sum(axis=1),
        npix=np.full(n, z.shape[1], dtype=np.float64),
        m_var=fit.m_var,
        n_background=n_bg,
        stamp_half=s // 2,
    )


def _times(cols: np.ndarray | None, weights: np.ndarray) -> np.ndarray | None:
    """Background columns ``(n_bg, P)`` times per-candidate pixel weights ``(N, P)``."""
    return None if cols is None else cols * weights[:, None, :]


def _moments(
    kern: np.ndarray,
    bg: np.ndarray | None,
    y: np.ndarray | None,
    gram: np.ndarray,
    vec: np.ndarray | None = None,
) -> None:
    """``D Dᵀ`` and ``D y`` of the design ``D = [kern; bg]``, into ``gram`` and ``vec``.

    Parameters
    ----------
    kern : numpy.ndarray
        ``(N, nk, P)`` kernel columns.
    bg : numpy.ndarray or None
        ``(N, nb, P)`` or ``(nb, P)`` background columns.
    y : numpy.ndarray or None
        ``(N, P)``; None for no vector.
    gram, vec : numpy.ndarray
        ``(N, nk + nb, nk + nb)`` and ``(N, nk + nb)`` outputs (``vec`` unused
        without ``y``).
    """
    nk = kern.shape[1]
    nb = 0 if bg is None else bg.shape[-2]
    # kern @ kernᵀ with the same operand on both sides: BLAS's symmetric rank-k update.
    np.matmul(kern, np.swapaxes(kern, 1, 2), out=gram[:, :nk, :nk])
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
