"""The kernel solution from candidates' sufficient statistics: ip_diffim's ``_solve``.

:func:`solve` runs the specification's steps in order, each a function here:

1. single-kernel fit of every candidate (:func:`single_kernel_fits`), and its
   clipping (:func:`clip_single_kernels`): singular fits, the condition number
   (``checkConditionNumber``), the residuals (``singleKernelClipping``);
2. rejection rounds (:func:`rejection_rounds`, at most ``maxSpatialIterations``):
   a. take the first ``nStarPerCell`` not-yet-rejected candidates of every cell,
      brightest first (:func:`select_per_cell`: a rejected one is replaced by the
      next in its cell);
   b. kernel-sum clipping over them (:func:`clip_kernel_sums`, ``kernelSumClipping``,
      ``maxKsumSigma``), repeated with the promoted candidates until none of those in
      use is an outlier (:func:`select_clipped`);
   c. optionally a PCA basis from their kernels, and a BIC choice of its size;
   d. the spatial fit, its orders lowered for few candidates (:func:`spatial_fit`;
      c and d are :mod:`~diffkernel.kernel.spatial_model`);
   e. assessment: each candidate's residuals under the spatial model
      (:func:`assess_spatial_model`, ``spatialKernelClipping``); stop when none is
      rejected;
3. a last spatial fit when the final round still rejected candidates
   (:func:`final_fit`, after the kernel-sum clipping of the candidates it promotes),
   and the outcome (:func:`solve_outcome`).

A :class:`SolveState` carries the per-candidate bookkeeping (status, reason, round
of rejection, spatial residuals) and the metadata from step to step.

Everything here is linear algebra on small matrices: no pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import NoCandidatesError
from .basis import KernelBasis, regularization_for
from .clipping import kernel_sum_outliers, residual_failures
from .fit import SingleFit, fit_single_kernels
from .moments import CandidateStats
from .spatial import SpatialSolution
from .spatial_model import SpatialModel, fit_spatial_model, spatial_residuals

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


@dataclass
class SolveState:
    """Per-candidate bookkeeping carried from step to step.

    Attributes
    ----------
    status : numpy.ndarray
        ``GOOD``, ``BAD`` or ``UNUSED`` per candidate.
    reason : numpy.ndarray
        Why a candidate was rejected (the first reason only; "" when not).
    rejected_round : numpy.ndarray
        The round it was rejected in: 0 for the single-kernel clipping, -1 when not.
    spatial_mean, spatial_std : numpy.ndarray
        Residual moments under the latest spatial model that saw the candidate, in
        units of the difference's sigma under the model's kernel.
    counts : dict
        Rejections per stage: ``single``, ``kernel_sum``, ``spatial``.
    metadata : dict
        The solve's metadata, ``notes`` first; steps add their keys as they run, so
        the keys keep the order the steps ran in.
    rounds : int
        Rejection rounds run so far.
    last_rejected : int
        Candidates the latest assessment rejected.
    """

    status: np.ndarray
    reason: np.ndarray
    rejected_round: np.ndarray
    spatial_mean: np.ndarray
    spatial_std: np.ndarray
    counts: dict[str, int]
    metadata: dict
    rounds: int = 0
    last_rejected: int = 0

    @classmethod
    def start(cls, n: int) -> SolveState:
        """The state of ``n`` candidates before any step: all unused, none rejected."""
        return cls(
            status=np.full(n, UNUSED, dtype=object),
            reason=np.full(n, "", dtype=object),
            rejected_round=np.full(n, -1),
            spatial_mean=np.full(n, np.nan),
            spatial_std=np.full(n, np.nan),
            counts={"single": 0, "kernel_sum": 0, "spatial": 0},
            metadata={"notes": []},
        )

    @property
    def notes(self) -> list[str]:
        """Notes for the user (``metadata["notes"]``)."""
        return self.metadata["notes"]

    def reject(self, idx: np.ndarray, why: str, rnd: int) -> None:
        """Mark candidates BAD for ``why`` in round ``rnd``; those already BAD keep theirs."""
        idx = np.asarray(idx, dtype=np.intp)
        idx = idx[self.status[idx] != BAD]
        self.status[idx] = BAD
        self.reason[idx] = why
        self.rejected_round[idx] = rnd

    def record_spatial_fit(self, model: SpatialModel) -> None:
        """Note the choices a spatial fit made; a repeated note is kept once."""
        if model.bic_size is not None:
            self.metadata["bic_basis_size"] = model.bic_size
        if model.lowered_note is not None and model.lowered_note not in self.notes:
            self.notes.append(model.lowered_note)
        self.metadata["spatial_kernel_order_used"] = model.kernel_order
        self.metadata["spatial_bg_order_used"] = model.background_order


@dataclass
class SingleKernels:
    """The single-kernel fits and what the later steps read from them (per candidate).

    Attributes
    ----------
    fit : SingleFit
        The fits.
    regularization : numpy.ndarray or None
        The regularization matrix they were made with.
    kernel_sum, kernel_sum_err : numpy.ndarray
        Kernel sums and their errors (NaN without ``calculateKernelUncertainty``).
    background, background_err : numpy.ndarray
        Local background at the stamp centre and its error (0 and NaN without one).
    resid_mean, resid_std : numpy.ndarray
        Residual moments of the fits, in units of the difference's own sigma.
    """

    fit: SingleFit
    regularization: np.ndarray | None
    kernel_sum: np.ndarray
    kernel_sum_err: np.ndarray
    background: np.ndarray
    background_err: np.ndarray
    resid_mean: np.ndarray
    resid_std: np.ndarray


def kernel_sums(fit: SingleFit, basis: KernelBasis) -> tuple[np.ndarray, np.ndarray]:
    """Each candidate's kernel sum and its error (NaN without covariances)."""
    nk = basis.size
    sums = basis.sums
    ksum = fit.coeffs[:, :nk] @ sums
    if fit.covariance is None:
        err = np.full(len(ksum), np.nan)
    else:
        cov = fit.covariance[:, :nk, :nk]
        err = np.sqrt(np.maximum(np.einsum("i,nij,j->n", sums, cov, sums), 0.0))
    return ksum, err


