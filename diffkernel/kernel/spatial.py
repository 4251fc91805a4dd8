"""Spatial models of the kernel and background, and their global fit.

Each kernel coefficient and the differential background vary over the image as
a sum of 2-D functions: Chebyshev polynomials of the first kind in coordinates
mapped to [-1, 1] over the image, or plain monomials ``x^i y^j`` in pixels. Order
``o`` has ``(o + 1)(o + 2) / 2`` terms, ordered by total degree, so lower orders
are prefixes of higher ones.

The global fit minimizes the sum of every candidate's chi², which from the
candidates' normal equations is ``Σ_c (P_c θ)ᵀ M_c (P_c θ) - 2 (P_c θ)ᵀ B_c``, with
``P_c`` the spatial functions at candidate ``c``. It never touches pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, SpatialFitError
from .basis import KernelBasis
from .fit import condition_numbers, solve_spd
from .moments import CandidateStats

__all__ = ["n_terms", "SpatialFunctions", "SpatialSolution", "fit_spatial", "free_kernel_terms"]


def n_terms(order: int) -> int:
    """Number of 2-D terms of total degree <= ``order``."""
    return (order + 1) * (order + 2) // 2


@dataclass(frozen=True)
class SpatialFunctions:
    """2-D basis functions over an image's pixel box.

    Parameters
    ----------
    model_type : {"chebyshev1", "polynomial"}
        Function family.
    order : int
        Maximum total degree.
    bbox : tuple of float
        ``(x0, y0, x1, y1)``: the pixel range the Chebyshev mapping sends to [-1, 1].
    """

    model_type: str
    order: int
    bbox: tuple[float, float, float, float]

    def __post_init__(self) -> None:
        if self.model_type not in ("chebyshev1", "polynomial"):
            raise ConfigError(
                f"spatialModelType must be 'chebyshev1' or 'polynomial', got {self.model_type!r}"
            )
        if self.order < 0:
            raise ConfigError(f"spatial order must be >= 0, got {self.order}")

    @property
    def size(self) -> int:
        """Number of terms."""
        return n_terms(self.order)

    def powers(self) -> list[tuple[int, int]]:
        """``(i, j)`` degrees in x and y of each term, in order."""
        return [(total - j, j) for total in range(self.order + 1) for j in range(total + 1)]

    def evaluate(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Values of every term, shape ``(*shape(x), size)``."""
        x, y = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        shape = x.shape
        x, y = x.ravel(), y.ravel()
        x0, y0, x1, y1 = self.bbox
        if self.model_type == "chebyshev1":
            xs = (2.0 * x - (x0 + x1)) / max(x1 - x0, 1.0)
            ys = (2.0 * y - (y0 + y1)) / max(y1 - y0, 1.0)
            px = np.polynomial.chebyshev.chebvander(xs, self.order)
            py = np.polynomial.chebyshev.chebvander(ys, self.order)
        else:
            px = np.polynomial.polynomial.polyvander(x, self.order)
            py = np.polynomial.polynomial.polyvander(y, self.order)
        out = np.stack([px[:, i] * py[:, j] for i, j in self.powers()], axis=-1)
        return out.reshape(*shape, self.size)

    def factors(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Separable factors of every term on a grid: term ``l`` is ``fy[l] ⊗ fx[l]``.

        Parameters
        ----------
        x, y : numpy.ndarray
            1-D pixel coordinates of the grid's columns and rows.

        Returns
        -------
        fx : numpy.ndarray
            ``(size, len(x))``.
        fy : numpy.ndarray
            ``(size, len(y))``.
        """
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        x0, y0, x1, y1 = self.bbox
        if self.model_type == "chebyshev1":
            px = np.polynomial.chebyshev.chebvander(
                (2.0 * x - (x0 + x1)) / max(x1 - x0, 1.0), self.order
            )
            py = np.polynomial.chebyshev.chebvander(
                (2.0 * y - (y0 + y1)) / max(y1 - y0, 1.0), self.order
            )
        else:
            px = np.polynomial.polynomial.polyvander(x, self.order)
            py = np.polynomial.polynomial.polyvander(y, self.order)
        powers = self.powers()
        return (
            np.stack([px[:, i] for i, _ in powers]),
            np.stack([py[:, j] for _, j in powers]),
        )

    def grid_sum(self, coefficients: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``Σ_l c_l f_l`` on the grid of columns ``x`` and rows ``y``, ``(len(y), len(x))``."""
        fx, fy = self.factors(x, y)
        return (fy.T * np.asarray(coefficients, dtype=np.float64)) @ fx

    def with_order(self, order: int) -> SpatialFunctions:
        """The same family at another order."""
        return SpatialFunctions(self.model_type, order, self.bbox)


@dataclass
class SpatialSolution:
    """A spatially varying kernel and differential background.

    Attributes
    ----------
    basis : KernelBasis
        The kernel basis the coefficients refer to.
    kernel_functions : SpatialFunctions
        Spatial functions of the kernel coefficients.
    kernel_coeffs : numpy.ndarray
        ``(n_basis, n_terms)``; when the sum is conserved, row 0 has only a constant.
    background_functions : SpatialFunctions or None
        Spatial functions of the background (None when no background was fitted).
    background_coeffs : numpy.ndarray
        ``(n_terms_bg,)``.
    condition : float
        Condition number of the (equilibrated) spatial normal matrix.
    covariance : numpy.ndarray or None
        With ``calculateKernelUncertainty``: the covariance of the fit's free
        parameters, the free kernel coefficients (:func:`free_kernel_terms`) in
        row-major order, then the background coefficients.
    """

    basis: KernelBasis
    kernel_functions: SpatialFunctions
    kernel_coeffs: np.ndarray
    background_functions: SpatialFunctions | None
    background_coeffs: np.ndarray
    condition: float
    covariance: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)

    def coefficients_at(self, x, y) -> np.ndarray:
        """Kernel coefficients at positions, shape ``(*shape(x), n_basis)``."""
        f = self.kernel_functions.evaluate(x, y)
        return f @ self.kernel_coeffs.T

    def kernel_sum_variance(self, x, y) -> np.ndarray:
        """Variance of the kernel sum at positions, from :attr:`covariance`.

        Raises
        ------
        ValueError
            When the covariance was not computed (``calculateKernelUncertainty``).
        """
        if self.covariance is None:
            raise ValueError(
                "the spatial solution has no covariance; set calculateKernelUncertainty = True"
            )
        free = free_kernel_terms(self.basis, self.kernel_functions).ravel()
        f = self.kernel_functions.evaluate(x, y)  # (..., n_terms)
        grad = (self.basis.sums[:, None] * f[..., None, :]).reshape(*f.shape[:-1], -1)
        grad = grad[..., free]
        cov = self.covariance[: grad.shape[-1], : grad.shape[-1]]
        return np.einsum("...i,ij,...j->...", grad, cov, grad)

    def background_at(self, x, y) -> np.ndarray:
        """Differential background at positions."""
        if self.background_functions is None:
            return np.zeros(np.broadcast(np.asarray(x), np.asarray(y)).shape)
        return self.background_functions.evaluate(x, y) @ self.background_coeffs

    def local_coefficients(self, x, y, stamp_half: int, local_order: int) -> np.ndarray:
        """Coefficients as a single-kernel fit sees them at candidate centres.

        Kernel terms, then the local background polynomial of degree
        ``local_order`` over a stamp of half-width ``stamp_half`` that equals the
        global background there.
        """
        a = self.coefficients_at(x, y)
        if self.background_functions is None:
            return a
        jac = background_local_map(self.background_functions, x, y, stamp_half, local_order)
        local_bg = np.einsum("cml,l->cm", jac, self.background_coeffs)
        return np.concatenate([a, local_bg], axis=-1)


