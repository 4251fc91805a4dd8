"""The kernel solution from candidates' sufficient statistics: ip_diffim's ``_solve``.

Order of work, as the specification describes:

1. single-kernel fit of every candidate; condition-number check
   (``checkConditionNumber``) and residual clipping (``singleKernelClipping``);
2. each round (at most ``maxSpatialIterations``):
   a. take the first ``nStarPerCell`` not-yet-rejected candidates of every cell,
      brightest first (a rejected one is replaced by the next in its cell);
   b. kernel-sum clipping over them (``kernelSumClipping``, ``maxKsumSigma``);
   c. optionally a PCA basis from their kernels, and a BIC choice of its size;
   d. the spatial fit;
   e. assessment: each candidate's residuals under the spatial model
      (``spatialKernelClipping``); stop when none is rejected;
3. a last spatial fit when the final round still rejected candidates.

Everything here is linear algebra on small matrices: no pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import NoCandidatesError, SpatialFitError
from .basis import KernelBasis, derive_basis, regularization_for, renormalize
from .candidate import CandidateStats
from .clipping import kernel_sum_outliers, residual_failures
from .fit import SingleFit, fit_single_kernels, pad_background
from .spatial import SpatialFunctions, SpatialSolution, fit_spatial, n_terms

__all__ = ["CandidateSet", "SolveOutcome", "solve"]

GOOD, BAD, UNUSED = "GOOD", "BAD", "UNUSED"


@dataclass
class CandidateSet:
    """Vetted candidates ready for fitting (all arrays aligned).

    ``single`` holds their single-kernel fits when already made (the cells make
    them, in parallel); :func:`solve` makes them otherwise.
    """

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    cell: np.ndarray
    rating: np.ndarray
    stats: CandidateStats
    single: SingleFit | None = None


@dataclass
class SolveOutcome:
    """What the solve produced, per candidate and overall."""

    solution: SpatialSolution
    status: np.ndarray
    reason: np.ndarray
    kernel_sum: np.ndarray
    kernel_sum_err: np.ndarray
    background: np.ndarray
    background_err: np.ndarray
    single_mean: np.ndarray
    single_std: np.ndarray
    condition: np.ndarray
    spatial_mean: np.ndarray
    spatial_std: np.ndarray
    rejected_in_round: np.ndarray
    metadata: dict = field(default_factory=dict)


def _visit(status: np.ndarray, cell: np.ndarray, order: np.ndarray, per_cell: int) -> np.ndarray:
    """Indices of the first ``per_cell`` non-BAD candidates of each cell, in ``order``."""
    chosen = []
    counts: dict[int, int] = {}
    for i in order:
        if status[i] == BAD:
            continue
        c = int(cell[i])
        if per_cell < 0 or counts.get(c, 0) < per_cell:
            counts[c] = counts.get(c, 0) + 1
            chosen.append(i)
    return np.array(sorted(chosen), dtype=np.intp)


def _ksums(fit: SingleFit, basis: KernelBasis) -> tuple[np.ndarray, np.ndarray]:
    nk = basis.size
    sums = basis.sums
    ksum = fit.coeffs[:, :nk] @ sums
    if fit.covariance is None:
        err = np.full(len(ksum), np.nan)
    else:
        cov = fit.covariance[:, :nk, :nk]
        err = np.sqrt(np.maximum(np.einsum("i,nij,j->n", sums, cov, sums), 0.0))
    return ksum, err


def _pca_basis(
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


def _bic_truncation(stats: CandidateStats, basis: KernelBasis, cfg) -> int:
    """Number of leading basis kernels minimizing the summed BIC of the candidates."""
    sizes = np.cumsum(basis.groups)
    n_bg = stats.n_background
    best, best_bic = basis.size, np.inf
    for m in sizes:
        sub = stats.transformed(np.eye(basis.size)[:, :m])
        fit = fit_single_kernels(sub, cfg)
        _, _, chi2 = sub.residual_moments(fit.coeffs)
        bic = float(np.sum(chi2 + (m + n_bg) * np.log(sub.npix)))
        if bic < best_bic - 1e-9 * abs(best_bic):
            best, best_bic = int(m), bic
    return best


def solve(
    cands: CandidateSet,
    basis: KernelBasis,
    cfg,
    image_shape: tuple[int, int],
) -> SolveOutcome:
    """Fit single kernels, clip, and fit the spatial model with rejection rounds.

    Parameters
    ----------
    cands : CandidateSet
        Vetted candidates with statistics in ``basis``.
    basis : KernelBasis
        The kernel basis (Alard-Lupton or delta-function).
    cfg : PsfMatchConfig
        Active kernel configuration.
    image_shape : tuple of int
        ``(ny, nx)`` of the image, for the spatial functions' domain.

    Raises
    ------
    NoCandidatesError
        When every candidate is rejected.
    """
    stats = cands.stats
    n = len(stats)
    has_bg = stats.has_background
    meta: dict = {"notes": []}
    if n == 0:
        raise NoCandidatesError("no kernel candidates to fit")
    status = np.full(n, UNUSED, dtype=object)
    reason = np.full(n, "", dtype=object)
    rejected_round = np.full(n, -1)
    reg = regularization_for(basis, cfg)
    want_err = bool(cfg.calculateKernelUncertainty)
    single = cands.single
    if single is None:
        single = fit_single_kernels(stats, cfg, reg, with_uncertainty=want_err)
    elif len(single) != n or (want_err and single.covariance is None):
        raise ValueError(
            f"single fits of {len(single)} candidates (covariances: "
            f"{single.covariance is not None}) given for {n} candidates"
        )
    ksum, ksum_err = _ksums(single, basis)
    # The first local background term is the constant: the background at the centre.
    nk = stats.n_kernel
    bg = single.coeffs[:, nk] if has_bg else np.zeros(n)
    bg_err = (
        np.sqrt(np.maximum(single.covariance[:, nk, nk], 0.0))
        if want_err and has_bg
        else np.full(n, np.nan)
    )
    s_mean, s_std, _ = stats.residual_moments(single.coeffs)
    meta["lambda"] = single.lam.tolist() if reg is not None else None

    def reject(idx: np.ndarray, why: str, rnd: int) -> None:
        idx = np.asarray(idx, dtype=np.intp)
        idx = idx[status[idx] != BAD]
        status[idx] = BAD
        reason[idx] = why
        rejected_round[idx] = rnd

    bad_fit = ~np.isfinite(ksum) | ~np.isfinite(single.coeffs).all(axis=1)
    reject(np.flatnonzero(bad_fit), "singular fit", 0)
    if cfg.checkConditionNumber:
        reject(np.flatnonzero(single.condition > cfg.maxConditionNumber), "condition number", 0)
    if cfg.singleKernelClipping:
        fails = residual_failures(
            s_mean, s_std, cfg.candidateResidualMeanMax, cfg.candidateResidualStdMax
        )
        reject(np.flatnonzero(fails), "single-kernel residuals", 0)
    counts = {"single": int((status == BAD).sum()), "kernel_sum": 0, "spatial": 0}

    order = np.lexsort((cands.ids, -cands.rating))
    bbox = (0.0, 0.0, float(image_shape[1] - 1), float(image_shape[0] - 1))
    sp_mean = np.full(n, np.nan)
    sp_std = np.full(n, np.nan)
    solution: SpatialSolution | None = None
    fit_basis, fit_stats = basis, stats
    n_rounds = 0
    last_rejected = 0

    local_order = int(cfg.spatialBgOrder)
    sums = basis.sums

    def ksum_precision(idx: np.ndarray) -> np.ndarray:
        """Inverse variance of each candidate's kernel sum, from its fit matrix."""
        m = stats.m_fit[idx]
        if reg is not None:
            m = m + single.lam[idx, None, None] * pad_background(reg, stats.n_background)
        cov = np.linalg.pinv(m, hermitian=True)[:, : basis.size, : basis.size]
        var = np.einsum("i,nij,j->n", sums, cov, sums)
        return 1.0 / np.maximum(var, np.finfo(float).tiny)

    def _local(sol: SpatialSolution, visited: np.ndarray) -> np.ndarray:
        return sol.local_coefficients(
            cands.x[visited], cands.y[visited], stats.stamp_half, local_order
        )

    def spatial_fit(visited: np.ndarray) -> tuple[SpatialSolution, KernelBasis, CandidateStats]:
        b_use, st_use = basis, stats
        if cfg.usePcaForSpatialKernel:
            b_use, t = _pca_basis(
                basis,
                single.coeffs[visited, : basis.size],
                ksum[visited],
                ksum_precision(visited),
                cfg,
            )
            st_use = stats.transformed(t)
        if cfg.useBicForKernelBasis:
            m = _bic_truncation(st_use.take(visited), b_use, cfg)
            meta["bic_basis_size"] = m
            if m < b_use.size:
                st_use = st_use.transformed(np.eye(b_use.size)[:, :m])
                b_use = b_use.truncated(m)
        k_order = int(cfg.spatialKernelOrder)
        while k_order > 0 and n_terms(k_order) > len(visited):
            k_order -= 1
        bg_order = int(cfg.spatialBgOrder)
        while has_bg and bg_order > 0 and n_terms(bg_order) > len(visited):
            bg_order -= 1
        if k_order != cfg.spatialKernelOrder or (has_bg and bg_order != cfg.spatialBgOrder):
            note = (
                f"only {len(visited)} good candidate(s): spatial orders lowered to "
                f"kernel {k_order}, background {bg_order if has_bg else '-'} "
                f"(asked {cfg.spatialKernelOrder}, {cfg.spatialBgOrder})"
            )
            if note not in meta["notes"]:
                meta["notes"].append(note)
        meta["spatial_kernel_order_used"] = k_order
        meta["spatial_bg_order_used"] = bg_order if has_bg else None
        kf = SpatialFunctions(cfg.spatialModelType, k_order, bbox)
        bf = SpatialFunctions(cfg.spatialModelType, bg_order, bbox) if has_bg else None
        sol = fit_spatial(
            st_use.take(visited),
            cands.x[visited],
            cands.y[visited],
            b_use,
            kf,
            bf,
            cfg.conditionNumberType,
        )
        if cfg.checkConditionNumber and sol.condition > cfg.maxSpatialConditionNumber:
            raise SpatialFitError(
                f"spatial kernel matrix condition number {sol.condition:.3g} exceeds "
                f"maxSpatialConditionNumber={cfg.maxSpatialConditionNumber:.3g}; lower "
                "spatialKernelOrder/spatialBgOrder or add candidates"
            )
        return sol, b_use, st_use

    for rnd in range(1, int(cfg.maxSpatialIterations) + 1):
        n_rounds = rnd
        visited = _visit(status, cands.cell, order, int(cfg.nStarPerCell))
        if cfg.kernelSumClipping and len(visited) > 2:
            out, k_mean, k_std = kernel_sum_outliers(ksum[visited], cfg.maxKsumSigma)
            meta.setdefault("kernel_sum_stats", []).append(
                {"round": rnd, "mean": k_mean, "std": k_std}
            )
            if out.any():
                counts["kernel_sum"] += int(out.sum())
                reject(visited[out], "kernel sum outlier", rnd)
                visited = _visit(status, cands.cell, order, int(cfg.nStarPerCell))
        if len(visited) == 0:
            break
        solution, fit_basis, fit_stats = spatial_fit(visited)
        local = _local(solution, visited)
        m_sp, sd_sp, _ = fit_stats.take(visited).residual_moments(local)
        sp_mean[visited], sp_std[visited] = m_sp, sd_sp
        last_rejected = 0
        if cfg.spatialKernelClipping:
            fails = residual_failures(
                m_sp, sd_sp, cfg.candidateResidualMeanMax, cfg.candidateResidualStdMax
            )
            last_rejected = int(fails.sum())
            counts["spatial"] += last_rejected
            reject(visited[fails], "spatial residuals", rnd)
        if last_rejected == 0:
            break
    visited = _visit(status, cands.cell, order, int(cfg.nStarPerCell))
    if len(visited) == 0:
        by_reason = {r: int((reason == r).sum()) for r in sorted(set(reason[status == BAD]))}
        raise NoCandidatesError(
            f"all {n} kernel candidates were rejected ({by_reason}); check the inputs, or "
            "relax candidateResidualMeanMax/StdMax or maxKsumSigma"
        )
    if solution is None or last_rejected > 0:
        if solution is not None:
            meta["notes"].append(
                f"candidates were still rejected in round {n_rounds}; final spatial fit "
                "made without a further assessment"
            )
        solution, fit_basis, fit_stats = spatial_fit(visited)
        local = _local(solution, visited)
        sp_mean[visited], sp_std[visited], _ = fit_stats.take(visited).residual_moments(local)
    status[visited] = GOOD
    solution.notes.extend(meta["notes"])
    meta.update(
        {
            "rounds": n_rounds,
            "rejected": counts,
            "n_candidates": n,
            "n_good": int((status == GOOD).sum()),
            "spatial_condition": solution.condition,
            "basis_kind": fit_basis.kind,
            "basis_size": fit_basis.size,
        }
    )
    return SolveOutcome(
        solution,
        status,
        reason,
        ksum,
        ksum_err,
        bg,
        bg_err,
        s_mean,
        s_std,
        single.condition,
        sp_mean,
        sp_std,
        rejected_round,
        meta,
    )