def single_kernel_fits(
    cands: CandidateSet, basis: KernelBasis, cfg, state: SolveState
) -> SingleKernels:
    """Step 1: every candidate's own kernel fit, and what the later steps read from it.

    The fits are made here unless the cells made them already; the regularization
    strengths chosen (one per candidate) go to ``state.metadata["lambda"]``.

    Raises
    ------
    ValueError
        When ``cands.single`` does not match the candidates, or lacks the
        covariances ``calculateKernelUncertainty`` needs.
    """
    stats = cands.stats
    n = len(stats)
    has_bg = stats.has_background
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
    ksum, ksum_err = kernel_sums(single, basis)
    # The first local background term is the constant: the background at the centre.
    nk = stats.n_kernel
    bg = single.coeffs[:, nk] if has_bg else np.zeros(n)
    bg_err = (
        np.sqrt(np.maximum(single.covariance[:, nk, nk], 0.0))
        if want_err and has_bg
        else np.full(n, np.nan)
    )
    s_mean, s_std, _ = stats.residual_moments(single.coeffs)
    state.metadata["lambda"] = single.lam.tolist() if reg is not None else None
    return SingleKernels(single, reg, ksum, ksum_err, bg, bg_err, s_mean, s_std)


def clip_single_kernels(single: SingleKernels, cfg, state: SolveState) -> None:
    """Step 1, continued: reject candidates whose own fit is unusable (round 0).

    In turn: singular fits (non-finite coefficients or kernel sum), then with
    ``checkConditionNumber`` an ill-conditioned matrix, then with
    ``singleKernelClipping`` residuals beyond ``candidateResidualMeanMax/StdMax``.
    A candidate keeps the first reason it failed for.
    """
    fit = single.fit
    bad_fit = ~np.isfinite(single.kernel_sum) | ~np.isfinite(fit.coeffs).all(axis=1)
    state.reject(np.flatnonzero(bad_fit), "singular fit", 0)
    if cfg.checkConditionNumber:
        state.reject(np.flatnonzero(fit.condition > cfg.maxConditionNumber), "condition number", 0)
    if cfg.singleKernelClipping:
        fails = residual_failures(
            single.resid_mean,
            single.resid_std,
            cfg.candidateResidualMeanMax,
            cfg.candidateResidualStdMax,
        )
        state.reject(np.flatnonzero(fails), "single-kernel residuals", 0)
    state.counts["single"] = int((state.status == BAD).sum())


def brightness_order(cands: CandidateSet) -> np.ndarray:
    """Candidate indices, best rated first (ties by id), the order cells are visited in."""
    return np.lexsort((cands.ids, -cands.rating))


