"""The spatial step of the solve: basis, orders, fit and residuals of the spatial model.

Given the candidates in use in a round (:func:`~diffkernel.kernel.solve.solve`
chooses them), the spatial model is made in three steps, as the specification's
``BuildSpatialKernelVisitor`` does:

1. the basis it is fitted in (:func:`spatial_basis`): the kernel basis itself, or,
   with ``usePcaForSpatialKernel``, the principal components of the candidates'
   kernels (:func:`pca_basis`), optionally cut to the size that minimizes the
   Bayesian Information Criterion (``useBicForKernelBasis``, :func:`bic_truncation`);
2. the spatial orders (:func:`spatial_orders`): those asked for, lowered while a
   polynomial has more terms than there are candidates to constrain it;
3. the fit of the kernel and background polynomials to the candidates' normal
   equations (:func:`~diffkernel.kernel.spatial.fit_spatial`), refused when its
   matrix is worse conditioned than ``maxSpatialConditionNumber``.

:func:`spatial_residuals` then gives each candidate's residual moments under the
model, which ``AssessSpatialKernelVisitor`` clips.

Everything here is linear algebra on small matrices: no pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import SpatialFitError
from .basis import KernelBasis, derive_basis, renormalize
from .fit import SingleFit, fit_single_kernels, inverse_quadratic_forms, pad_background
from .moments import CandidateStats
from .spatial import SpatialFunctions, SpatialSolution, fit_spatial, n_terms

__all__ = [
    "SpatialModel",
    "bic_truncation",
    "fit_spatial_model",
    "kernel_sum_precision",
    "pca_basis",
    "spatial_basis",
    "spatial_orders",
    "spatial_residuals",
]


@dataclass
class SpatialModel:
    """A fitted spatial model and the choices made on the way.

    Attributes
    ----------
    solution : SpatialSolution
        The spatially varying kernel and background.
    basis : KernelBasis
        The basis it was fitted in (the kernel basis, or its PCA, maybe truncated).
    stats : CandidateStats
        Every candidate's statistics in that basis.
    bic_size : int or None
        The basis size the BIC chose; None when ``useBicForKernelBasis`` is off.
    kernel_order, background_order : int, int or None
        The spatial orders used; ``background_order`` is None without a background.
    lowered_note : str or None
        Why the orders are lower than asked, when they are.
    """

    solution: SpatialSolution
    basis: KernelBasis
    stats: CandidateStats
    bic_size: int | None
    kernel_order: int
    background_order: int | None
    lowered_note: str | None


def kernel_sum_precision(
    stats: CandidateStats,
    basis: KernelBasis,
    single: SingleFit,
    regularization: np.ndarray | None,
    used: np.ndarray,
) -> np.ndarray:
    """Inverse variance of each used candidate's kernel sum, from its fit matrix.

    The matrix is the one the single-kernel fit solved, regularization included, so
    that the weight matches the fit the kernel came from.
    """
    h = None
    if regularization is not None:
        h = pad_background(regularization, stats.n_background)
    sums = np.zeros(stats.n_params)
    sums[: basis.size] = basis.sums
    var = inverse_quadratic_forms(stats.m_fit, sums, used, single.lam, h)
    return 1.0 / np.maximum(var, np.finfo(float).tiny)


def pca_basis(
    basis: KernelBasis, coeffs: np.ndarray, ksum: np.ndarray, weights: np.ndarray, cfg
) -> tuple[KernelBasis, np.ndarray]:
    """A PCA basis from candidates' kernels, renormalized to conserve the sum.

    Each kernel is divided by its sum so the components describe shape; with
    ``subtractMeanForPca`` the mean kernel is the first component and
    ``numPrincipalComponents - 1`` eigen-kernels follow. Candidates are weighted by
    the precision of their kernel sum (bright stars have well-measured kernels; the
    noisy kernels of faint ones, counted equally, bias the mean kernel's shape and
    with it the kernel sum).

    Returns
    -------
    pca : KernelBasis
        The derived basis.
    transform : numpy.ndarray
        ``(basis.size, m)`` its kernels in ``basis`` coordinates.
    """
    a = coeffs / ksum[:, None]  # (Nc, nb), normalized kernels in basis coordinates
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    sw = np.sqrt(w)[:, None]
    images = basis.images.reshape(basis.size, -1)
    n_comp = int(cfg.numPrincipalComponents)
    columns = []
    if cfg.subtractMeanForPca:
        mean_a = w @ a
        columns.append(mean_a)
        centred = a - mean_a
        n_eig = n_comp - 1
    else:
        centred = a
        n_eig = n_comp
    if n_eig > 0 and len(a) > 1:
        xc = (sw * centred) @ images
        u, s, _ = np.linalg.svd(xc, full_matrices=False)
        keep = s > s[0] * 1e-10 if s.size and s[0] > 0 else np.zeros(0, bool)
        k = min(n_eig, int(keep.sum()))
        # Eigen-image v_i = (1/s_i) u_iᵀ xc, so its basis coefficients are
        # (1/s_i) u_iᵀ (sqrt(w) * centred).
        for i in range(k):
            columns.append((sw * centred).T @ u[:, i] / s[i])
    transform = np.stack(columns, axis=1)
    new_t, _ = renormalize(basis.images, transform)
    pca = derive_basis(
        basis,
        new_t,
        "pca",
        True,
        (1,) * new_t.shape[1],
        {
            "parent": basis.kind,
            "components": int(new_t.shape[1]),
            "subtract_mean": bool(cfg.subtractMeanForPca),
        },
    )
    return pca, new_t


def bic_truncation(stats: CandidateStats, basis: KernelBasis, cfg) -> int:
    """Number of leading basis kernels minimizing the summed BIC of the candidates.

    Each candidate is refitted with every prefix of the basis that ends on a group
    boundary; its BIC is ``chi2 + (m + n_background) ln(npix)`` for ``m`` kernels. The
    smallest size whose summed BIC is within a relative 1e-9 of the minimum wins, so a
    component that lowers the chi² by less than ``ln(npix)`` per candidate (one that
    fits noise) is dropped.
    """
    sizes = np.cumsum(basis.groups)
    n_bg = stats.n_background
    bics = np.empty(len(sizes))
    for i, m in enumerate(sizes):
        sub = stats.transformed(np.eye(basis.size)[:, :m])
        fit = fit_single_kernels(sub, cfg)
        _, _, chi2 = sub.residual_moments(fit.coeffs)
        bics[i] = np.sum(chi2 + (m + n_bg) * np.log(sub.npix))
    # Against the minimum, not a running best started at inf: inf - 1e-9 * inf is NaN,
    # which no BIC is below, so the whole basis would always be kept.
    best = np.min(bics)
    return int(sizes[np.flatnonzero(bics <= best + 1e-9 * abs(best))[0]])


def spatial_basis(
    stats: CandidateStats,
    basis: KernelBasis,
    single: SingleFit,
    regularization: np.ndarray | None,
    ksum: np.ndarray,
    used: np.ndarray,
    cfg,
) -> tuple[KernelBasis, CandidateStats, int | None]:
    """The basis the spatial model is fitted in, and every candidate's statistics in it.

    Parameters
    ----------
    stats : CandidateStats
        Every candidate's statistics in ``basis``.
    basis : KernelBasis
        The kernel basis.
    single : SingleFit
        Every candidate's single-kernel fit.
    regularization : numpy.ndarray or None
        The regularization matrix of the single-kernel fits.
    ksum : numpy.ndarray
        Every candidate's kernel sum.
    used : numpy.ndarray
        Indices of the candidates in use: the PCA and the BIC see only them.
    cfg : PsfMatchConfig
        ``usePcaForSpatialKernel``, ``useBicForKernelBasis`` and the PCA settings.

    Returns
    -------
    basis : KernelBasis
        ``basis`` itself, or its PCA basis, maybe truncated by the BIC.
    stats : CandidateStats
        Every candidate's statistics in that basis.
    bic_size : int or None
        The size the BIC chose (None when it was not asked for).
    """
    b_use, st_use = basis, stats
    if cfg.usePcaForSpatialKernel:
        b_use, t = pca_basis(
            basis,
            single.coeffs[used, : basis.size],
            ksum[used],
            kernel_sum_precision(stats, basis, single, regularization, used),
            cfg,
        )
        st_use = stats.transformed(t)
    bic_size = None
    if cfg.useBicForKernelBasis:
        bic_size = bic_truncation(st_use.take(used), b_use, cfg)
        if bic_size < b_use.size:
            st_use = st_use.transformed(np.eye(b_use.size)[:, :bic_size])
            b_use = b_use.truncated(bic_size)
    return b_use, st_use, bic_size


def spatial_orders(cfg, n_used: int, has_background: bool) -> tuple[int, int, str | None]:
    """Spatial orders that ``n_used`` candidates can constrain.

    Each of ``spatialKernelOrder`` and ``spatialBgOrder`` is lowered until its
    polynomial has no more terms than there are candidates: with fewer, the spatial
    matrix is singular and the fit would fail rather than give a coarser model.

    Returns
    -------
    kernel_order, background_order : int
        The orders to use (the background one is meaningless without a background).
    note : str or None
        Which orders were lowered and why, when some were.
    """
    k_order = int(cfg.spatialKernelOrder)
    while k_order > 0 and n_terms(k_order) > n_used:
        k_order -= 1
    bg_order = int(cfg.spatialBgOrder)
    while has_background and bg_order > 0 and n_terms(bg_order) > n_used:
        bg_order -= 1
    note = None
    if k_order != cfg.spatialKernelOrder or (has_background and bg_order != cfg.spatialBgOrder):
        note = (
            f"only {n_used} good candidate(s): spatial orders lowered to "
            f"kernel {k_order}, background {bg_order if has_background else '-'} "
            f"(asked {cfg.spatialKernelOrder}, {cfg.spatialBgOrder})"
        )
    return k_order, bg_order, note


def fit_spatial_model(
    stats: CandidateStats,
    basis: KernelBasis,
    single: SingleFit,
    regularization: np.ndarray | None,
    ksum: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    used: np.ndarray,
    cfg,
    image_shape: tuple[int, int],
) -> SpatialModel:
    """Fit the spatial model to the candidates in use.

    Parameters
    ----------
    stats, basis, single, regularization, ksum
        As for :func:`spatial_basis`: every candidate's, ``used`` selects.
    x, y : numpy.ndarray
        Every candidate's position in pixels.
    used : numpy.ndarray
        Indices of the candidates in use.
    cfg : PsfMatchConfig
        Active kernel configuration.
    image_shape : tuple of int
        ``(ny, nx)`` of the image, the spatial functions' domain.

    Raises
    ------
    SpatialFitError
        When the spatial matrix is singular or, with ``checkConditionNumber``, its
        condition number exceeds ``maxSpatialConditionNumber``.
    """
    has_bg = stats.has_background
    if regularization is not None and not cfg.usePcaForSpatialKernel:
        # The spatial fit keeps the penalty of the single-kernel fits (each candidate's
        # matrix with its own strength): without it the kernel's modes that the
        # template's PSF hides are fitted to noise, more so the deeper the template.
        # (A PCA basis is made of the regularized kernels, smooth already; penalizing
        # its sum-carrying component there pulled the kernel sum low: -5.9% against
        # -3.4% on a 768² pair with an equal-depth template.)
        penalty = single.lam[used, None, None] * pad_background(regularization, stats.n_background)
        m_fit = stats.m_fit.copy()
        m_fit[used] += penalty
        stats = replace(stats, m_fit=m_fit)
        regularization = None  # (now in m_fit: kernel_sum_precision must not add it again)
    fit_basis, fit_stats, bic_size = spatial_basis(
        stats, basis, single, regularization, ksum, used, cfg
    )
    k_order, bg_order, note = spatial_orders(cfg, len(used), has_bg)
    bbox = (0.0, 0.0, float(image_shape[1] - 1), float(image_shape[0] - 1))
    kf = SpatialFunctions(cfg.spatialModelType, k_order, bbox)
    bf = SpatialFunctions(cfg.spatialModelType, bg_order, bbox) if has_bg else None
    sol = fit_spatial(
        fit_stats.take(used),
        x[used],
        y[used],
        fit_basis,
        kf,
        bf,
        cfg.conditionNumberType,
        with_covariance=bool(cfg.calculateKernelUncertainty),
    )
    if cfg.checkConditionNumber and sol.condition > cfg.maxSpatialConditionNumber:
        raise SpatialFitError(
            f"spatial kernel matrix condition number {sol.condition:.3g} exceeds "
            f"maxSpatialConditionNumber={cfg.maxSpatialConditionNumber:.3g}; lower "
            "spatialKernelOrder/spatialBgOrder or add candidates"
        )
    return SpatialModel(
        sol, fit_basis, fit_stats, bic_size, k_order, bg_order if has_bg else None, note
    )


def spatial_residuals(
    model: SpatialModel, x: np.ndarray, y: np.ndarray, used: np.ndarray, local_order: int
) -> tuple[np.ndarray, np.ndarray]:
    """Residual mean and standard deviation of the used candidates under the model.

    The model's kernel and background at each candidate's centre are written as the
    coefficients of a single-kernel fit (a local background polynomial of degree
    ``local_order``), so the candidate's sufficient statistics give the moments of
    the difference the model leaves on its stamp, in units of its sigma under the
    model's kernel.
    """
    local = model.solution.local_coefficients(x[used], y[used], model.stats.stamp_half, local_order)
    kernels = model.basis.kernel_image(local[:, : model.basis.size])
    mean, std, _ = model.stats.take(used).residual_moments(local, kernels)
    return mean, std
