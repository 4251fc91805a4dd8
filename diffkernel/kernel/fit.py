"""Single-kernel solves from sufficient statistics: conditioning, regularization, errors.

All functions work on batches: a stack of normal matrices ``(N, n, n)`` and vectors
``(N, n)``, solved in float64 with LAPACK through numpy's batched routines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import linalg

from .moments import CandidateStats, concatenate_rows, take_rows

__all__ = [
    "pad_background",
    "condition_numbers",
    "solve_spd",
    "lambda_grid",
    "risk_scan",
    "cholesky_where_definite",
    "inverse_quadratic_forms",
    "SingleFit",
    "fit_single_kernels",
]


def _equilibrate(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``D^-1/2 m D^-1/2`` and ``D^1/2`` (``D`` the diagonal; zeros count as one)."""
    d = np.sqrt(np.abs(np.diagonal(m, axis1=-2, axis2=-1)))
    d = np.where(d > 0, d, 1.0)
    return m / (d[..., :, None] * d[..., None, :]), d


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
    return _equilibrated_condition(_equilibrate(np.asarray(m, dtype=np.float64))[0], kind)


def _equilibrated_condition(eq: np.ndarray, kind: str) -> np.ndarray:
    """:func:`condition_numbers` of matrices already equilibrated."""
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
    meq, d = _equilibrate(np.asarray(m, dtype=np.float64))
    return _equilibrated_solve(meq, np.asarray(b, dtype=np.float64) / d) / d


def _equilibrated_solve(meq: np.ndarray, beq: np.ndarray) -> np.ndarray:
    """:func:`solve_spd` of systems already equilibrated."""
    try:
        x = np.linalg.solve(meq, beq[..., None])[..., 0]
    except np.linalg.LinAlgError:
        x = np.empty_like(beq)
        for i in np.ndindex(meq.shape[:-2]):
            try:
                x[i] = np.linalg.solve(meq[i], beq[i])
            except np.linalg.LinAlgError:
                x[i] = np.linalg.lstsq(meq[i], beq[i], rcond=None)[0]
    return x


def _cholesky_solve(meq: np.ndarray, beq: np.ndarray) -> np.ndarray:
    """:func:`_equilibrated_solve` by Cholesky factors where the matrices are definite.

    The others (singular or indefinite, rare) take the general solve's path.
    """
    factors, definite = cholesky_where_definite(meq)
    x = np.empty_like(beq)
    for i in np.flatnonzero(definite):
        y = linalg.solve_triangular(factors[i], beq[i], lower=True, check_finite=False)
        x[i] = linalg.solve_triangular(factors[i], y, lower=True, trans="T", check_finite=False)
    if not definite.all():
        x[~definite] = _equilibrated_solve(meq[~definite], beq[~definite])
    return x


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
        ``(N,)`` condition number of the solved matrix; NaN where it was not computed:
        for bases of more than ``CONDITION_ALWAYS`` terms (delta functions) unless
        ``checkConditionNumber`` uses it, since their eigendecompositions cost more
        than the fits.
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