def select_per_cell(
    status: np.ndarray, cell: np.ndarray, order: np.ndarray, per_cell: int
) -> np.ndarray:
    """The candidates in use: the first ``per_cell`` not rejected of each cell.

    Taking them in ``order`` (brightest first) promotes, in a cell that lost one of
    its candidates to a rejection, the next candidate of that cell; ``per_cell < 0``
    takes them all.

    Returns
    -------
    numpy.ndarray
        Their indices, ascending.
    """
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


def clip_kernel_sums(ksum: np.ndarray, used: np.ndarray, cfg, rnd: int, state: SolveState) -> bool:
    """Step 2b: with ``kernelSumClipping``, reject the used candidates' outlying kernel sums.

    The clipped mean and standard deviation go to ``metadata["kernel_sum_stats"]``;
    with two candidates or fewer there is no ensemble to clip against.

    Returns
    -------
    bool
        Whether any candidate was rejected (the candidates in use then change).
    """
    if not cfg.kernelSumClipping or len(used) <= 2:
        return False
    out, k_mean, k_std = kernel_sum_outliers(ksum[used], cfg.maxKsumSigma)
    state.metadata.setdefault("kernel_sum_stats", []).append(
        {"round": rnd, "mean": k_mean, "std": k_std}
    )
    if not out.any():
        return False
    state.counts["kernel_sum"] += int(out.sum())
    state.reject(used[out], "kernel sum outlier", rnd)
    return True


def select_clipped(
    ksum: np.ndarray, cell: np.ndarray, order: np.ndarray, cfg, rnd: int, state: SolveState
) -> np.ndarray:
    """Steps 2a-b: the candidates in use, once their kernel sums are clipped.

    A candidate rejected as a kernel-sum outlier is replaced by the next of its cell
    (:func:`select_per_cell`), and that one may be an outlier too (a variable star
    among the fainter ones): ip_diffim visits the cells again after a rejection, so
    the clipping here is repeated over the new selection, statistics included, until
    it rejects nobody. Every pass that goes on rejects at least one candidate, so
    there are at most as many passes as candidates. On return no candidate in use
    lies beyond ``maxKsumSigma`` of their clipped statistics (the last entry of
    ``metadata["kernel_sum_stats"]``), unless there are too few to clip.

    Returns
    -------
    numpy.ndarray
        Indices of the candidates in use, ascending.
    """
    per_cell = int(cfg.nStarPerCell)
    used = select_per_cell(state.status, cell, order, per_cell)
    for _ in range(len(ksum)):
        if not clip_kernel_sums(ksum, used, cfg, rnd, state):
            break
        used = select_per_cell(state.status, cell, order, per_cell)
    return used


def spatial_fit(
    cands: CandidateSet,
    basis: KernelBasis,
    single: SingleKernels,
    used: np.ndarray,
    cfg,
    image_shape: tuple[int, int],
    state: SolveState,
) -> SpatialModel:
    """Steps 2c-d: the spatial model of the candidates in use (PCA, BIC, orders, fit).

    See :func:`~diffkernel.kernel.spatial_model.fit_spatial_model`; the BIC size,
    the note on lowered orders and the orders used are recorded in ``state``.
    """
    model = fit_spatial_model(
        cands.stats,
        basis,
        single.fit,
        single.regularization,
        single.kernel_sum,
        cands.x,
        cands.y,
        used,
        cfg,
        image_shape,
    )
    state.record_spatial_fit(model)
    return model


def assess_spatial_model(
    cands: CandidateSet, model: SpatialModel, used: np.ndarray, cfg, rnd: int, state: SolveState
) -> int:
    """Step 2e: the used candidates' residuals under the model, and their clipping.

    Every used candidate's spatial residual moments are recorded; with
    ``spatialKernelClipping`` those beyond ``candidateResidualMeanMax/StdMax`` are
    rejected.

    Returns
    -------
    int
        How many were rejected (also ``state.last_rejected``).
    """
    m_sp, sd_sp = spatial_residuals(model, cands.x, cands.y, used, int(cfg.spatialBgOrder))
    state.spatial_mean[used], state.spatial_std[used] = m_sp, sd_sp
    state.last_rejected = 0
    if cfg.spatialKernelClipping:
        fails = residual_failures(
            m_sp, sd_sp, cfg.candidateResidualMeanMax, cfg.candidateResidualStdMax
        )
        state.last_rejected = int(fails.sum())
        state.counts["spatial"] += state.last_rejected
        state.reject(used[fails], "spatial residuals", rnd)
    return state.last_rejected