def background_local_map(
    functions: SpatialFunctions, x: np.ndarray, y: np.ndarray, stamp_half: int, local_order: int
) -> np.ndarray:
    """Linear maps from global background coefficients to each stamp's local terms.

    The global functions restricted to a stamp are polynomials of degree
    ``functions.order``; when ``local_order`` is at least that, the local monomials
    (see :func:`~diffkernel.kernel.candidate.local_background_columns`) represent them
    exactly, and the least-squares projection below is that representation.

    Returns
    -------
    numpy.ndarray
        ``(N, n_local, n_global)``.
    """
    from .moments import local_background_columns

    x = np.atleast_1d(np.asarray(x, dtype=np.float64))
    y = np.atleast_1d(np.asarray(y, dtype=np.float64))
    size = 2 * stamp_half + 1
    local = local_background_columns(size, local_order)  # (n_local, P)
    proj = np.linalg.pinv(local.T)  # (n_local, P)
    off = np.arange(size) - stamp_half
    # The global functions are separable: evaluate them along each stamp's rows and
    # columns (N x size points) instead of at its every pixel (N x size^2).
    fx, fy = functions.factors((x[:, None] + off).ravel(), (y[:, None] + off).ravel())
    n, n_global = len(x), functions.size
    fx = fx.reshape(n_global, n, size)
    fy = fy.reshape(n_global, n, size)
    n_local = proj.shape[0]
    # Sum over x as one matrix product, (n_local size_y, size_x) @ (size_x, n_global N),
    # then over y against fy.
    over_x = proj.reshape(n_local * size, size) @ fx.reshape(n_global * n, size).T
    over_x = over_x.reshape(n_local, size, n_global, n)
    return np.einsum("mylc,lcy->cml", over_x, fy)


