"""Single-kernel solves from sufficient statistics: conditioning, regularization, errors.

All functions work on batches: a stack of normal matrices ``(N, n, n)`` and vectors
``(N, n)``, solved in float64 with LAPACK through numpy's batched routines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .candidate import CandidateStats, concatenate_rows, take_rows

__all__ = [
    "pad_background",
    "condition_numbers",
    "solve_spd",
    "lambda_grid",
    "SingleFit",
    "fit_single_kernels",
]


def _equilibrate(m: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.abs(np.diagonal(m, axis1=-2, axis2=-1)))
    d = np.where(d > 0, d, 1.0)
    return m / (d[..., :, None] * d[..., None, :])


def condition_numbers(m: np.ndarray, kind: str = "EIGENVALUE") -> np.ndarray:
    """Condition numbers of a stack of symmetric matrices.

    The matrices are first equilibrated (``D^-1/2 M D^-1/2`` with ``D`` the
    diagonal), so the number measures genuine near-degeneracy of the basis on the
    data, not the different units of kernel and background columns.

    Parameters
    ----------
    m : numpy.ndarray
        ``(..., n, n)`` symmetric matrices.
    kind : {"EIGENVALUE", "SVD"}
        Ratio of extreme absolute eigenvalues (faster) or singular values.

    Returns
    -------
    numpy.ndarray
        ``(...)``; ``inf`` for numerically singular matrices (smallest value below
        ``n * eps`` of the largest) and, with EIGENVALUE, for indefinite ones.
    """
    eq = _equilibrate(np.asarray(m, dtype=np.float64))
    if kind == "EIGENVALUE":
        signed = np.linalg.eigvalsh(eq)  # ascending
        ev = np.abs(signed)
        # An indefinite matrix is as unusable as a singular one for a least-squares fit.
        indefinite = signed[..., 0] < 0
    elif kind == "SVD":
        ev = np.linalg.svd(eq, compute_uv=False)
        indefinite = np.zeros(ev.shape[:-1], dtype=bool)
    else:
        raise ValueError(f"conditionNumberType must be 'EIGENVALUE' or 'SVD', got {kind!r}")
    lo, hi = ev.min(axis=-1), ev.max(axis=-1)
    # Below n * eps of the largest, a value is rounding noise: numerically singular.
    singular = indefinite | (lo <= eq.shape[-1] * np.finfo(np.float64).eps * hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(singular, np.inf, hi / np.where(singular, 1.0, lo))


def solve_spd(m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Solve a stack of symmetric positive (semi-)definite systems ``m x = b``.

    Systems are equilibrated first; a singular system falls back to the minimum-norm
    least-squares solution instead of failing the whole batch.
    """
    m = np.asarray(m, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = np.sqrt(np.abs(np.diagonal(m, axis1=-2, axis2=-1)))
    d = np.where(d > 0, d, 1.0)
    meq = m / (d[..., :, None] * d[..., None, :])
    beq = b / d
    try:
        x = np.linalg.solve(meq, beq[..., None])[..., 0]
    except np.linalg.LinAlgError:
        x = np.empty_like(beq)
        for i in np.ndindex(meq.shape[:-2]):
            try:
                x[i] = np.linalg.solve(meq[i], beq[i])
            except np.linalg.LinAlgError:
                x[i] = np.linalg.lstsq(meq[i], beq[i], rcond=None)[0]
    return x / d


def lambda_grid(lambda_min: float, lambda_max: float, step: float, step_type: str) -> np.ndarray:
    """Trial regularization strengths: ``10**k`` (log) or ``k`` (linear) on a grid."""
    k = np.arange(lambda_min, lambda_max + 0.5 * step, step)
    if step_type == "log":
        return 10.0**k
    if step_type == "linear":
        if k[0] < 0:
            raise ValueError("a linear lambda grid must start at lambdaMin >= 0")
        return k
    raise ValueError(f"lambdaStepType must be 'log' or 'linear', got {step_type!r}")


@dataclass
class SingleFit:
    """Per-candidate single-kernel solutions.

    Attributes
    ----------
    coeffs : numpy.ndarray
        ``(N, n)`` kernel coefficients, then the local background terms if fitted.
    condition : numpy.ndarray
        ``(N,)`` condition number of the solved matrix.
    lam : numpy.ndarray
        ``(N,)`` regularization strength used (0 without regularization).
    covariance : numpy.ndarray or None
        ``(N, n, n)`` coefficient covariance when uncertainties are asked for.
    """

    coeffs: np.ndarray
    condition: np.ndarray
    lam: np.ndarray
    covariance: np.ndarray | None

    def __len__(self) -> int:
        return self.coeffs.shape[0]

    def take(self, index: np.ndarray | slice) -> SingleFit:
        """The fits of a subset of candidates."""
        return take_rows(self, index)

    @staticmethod
    def concatenate(parts: list[SingleFit]) -> SingleFit:
        """The fits of several batches, in order."""
        return concatenate_rows(parts)


def pad_background(h: np.ndarray, n_background: int) -> np.ndarray:
    """The kernel penalty extended with zeros over the background terms."""
    if not n_background:
        return h
    n = h.shape[0]
    out = np.zeros((n + n_background, n + n_background))
    out[:n, :n] = h
    return out


def _choose_lambda(stats: CandidateStats, h: np.ndarray, cfg) -> np.ndarray:
    """Regularization strength per candidate, as ``cfg.lambdaType`` says."""
    kind = cfg.lambdaType
    n = len(stats)
    if kind == "absolute":
        return np.full(n, float(cfg.lambdaValue))
    tr_h = np.trace(h)
    if kind == "relative":
        return cfg.lambdaScaling * np.trace(stats.m_fit, axis1=1, axis2=2) / tr_h
    grid = lambda_grid(cfg.lambdaMin, cfg.lambdaMax, cfg.lambdaStep, cfg.lambdaStepType)
    m, b = stats.m_fit, stats.b_fit
    risks = np.empty((len(grid), n))
    if kind == "minimizeBiasedRisk":
        # Reference solution: pseudo-inverse truncated at maxConditionNumber.
        ev, evec = np.linalg.eigh(m)
        cut = ev[:, -1:] / cfg.maxConditionNumber
        inv_ev = np.where(ev > cut, 1.0 / np.where(ev > cut, ev, 1.0), 0.0)
        a_ref = np.einsum("nij,nj,nkj,nk->ni", evec, inv_ev, evec, b)
    elif kind != "minimizeUnbiasedRisk":
        raise ValueError(f"unknown lambdaType {kind!r}")
    for g, lam in enumerate(grid):
        s_mat = np.linalg.inv(m + lam * h)
        r_mat = np.matmul(s_mat, m)
        if kind == "minimizeUnbiasedRisk":
            a = np.einsum("nij,nj->ni", s_mat, b)
            # chi2 up to a lambda-independent constant, plus twice the effective dof.
            chi2 = np.einsum("ni,nij,nj->n", a, m, a) - 2 * np.einsum("ni,ni->n", a, b)
            risks[g] = chi2 + 2 * np.trace(r_mat, axis1=1, axis2=2)
        else:
            bias = np.einsum("nij,nj->ni", r_mat, a_ref) - a_ref
            risks[g] = np.einsum("ni,nij,nj->n", bias, m, bias) + np.einsum(
                "nij,nji->n", r_mat, r_mat
            )
    return grid[np.argmin(risks, axis=0)]


def fit_single_kernels(
    stats: CandidateStats,
    cfg,
    regularization: np.ndarray | None = None,
    with_uncertainty: bool = False,
) -> SingleFit:
    """Solve every candidate's normal equations.

    Parameters
    ----------
    stats : CandidateStats
        Sufficient statistics in the basis to fit.
    cfg : PsfMatchConfig
        The active kernel configuration (condition number type, lambda settings).
    regularization : numpy.ndarray, optional
        Kernel-space penalty ``H`` (``n_kernel x n_kernel``); ``None`` for none.
    with_uncertainty : bool
        Compute coefficient covariances (``stats.m_var`` must be present).
    """
    m, b = stats.m_fit, stats.b_fit
    n = len(stats)
    if regularization is not None:
        h = pad_background(regularization, stats.n_background)
        lam = _choose_lambda(stats, h, cfg)
        m = m + lam[:, None, None] * h
    else:
        lam = np.zeros(n)
    coeffs = solve_spd(m, b)
    condition = condition_numbers(m, cfg.conditionNumberType)
    covariance = None
    if with_uncertainty:
        s_mat = np.linalg.pinv(m, hermitian=True)
        covariance = np.matmul(np.matmul(s_mat, stats.m_var), s_mat)
    return SingleFit(coeffs, condition, lam, covariance)