def rejection_rounds(
    cands: CandidateSet,
    basis: KernelBasis,
    single: SingleKernels,
    cfg,
    image_shape: tuple[int, int],
    order: np.ndarray,
    state: SolveState,
) -> SpatialModel | None:
    """Step 2: at most ``maxSpatialIterations`` rounds of selection, clipping and fit.

    Each round takes the candidates in use and clips their kernel sums
    (:func:`select_clipped`), fits the spatial model and assesses it;
    the rounds stop when an assessment rejects nobody, or when no candidate is left.

    Returns
    -------
    SpatialModel or None
        The last round's model; None when no round fitted one.
    """
    model = None
    for rnd in range(1, int(cfg.maxSpatialIterations) + 1):
        state.rounds = rnd
        used = select_clipped(single.kernel_sum, cands.cell, order, cfg, rnd, state)
        if len(used) == 0:
            break
        model = spatial_fit(cands, basis, single, used, cfg, image_shape, state)
        if assess_spatial_model(cands, model, used, cfg, rnd, state) == 0:
            break
    return model


def final_fit(
    cands: CandidateSet,
    basis: KernelBasis,
    single: SingleKernels,
    cfg,
    image_shape: tuple[int, int],
    order: np.ndarray,
    model: SpatialModel | None,
    state: SolveState,
) -> SpatialModel:
    """Step 3: the model of the final candidates, who are marked GOOD.

    The last round's model stands when its assessment rejected nobody; otherwise
    (rounds exhausted) the spatial model is fitted once more, without assessment, to
    the candidates then in use, and a note says so. Those include the candidates
    promoted in place of the last round's rejections, so their kernel sums are
    clipped first (:func:`select_clipped`, rejections counted in the last round).

    Raises
    ------
    NoCandidatesError
        When every candidate has been rejected.
    """
    refit = model is None or state.last_rejected > 0
    if refit:
        used = select_clipped(single.kernel_sum, cands.cell, order, cfg, state.rounds, state)
    else:
        used = select_per_cell(state.status, cands.cell, order, int(cfg.nStarPerCell))
    if len(used) == 0:
        status, reason = state.status, state.reason
        by_reason = {r: int((reason == r).sum()) for r in sorted(set(reason[status == BAD]))}
        raise NoCandidatesError(
            f"all {len(status)} kernel candidates were rejected ({by_reason}); check the "
            "inputs, or relax candidateResidualMeanMax/StdMax or maxKsumSigma"
        )
    if refit:
        if model is not None:
            state.notes.append(
                f"candidates were still rejected in round {state.rounds}; final spatial fit "
                "made without a further assessment"
            )
        model = spatial_fit(cands, basis, single, used, cfg, image_shape, state)
        state.spatial_mean[used], state.spatial_std[used] = spatial_residuals(
            model, cands.x, cands.y, used, int(cfg.spatialBgOrder)
        )
    state.status[used] = GOOD
    return model


def solve_outcome(single: SingleKernels, model: SpatialModel, state: SolveState) -> SolveOutcome:
    """The outcome: per-candidate results, and the summary in the metadata.

    The notes also go to the solution, which travels without the metadata.
    """
    model.solution.notes.extend(state.notes)
    state.metadata.update(
        {
            "rounds": state.rounds,
            "rejected": state.counts,
            "n_candidates": len(state.status),
            "n_good": int((state.status == GOOD).sum()),
            "spatial_condition": model.solution.condition,
            "basis_kind": model.basis.kind,
            "basis_size": model.basis.size,
        }
    )
    return SolveOutcome(
        model.solution,
        state.status,
        state.reason,
        single.kernel_sum,
        single.kernel_sum_err,
        single.background,
        single.background_err,
        single.resid_mean,
        single.resid_std,
        single.fit.condition,
        state.spatial_mean,
        state.spatial_std,
        state.rejected_round,
        state.metadata,
    )


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

    Returns
    -------
    SolveOutcome

    Raises
    ------
    NoCandidatesError
        When there are no candidates, or every candidate is rejected.
    SpatialFitError
        When the spatial matrix is singular or too ill-conditioned.
    ValueError
        When ``cands.single`` does not match the candidates.
    """
    if len(cands.stats) == 0:
        raise NoCandidatesError("no kernel candidates to fit")
    state = SolveState.start(len(cands.stats))
    single = single_kernel_fits(cands, basis, cfg, state)
    clip_single_kernels(single, cfg, state)
    order = brightness_order(cands)
    model = rejection_rounds(cands, basis, single, cfg, image_shape, order, state)
    model = final_fit(cands, basis, single, cfg, image_shape, order, model, state)
    return solve_outcome(single, model, state)