def cholesky_where_definite(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cholesky factors of a stack of symmetric matrices, and which ones have one.

    Parameters
    ----------
    m : numpy.ndarray
        ``(N, n, n)`` symmetric matrices.

    Returns
    -------
    factors : numpy.ndarray
        ``(N, n, n)`` lower-triangular ``L`` with ``L Lᵀ = m``; the identity where
        ``m`` is not numerically positive definite.
    definite : numpy.ndarray
        ``(N,)`` bool, True where the factor exists.
    """
    m = np.asarray(m, dtype=np.float64)
    try:
        return np.linalg.cholesky(m), np.ones(m.shape[0], dtype=bool)
    except np.linalg.LinAlgError:
        pass
    # One member failed the whole batch; factor them one by one to find which.
    factors = np.broadcast_to(np.eye(m.shape[-1]), m.shape).copy()
    definite = np.zeros(m.shape[0], dtype=bool)
    for i in range(m.shape[0]):
        try:
            factors[i] = np.linalg.cholesky(m[i])
            definite[i] = True
        except np.linalg.LinAlgError:
            pass
    return factors, definite


def inverse_quadratic_forms(
    m: np.ndarray,
    v: np.ndarray,
    rows: np.ndarray | None = None,
    lam: np.ndarray | None = None,
    h: np.ndarray | None = None,
) -> np.ndarray:
    """``vᵀ (m[i] + lam[i] h)⁺ v`` for the rows ``i`` of a stack of PSD matrices.

    A Cholesky factor ``L Lᵀ`` of the matrix gives ``vᵀ L⁻ᵀ L⁻¹ v = |L⁻¹ v|²`` for a
    fraction of the cost of the pseudo-inverse (an eigendecomposition and two
    products); the pseudo-inverse is kept for matrices that are not numerically
    definite. Each matrix is formed and factored in one reused buffer: for the
    delta-function basis, batched copies of the stack (over a megabyte per
    candidate) would cost more than the factorizations.

    Parameters
    ----------
    m : numpy.ndarray
        ``(N, n, n)`` symmetric positive semi-definite matrices.
    v : numpy.ndarray
        ``(n,)`` vector, the same for every matrix.
    rows : numpy.ndarray, optional
        Indices of the matrices to use; all by default.
    lam, h : numpy.ndarray, optional
        ``(N,)`` weights and the ``(n, n)`` matrix added to each, ``lam[i] * h``.

    Returns
    -------
    numpy.ndarray
        ``(len(rows),)`` quadratic forms.
    """
    m = np.asarray(m, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    if rows is None:
        rows = np.arange(m.shape[0])
    rows = np.asarray(rows)
    rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.intp)
    pattern = None if h is None else np.nonzero(h)
    # Fortran order: LAPACK factors it in place, without a copy.
    work = np.empty(m.shape[1:], order="F")
    out = np.empty(rows.size)
    for k, i in enumerate(rows):
        work[...] = m[i]
        if pattern is not None:
            work[pattern] += lam[i] * h[pattern]
        try:
            factor, _ = linalg.cho_factor(work, lower=True, overwrite_a=True, check_finite=False)
            y = linalg.solve_triangular(factor, v, lower=True, check_finite=False)
            out[k] = y @ y
        except np.linalg.LinAlgError:
            work[...] = m[i]
            if pattern is not None:
                work[pattern] += lam[i] * h[pattern]
            out[k] = v @ np.linalg.pinv(work, hermitian=True) @ v
    return out


#: Single-kernel condition numbers are computed for bases up to this many terms (and
#: for any with ``checkConditionNumber``): an eigendecomposition of a delta-function
#: matrix (441 terms for a 21 x 21 kernel) took 2.5 times as long as its fit.
CONDITION_ALWAYS = 128


# --- the risk scan of the regularization strength ----------------------------------------

#: The lambdaTypes that scan a grid of strengths for the least estimated risk.
RISKS = ("minimizeBiasedRisk", "minimizeUnbiasedRisk")

# Risks of this many (lambda, candidate, coefficient) triples are formed at once.
_SCAN_CHUNK = 1 << 22
# Candidates are scanned in blocks whose (n, n) stacks hold about this many bytes: the
# working set stays bounded and in memory the allocator reuses, for any number of them.
_BLOCK_BYTES = 1 << 24


def risk_scan(
    m: np.ndarray,
    b: np.ndarray,
    h: np.ndarray,
    grid: np.ndarray,
    kind: str,
    max_condition: float,
) -> np.ndarray:
    """The estimated risk of every trial strength ``lambda`` for every candidate.

    For the regularized solution ``a(λ) = (M + λH)⁻¹ b`` with influence matrix
    ``R(λ) = (M + λH)⁻¹ M``:

    - unbiased risk: ``aᵀ M a - 2 aᵀ b + 2 tr R`` (chi² up to a constant that does not
      depend on λ, plus twice the effective number of parameters);
    - biased risk: ``|R a_ref - a_ref|²_M + tr(R²)``, with ``a_ref`` the solution of
      ``M`` alone through its pseudo-inverse truncated at ``max_condition``.

    One generalized eigendecomposition per candidate serves every λ: with
    ``B = M + λ₀ H = L Lᵀ`` (λ₀ the smallest positive trial value, so ``B`` is
    definite even where the data leave ``M`` singular) and ``L⁻¹ H L⁻ᵀ = Q Λ Qᵀ``,
    the columns of ``V = L⁻ᵀ Q`` diagonalize both: ``Vᵀ H V = Λ`` and
    ``Vᵀ M V = diag(μ)``, ``μ = 1 - λ₀ Λ``. Then ``(M + λH)⁻¹ = V D Vᵀ`` with
    ``D = diag(1 / (1 + (λ - λ₀) Λ))``, and in the coordinates ``β = Vᵀ b`` and
    ``γ = Vᵀ B a_ref``::

        aᵀ M a = Σ μ d² β²    aᵀ b = Σ d β²    tr R = Σ d μ
        |R a_ref - a_ref|²_M = Σ μ (d μ - 1)² γ²    tr(R²) = Σ (d μ)²

    so a trial λ costs ``O(n)`` per candidate instead of an ``O(n³)`` inverse.
    Candidates whose ``B`` is not numerically definite are scanned by inverting
    ``M + λH`` at every λ. Candidates go through in blocks of a few megabytes.

    Parameters
    ----------
    m : numpy.ndarray
        ``(N, n, n)`` normal matrices.
    b : numpy.ndarray
        ``(N, n)`` normal vectors.
    h : numpy.ndarray
        ``(n, n)`` penalty (zero over unregularized terms such as a background).
    grid : numpy.ndarray
        ``(G,)`` trial strengths, >= 0.
    kind : {"minimizeBiasedRisk", "minimizeUnbiasedRisk"}
        The risk estimate.
    max_condition : float
        Truncation of ``a_ref`` (biased risk only).

    Returns
    -------
    numpy.ndarray
        ``(G, N)`` risks.
    """
    if kind not in RISKS:
        raise ValueError(f"unknown lambdaType {kind!r}")
    m = np.asarray(m, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    grid = np.asarray(grid, dtype=np.float64)
    biased = kind == "minimizeBiasedRisk"
    positive = grid[grid > 0]
    lam0 = float(positive.min()) if positive.size else 0.0
    risks = np.empty((grid.size, m.shape[0]))
    step = max(1, _BLOCK_BYTES // (8 * m.shape[-1] ** 2))
    for start in range(0, m.shape[0], step):
        block = slice(start, start + step)
        mb, bb = m[block], b[block]
        a_ref = _reference_solution(mb, bb, max_condition) if biased else None
        factors, definite = cholesky_where_definite(mb + lam0 * h)
        out = risks[:, block]
        ok = slice(None) if definite.all() else definite
        if definite.any():
            target = a_ref[ok] if biased else bb[ok]
            out[:, ok] = _spectral_risks(factors[ok], h, lam0, grid, target, biased)
        if not definite.all():
            bad = ~definite
            ref = None if a_ref is None else a_ref[bad]
            out[:, bad] = _direct_risks(mb[bad], bb[bad], h, grid, ref)
    return risks


def _reference_solution(m: np.ndarray, b: np.ndarray, max_condition: float) -> np.ndarray:
    """``M⁺ b`` with the pseudo-inverse truncated at ``max_condition`` (the biased risk's)."""
    ev, evec = np.linalg.eigh(m)
    cut = ev[:, -1:] / max_condition
    inv_ev = np.where(ev > cut, 1.0 / np.where(ev > cut, ev, 1.0), 0.0)
    # Two matrix-vector products (a four-operand einsum loops over n³ terms).
    coord = np.matmul(np.swapaxes(evec, 1, 2), b[:, :, None])[:, :, 0]
    return np.matmul(evec, (inv_ev * coord)[:, :, None])[:, :, 0]


def _spectral_risks(
    factors: np.ndarray,
    h: np.ndarray,
    lam0: float,
    grid: np.ndarray,
    target: np.ndarray,
    biased: bool,
) -> np.ndarray:
    """Risks from the generalized eigendecomposition (see :func:`risk_scan`).

    ``target`` is ``b`` for the unbiased risk and ``a_ref`` for the biased one.
    """
    l_inv = _triangular_inverses(factors)
    spec, q = np.linalg.eigh(l_inv @ h @ np.swapaxes(l_inv, 1, 2))
    # H and M are positive semi-definite, so 0 <= Λ <= 1/λ₀ exactly; rounding can
    # step past either bound, and past the upper one μ would turn negative.
    spec = np.clip(spec, 0.0, 1.0 / lam0 if lam0 > 0 else np.inf)
    mu = 1.0 - lam0 * spec
    # β = Vᵀ b = Qᵀ L⁻¹ b (unbiased), γ = Vᵀ B a_ref = Qᵀ Lᵀ a_ref (biased).
    left = np.swapaxes(factors, 1, 2) if biased else l_inv
    inner = np.matmul(left, target[:, :, None])
    w = np.matmul(np.swapaxes(q, 1, 2), inner)[:, :, 0] ** 2
    n_cand, n = spec.shape
    out = np.empty((grid.size, n_cand))
    step = max(1, _SCAN_CHUNK // max(n_cand * n, 1))
    for start in range(0, grid.size, step):
        lam = grid[start : start + step]
        d = 1.0 / (1.0 + (lam - lam0)[:, None, None] * spec)
        dm = d * mu
        if biased:
            out[start : start + step] = np.sum(mu * (dm - 1.0) ** 2 * w + dm**2, axis=-1)
        else:
            out[start : start + step] = np.sum((dm * d - 2.0 * d) * w + 2.0 * dm, axis=-1)
    return out


def _triangular_inverses(factors: np.ndarray) -> np.ndarray:
    """Inverses of a stack of lower-triangular matrices.

    LAPACK's triangular inverse, one matrix at a time: a fifth of the work of the
    general (LU) inverse that numpy's batched ``inv`` would do.
    """
    out = np.empty_like(factors)
    for i, factor in enumerate(factors):
        inverse, info = linalg.lapack.dtrtri(factor, lower=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"singular triangular factor (dtrtri info {info})")
        out[i] = inverse
    return out


def _direct_risks(
    m: np.ndarray, b: np.ndarray, h: np.ndarray, grid: np.ndarray, a_ref: np.ndarray | None
) -> np.ndarray:
    """Risks from the inverse of ``M + λH`` at every λ (``a_ref`` None: unbiased)."""
    risks = np.empty((grid.size, m.shape[0]))
    for g, lam in enumerate(grid):
        s_mat = np.linalg.inv(m + lam * h)
        r_mat = np.matmul(s_mat, m)
        if a_ref is None:
            a = np.einsum("nij,nj->ni", s_mat, b)
            chi2 = np.einsum("ni,nij,nj->n", a, m, a) - 2 * np.einsum("ni,ni->n", a, b)
            risks[g] = chi2 + 2 * np.trace(r_mat, axis1=1, axis2=2)
        else:
            bias = np.einsum("nij,nj->ni", r_mat, a_ref) - a_ref
            risks[g] = np.einsum("ni,nij,nj->n", bias, m, bias) + np.einsum(
                "nij,nji->n", r_mat, r_mat
            )
    return risks


def _choose_lambda(stats: CandidateStats, h: np.ndarray, cfg) -> np.ndarray:
    """Regularization strength per candidate, as ``cfg.lambdaType`` says."""
    n = len(stats)
    kind = getattr(cfg, "lambdaType", None)
    if kind is None:
        # Alard-Lupton: the penalty comes with its strength (alardRegularization).
        return np.ones(n)
    if kind == "absolute":
        return np.full(n, float(cfg.lambdaValue))
    if kind == "relative":
        # Numerical Recipes 18.5.8: tr(M) / tr(H) balances the two terms; lambdaScaling
        # (not lambdaValue, the absolute strength) is the fraction of it used.
        return cfg.lambdaScaling * np.trace(stats.m_fit, axis1=1, axis2=2) / np.trace(h)
    if kind not in RISKS:
        raise ValueError(f"unknown lambdaType {kind!r}")
    grid = lambda_grid(cfg.lambdaMin, cfg.lambdaMax, cfg.lambdaStep, cfg.lambdaStepType)
    risks = risk_scan(stats.m_fit, stats.b_fit, h, grid, kind, cfg.maxConditionNumber)
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
        # (One new stack, not two: a delta-function stack is a megabyte per candidate.)
        penalty = lam[:, None, None] * h
        penalty += m
        m = penalty
    else:
        lam = np.zeros(n)
    # The solve and the condition number share one equilibrated copy.
    meq, d = _equilibrate(np.asarray(m, dtype=np.float64))
    beq = np.asarray(b, dtype=np.float64) / d
    if m.shape[-1] > CONDITION_ALWAYS:
        # Delta functions: Cholesky takes half the arithmetic of the LU of a general
        # solve, which cost as much as building the normal matrices.
        coeffs = _cholesky_solve(meq, beq) / d
    else:
        coeffs = _equilibrated_solve(meq, beq) / d
    if cfg.checkConditionNumber or m.shape[-1] <= CONDITION_ALWAYS:
        condition = _equilibrated_condition(meq, cfg.conditionNumberType)
    else:
        condition = np.full(n, np.nan)
    covariance = None
    if with_uncertainty:
        s_mat = np.linalg.pinv(m, hermitian=True)
        covariance = np.matmul(np.matmul(s_mat, stats.m_var), s_mat)
    return SingleFit(coeffs, condition, lam, covariance)