def _local_order(n_local: int) -> int:
    """Degree of a local polynomial with ``n_local`` terms."""
    order = 0
    while n_terms(order) < n_local:
        order += 1
    if n_terms(order) != n_local:
        raise ValueError(f"{n_local} is not the number of terms of a 2-D polynomial")
    return order


def fit_spatial(
    stats: CandidateStats,
    x: np.ndarray,
    y: np.ndarray,
    basis: KernelBasis,
    kernel_functions: SpatialFunctions,
    background_functions: SpatialFunctions | None,
    condition_type: str = "EIGENVALUE",
    with_covariance: bool = False,
) -> SpatialSolution:
    """Fit the spatial model to the candidates' normal equations.

    Parameters
    ----------
    stats : CandidateStats
        Statistics of the candidates, in ``basis``.
    x, y : numpy.ndarray
        Candidate positions in pixels.
    basis : KernelBasis
        When ``basis.conserves_sum``, coefficient 0 (the kernel sum) is held
        constant over the image.
    kernel_functions, background_functions : SpatialFunctions
        Spatial functions; the background ones are required when the statistics
        include a background term and forbidden otherwise.
    condition_type : {"EIGENVALUE", "SVD"}
        How to compute the reported condition number.
    with_covariance : bool
        Also give the covariance of the free parameters
        (:attr:`SpatialSolution.covariance`): ``A⁻¹ (Σ_c P_cᵀ V_c P_c) A⁻¹`` with ``A``
        the spatial normal matrix and ``V_c = stats.m_var`` the covariance of candidate
        ``c``'s right-hand side, which is ``A⁻¹`` itself when the fit weights are the
        inverse variances; ``A⁻¹`` when ``stats.m_var`` was not kept.

    Raises
    ------
    SpatialFitError
        If the system is singular (e.g. too few candidates for the terms).
    """
    if stats.has_background != (background_functions is not None):
        raise ValueError("background functions must be given exactly when a background is fitted")
    n = stats.n_params
    if stats.n_kernel != basis.size:
        raise ValueError(
            f"statistics have {stats.n_kernel} kernel terms but the basis has {basis.size}"
        )
    nbg = stats.n_background
    n_kernel = n - nbg
    f = kernel_functions.evaluate(x, y)  # (N, LK)
    lk = f.shape[1]
    act = free_kernel_terms(basis, kernel_functions).ravel()
    jac = None
    if background_functions is not None:
        jac = background_local_map(background_functions, x, y, stats.stamp_half, _local_order(nbg))
    a_mat = _spatial_normal_matrix(stats.m_fit, f, jac, act, n_kernel)
    rhs = np.einsum("ci,ck->ik", stats.b_fit[:, :n_kernel], f).ravel()[act]
    if jac is not None:
        rhs = np.concatenate([rhs, np.einsum("cma,cm->a", jac, stats.b_fit[:, n_kernel:])])
    cond = float(condition_numbers(a_mat, condition_type))
    if not np.isfinite(cond):
        raise SpatialFitError(
            f"the spatial kernel fit is singular: {len(x)} candidate(s) cannot constrain "
            f"{a_mat.shape[0]} parameters (spatialKernelOrder={kernel_functions.order}); "
            "lower the spatial orders or provide more stars"
        )
    theta = solve_spd(a_mat, rhs)
    n_act = int(act.sum())
    kernel_coeffs = np.zeros(n_kernel * lk)
    kernel_coeffs[act] = theta[:n_act]
    kernel_coeffs = kernel_coeffs.reshape(n_kernel, lk)
    bg_coeffs = theta[n_act:].copy()
    covariance = None
    if with_covariance:
        inverse = _spd_inverse(a_mat)
        covariance = inverse
        if stats.m_var is not None:
            middle = _spatial_normal_matrix(stats.m_var, f, jac, act, n_kernel)
            covariance = inverse @ middle @ inverse
        covariance = 0.5 * (covariance + covariance.T)
    return SpatialSolution(
        basis, kernel_functions, kernel_coeffs, background_functions, bg_coeffs, cond, covariance
    )


