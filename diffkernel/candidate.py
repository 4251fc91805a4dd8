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

from dataclasses import dataclass, fields, replace

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .basis import KernelBasis
from .image import MaskedImage

__all__ = [
    "StampBatch",
    "CandidateStats",
    "cut_stamps",
    "convolve_stamps",
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
        t_img[yc - ht, xc - ht],
        t_var[yc - ht, xc - ht],
        s_img[yc - hs, xc - hs],
        s_var[yc - hs, xc - hs],
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
        fx, fy = basis.separable
        # Unique 1-D filters: many native functions share their x (or y) factor.
        ux, ix = np.unique(fx, axis=0, return_inverse=True)
        uy, iy = np.unique(fy, axis=0, return_inverse=True)
        ax = _toeplitz_valid(ux, ht)  # (nfx, S, Ht)
        ay = _toeplitz_valid(uy, ht)  # (nfy, S, Ht)
        # x pass: (N, Ht, Ht) @ (Ht, nfx*S) -> (N, Ht, nfx, S)
        xpass = (tc.reshape(n * ht, ht) @ ax.reshape(-1, ht).T).reshape(n, ht, len(ux), s)
        out = np.empty((n, len(fx), s, s))
        for r in range(len(fx)):
            out[:, r] = np.matmul(ay[iy.ravel()[r]], xpass[:, :, ix.ravel()[r], :])
        return out
    if basis.kind == "delta-function":
        windows = sliding_window_view(tc, (s, s), axis=(1, 2))  # (N, K, K, S, S)
        return np.ascontiguousarray(windows[:, ::-1, ::-1]).reshape(n, k * k, s, s)
    # Generic native images: direct valid convolution through windows.
    windows = sliding_window_view(tc, (s, s), axis=(1, 2))[:, ::-1, ::-1]
    return np.einsum("rji,njixy->nrxy", basis.native_images, windows, optimize=True)


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
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[index] if isinstance(v, np.ndarray) else v
        return CandidateStats(**values)

    @staticmethod
    def concatenate(parts: list[CandidateStats]) -> CandidateStats:
        """Stack the statistics of several batches."""
        first = parts[0]
        values = {}
        for f in fields(first):
            v = getattr(first, f.name)
            if isinstance(v, np.ndarray):
                values[f.name] = np.concatenate([getattr(p, f.name) for p in parts])
            else:
                values[f.name] = v
        return CandidateStats(**values)

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
    c = convolved.reshape(n, nk, p)
    n_bg = 0
    if background_order is not None:
        cols = local_background_columns(s, background_order)
        n_bg = cols.shape[0]
        c = np.concatenate([c, np.broadcast_to(cols, (n, n_bg, p))], axis=1)
    sci = science.reshape(n, p)
    var = variance.reshape(n, p)
    w = 1.0 / var
    ct = np.swapaxes(c, 1, 2)
    m_w = np.matmul(c * w[:, None, :], ct)
    b_w = np.einsum("njp,np->nj", c, w * sci)
    if constant_variance_weighting:
        w_const = 1.0 / var.mean(axis=1)
        m_fit = np.matmul(c, ct) * w_const[:, None, None]
        b_fit = np.einsum("njp,np->nj", c, sci) * w_const[:, None]
        m_var = (
            np.matmul(c * (var * w_const[:, None] ** 2)[:, None, :], ct)
            if with_uncertainty
            else None
        )
    else:
        m_fit, b_fit = m_w, b_w
        m_var = m_w if with_uncertainty else None
    if stats_selector is None:
        m, b, cs, ss, ws = m_w, b_w, c, sci, w
    else:
        sel = np.asarray(stats_selector).reshape(p)
        cs, ss, ws = c[:, :, sel], sci[:, sel], w[:, sel]
        m = np.matmul(cs * ws[:, None, :], np.swapaxes(cs, 1, 2))
        b = np.einsum("njp,np->nj", cs, ws * ss)
    sig_inv = np.sqrt(ws)
    return CandidateStats(
        m_fit=m_fit,
        b_fit=b_fit,
        m=m,
        b=b,
        sws=np.einsum("np,np->n", ws * ss, ss),
        u=np.einsum("njp,np->nj", cs, sig_inv),
        su=np.einsum("np,np->n", ss, sig_inv),
        npix=np.full(n, ss.shape[1], dtype=np.float64),
        m_var=m_var,
        n_background=n_bg,
        stamp_half=s // 2,
    )


def local_background_columns(stamp_size: int, order: int) -> np.ndarray:
    """Local background monomials over a stamp, ``(n_terms, S*S)``.

    Term ``(i, j)`` (ordered by total degree, as the spatial functions are) is
    ``u^i v^j`` with ``u, v`` the pixel offsets from the stamp centre divided by the
    half-width. The first term is the constant, so the background at the centre is
    the first background coefficient.
    """
    half = stamp_size // 2
    off = (np.arange(stamp_size) - half) / max(half, 1)
    v, u = np.meshgrid(off, off, indexing="ij")
    powers = [(t - j, j) for t in range(order + 1) for j in range(t + 1)]
    return np.stack([(u**i * v**j).ravel() for i, j in powers])