def free_kernel_terms(basis: KernelBasis, kernel_functions: SpatialFunctions) -> np.ndarray:
    """Which kernel coefficients the spatial fit frees, ``(n_basis, n_terms)`` booleans.

    All of them, except the spatial terms of the kernel sum (coefficient 0) when the
    basis conserves it. The free parameters of a fit (and the rows of its covariance)
    are the free kernel coefficients in row-major order, then the background's.
    """
    free = np.ones((basis.size, kernel_functions.size), dtype=bool)
    if basis.conserves_sum:
        free[0, 1:] = False
    return free


def _spatial_normal_matrix(
    m: np.ndarray, f: np.ndarray, jac: np.ndarray | None, act: np.ndarray, n_kernel: int
) -> np.ndarray:
    """``Σ_c P_cᵀ m_c P_c`` over the free parameters, ``P_c`` candidate ``c``'s map from
    them to its local coefficients (kernel functions ``f``, background map ``jac``)."""
    mkk = m[:, :n_kernel, :n_kernel]
    g_kk = np.einsum("cij,ck,cl->ikjl", mkk, f, f, optimize=True).reshape(n_kernel * f.shape[1], -1)
    out = g_kk[np.ix_(act, act)]
    if jac is None:
        return out
    mkb = m[:, :n_kernel, n_kernel:]
    mbb = m[:, n_kernel:, n_kernel:]
    g_kb = np.einsum("cim,ck,cml->ikl", mkb, f, jac, optimize=True).reshape(
        n_kernel * f.shape[1], -1
    )[act]
    g_bb = np.einsum("cma,cmn,cnb->ab", jac, mbb, jac, optimize=True)
    return np.block([[out, g_kb], [g_kb.T, g_bb]])


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix, equilibrated first: its kernel
    and background blocks differ by many orders of magnitude."""
    d = np.sqrt(np.abs(np.diagonal(a)))
    d = np.where(d > 0, d, 1.0)
    return np.linalg.pinv(a / np.outer(d, d), hermitian=True) / np.outer(d, d)
