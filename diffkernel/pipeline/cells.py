"""Spatial cells: the unit of work of the candidate stage.

Candidates are grouped by the ``sizeCellX`` x ``sizeCellY`` cell their rounded centre
falls in. Each cell is fitted on its own from one small region of the two images (the
cell grown by a stamp and a kernel): vetting for masked pixels, signal to noise,
ranking and the candidates' sufficient statistics. The in-memory path and the Dask
path call the same :func:`fit_cell` on the same cells, in any order, and the results
are put back together in cell order, so both give bit-identical statistics whatever
the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from astropy.table import Table

from ..errors import NoCandidatesError
from ..image import MaskedImage
from ..kernel.basis import KernelBasis
from ..kernel.candidate import (
    ShiftedTemplates,
    StampBatch,
    basis_columns,
    cut_stamps,
    noise_corrected,
    valid_convolutions,
)
from ..kernel.fit import SingleFit, fit_single_kernels
from ..kernel.moments import (
    CandidateStats,
    compute_stats,
    concatenate_rows,
    core_selector,
    fit_moments,
)
from ..kernel.photometry import StampPhotometry, stamp_photometry
from ..kernel.solve import BAD, CandidateSet, SolveOutcome, solve
from ..prep.selection import aperture_flux_snr, assign_cells, core_snr, place_centres, vet_positions

__all__ = [
    "single_threaded_blas",
    "CellPlan",
    "CellResult",
    "PairRegionReader",
    "InMemoryPair",
    "place_sources",
    "cell_region",
    "fit_cell",
    "candidate_stats",
    "variance_response",
    "SourcePlacement",
    "reduce_cells",
    "candidate_table",
]

_BLAS_LIMITED = False


def single_threaded_blas() -> None:
    """Limit BLAS to one thread in this (worker) process, once.

    A multithreaded BLAS may sum in another order than a single-threaded one, so
    the same candidate would get statistics that differ in the last bits depending
    on the machine. Cells are small (one thread per task is what Dask workers run
    anyway), so the candidate stage always runs with single-threaded BLAS: Dask
    tasks call this, and :class:`diffkernel.MakeKernelTask` limits BLAS around its
    candidate stage, so both compute bit-identical numbers.
    """
    global _BLAS_LIMITED
    if not _BLAS_LIMITED:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
        _BLAS_LIMITED = True


#: Reads ``(template, science)`` over ``[y0:y1, x0:x1]`` of the full images.
PairRegionReader = Callable[[int, int, int, int], tuple[MaskedImage, MaskedImage]]


class InMemoryPair:
    """Region reader over two aligned in-memory masked images (views, no copies)."""

    def __init__(self, template: MaskedImage, science: MaskedImage) -> None:
        self.template = template
        self.science = science

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> tuple[MaskedImage, MaskedImage]:
        return _view(self.template, y0, y1, x0, x1), _view(self.science, y0, y1, x0, x1)


def _view(mi: MaskedImage, y0: int, y1: int, x0: int, x1: int) -> MaskedImage:
    box = np.s_[y0:y1, x0:x1]
    return MaskedImage.from_validated(mi.image[box], mi.variance[box], mi.mask[box], mi.mask_planes)


@dataclass(frozen=True)
class CellPlan:
    """What every cell of one run needs; small and shipped once to each worker.

    Attributes
    ----------
    basis : KernelBasis
        Kernel basis the statistics are computed in.
    kernel_config : PsfMatchConfig
        The active kernel configuration.
    shape : tuple of int
        ``(ny, nx)`` of the full images.
    half_stamp, half_kernel : int
        Half-widths of the science stamp and of the kernel.
    aperture_radius, min_snr : float
        ``selectMeasurement.apertureRadius`` and ``minSnr``.
    regularization : numpy.ndarray or None
        The kernel penalty of the configuration
        (:func:`~diffkernel.kernel.basis.regularization_for`), made once per run.
    """

    basis: KernelBasis
    kernel_config: object
    shape: tuple[int, int]
    half_stamp: int
    half_kernel: int
    aperture_radius: float
    min_snr: float
    regularization: np.ndarray | None = None

    @property
    def bad_planes(self) -> tuple[str, ...]:
        """Mask planes that disqualify a stamp."""
        return tuple(self.kernel_config.badMaskPlanes)

    @property
    def margin(self) -> int:
        """Half-width of a template cutout (stamp plus kernel)."""
        return self.half_stamp + self.half_kernel


@dataclass
class CellResult:
    """The candidate stage of one cell, or of several merged (:meth:`merge`).

    Attributes
    ----------
    cell : numpy.ndarray
        Cell index (row-major) of each source.
    index : numpy.ndarray
        Positions of the sources in the run's source list; within a cell, in id order.
    reason : numpy.ndarray of str
        Vetting rejection per source ('' for a candidate).
    snr_template, snr_science, rating : numpy.ndarray
        Aperture S/N in each image and the rating, the mean S/N per pixel of the
        science image's core (NaN where not measured).
    stats : CandidateStats or None
        Sufficient statistics of the candidates (sources with ``reason == ''``), in
        source order.
    single : SingleFit or None
        Their single-kernel fits, aligned with ``stats``.
    photometry : StampPhotometry or None
        Stamp photometry of every source (NaN where not a candidate).
    """

    cell: np.ndarray
    index: np.ndarray
    reason: np.ndarray
    snr_template: np.ndarray
    snr_science: np.ndarray
    rating: np.ndarray
    stats: CandidateStats | None
    single: SingleFit | None = None
    photometry: StampPhotometry | None = None

    @classmethod
    def merge(cls, results: list[CellResult]) -> CellResult:
        """One result holding several, sources and candidates in the order given.

        A task returns its cells merged: a handful of large arrays move between
        workers much faster than a dozen small ones per cell.
        """
        parts = [r for r in results if r.stats is not None]
        return cls(
            *(
                np.concatenate([getattr(r, name) for r in results])
                for name in ("cell", "index", "reason", "snr_template", "snr_science", "rating")
            ),
            CandidateStats.concatenate([r.stats for r in parts]) if parts else None,
            SingleFit.concatenate([r.single for r in parts]) if parts else None,
            concatenate_rows(
                [
                    StampPhotometry.empty(len(r.index)) if r.photometry is None else r.photometry
                    for r in results
                ]
            )
            if results
            else None,
        )


def place_sources(
    x: np.ndarray, y: np.ndarray, plan: CellPlan
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer centres, position-only rejections and cells of every source.

    Returns
    -------
    xc, yc : numpy.ndarray
        Rounded centres (0 where not finite).
    reason : numpy.ndarray of str
        'not finite' or 'edge' (the template cutout leaves the image), else ''.
    cell : numpy.ndarray
        Cell index of sources with ``reason == ''``, -1 for the others.
    """
    xc, yc, reason = place_centres(x, y, plan.shape, plan.margin)
    kcfg = plan.kernel_config
    cell = np.where(
        reason == "",
        assign_cells(xc, yc, plan.shape, int(kcfg.sizeCellX), int(kcfg.sizeCellY)),
        -1,
    )
    return xc, yc, reason, cell


def cell_region(xc: np.ndarray, yc: np.ndarray, plan: CellPlan) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` holding the template cutouts of every centre given."""
    m = plan.margin
    return (
        int(yc.min()) - m,
        int(yc.max()) + m + 1,
        int(xc.min()) - m,
        int(xc.max()) + m + 1,
    )


def fit_cell(
    plan: CellPlan,
    cell: int,
    index: np.ndarray,
    xc: np.ndarray,
    yc: np.ndarray,
    read: PairRegionReader,
) -> CellResult:
    """Vet, rank and reduce to sufficient statistics the sources of one cell.

    Parameters
    ----------
    plan : CellPlan
        Run-wide constants.
    cell : int
        Cell index.
    index : numpy.ndarray
        Positions of the cell's sources in the run's source list.
    xc, yc : numpy.ndarray
        Their integer centres, all with whole template cutouts inside the image.
    read : callable
        ``read(y0, y1, x0, x1) -> (template, science)`` region reader.
    """
    index = np.asarray(index)
    n = len(index)
    y0, y1, x0, x1 = cell_region(xc, yc, plan)
    template, science = read(y0, y1, x0, x1)
    lx, ly = xc - x0, yc - y0
    reason = vet_positions(
        template, science, lx, ly, plan.half_stamp, plan.half_kernel, plan.bad_planes
    )[2]
    snr_t = np.full(n, np.nan)
    snr_s = np.full(n, np.nan)
    rating = np.full(n, np.nan)
    ok = np.flatnonzero(reason == "")
    if ok.size:
        # S/N from the pixels of small apertures: stamps are only cut for the survivors.
        radius = plan.aperture_radius
        half_snr = int(min(plan.half_stamp, max(np.ceil(2.5 * radius), 8)))
        xo, yo = lx[ok], ly[ok]
        _, snr_t[ok] = aperture_flux_snr(
            template.image, template.variance, xo, yo, half_snr, radius
        )
        _, snr_s[ok] = aperture_flux_snr(science.image, science.variance, xo, yo, half_snr, radius)
        # Ranked as ip_diffim does: by the mean S/N of the core of the image matched to.
        core = plan.kernel_config.candidateCoreRadius
        rating[ok] = core_snr(science.image, science.variance, xo, yo, plan.half_stamp, core)
        low = ~((snr_t[ok] >= plan.min_snr) & (snr_s[ok] >= plan.min_snr))
        reason[ok[low]] = "low S/N"
    keep = np.flatnonzero(reason == "")
    stats = single = None
    photometry = StampPhotometry.empty(n)
    if keep.size:
        stamps = cut_stamps(
            template, science, lx[keep], ly[keep], plan.half_stamp, plan.half_kernel
        )
        stats, single = candidate_stats(stamps, plan.basis, plan.kernel_config, plan.regularization)
        measured = stamp_photometry(
            *stamps.template_center(),
            stamps.science,
            stamps.science_variance,
            aperture_radius=plan.half_kernel,
        )
        for name, values in vars(measured).items():
            getattr(photometry, name)[keep] = values
    cells = np.full(n, cell, dtype=np.int64)
    return CellResult(
        cells, index, reason.astype(str), snr_t, snr_s, rating, stats, single, photometry
    )


def candidate_stats(
    stamps: StampBatch, basis: KernelBasis, kcfg, regularization: np.ndarray | None
) -> tuple[CandidateStats, SingleFit]:
    """Sufficient statistics of a batch and their single-kernel fits.

    The fits are weighted by the science variance plus the template's under the
    stamp; with ``iterateSingleKernel`` they are made a second time weighted by the
    variance seen through the first fit's kernels. The residual statistics are in
    units of the difference's own sigma, ``V_s + K² ⊛ V_t`` with ``K`` the
    candidate's final kernel: what the difference image's variance plane says, so a
    good fit has residuals of unit standard deviation whatever the template's depth.
    ``regularization`` is :func:`~diffkernel.kernel.basis.regularization_for` of
    ``basis`` and ``kcfg``.
    """
    conv = basis_columns(basis, stamps.template)
    selector = (
        core_selector(stamps.stamp_size, kcfg.candidateCoreRadius) if kcfg.useCoreStats else None
    )
    _, tvar_center = stamps.template_center()
    fit_variance = stamps.science_variance + tvar_center
    with_uncertainty = bool(kcfg.calculateKernelUncertainty)
    kwargs = dict(
        background_order=int(kcfg.spatialBgOrder) if kcfg.fitForBackground else None,
        constant_variance_weighting=bool(kcfg.constantVarianceWeighting),
    )
    if kcfg.iterateSingleKernel:
        first = fit_single_kernels(
            noise_corrected(
                fit_moments(conv, stamps.science, fit_variance, **kwargs),
                stamps,
                basis,
                fit_variance,
                constant_variance_weighting=bool(kcfg.constantVarianceWeighting),
                correct=kcfg.correctConvolvedNoise,
            ),
            kcfg,
            regularization,
        )
        fit_variance = stamps.difference_variance(basis.kernel_image(first.coeffs[:, : basis.size]))
    moments = noise_corrected(
        fit_moments(
            conv, stamps.science, fit_variance, with_uncertainty=with_uncertainty, **kwargs
        ),
        stamps,
        basis,
        fit_variance,
        constant_variance_weighting=bool(kcfg.constantVarianceWeighting),
        correct=kcfg.correctConvolvedNoise,
    )
    single = fit_single_kernels(moments, kcfg, regularization, with_uncertainty)
    # The fit keeps the weights above, as ip_diffim's does (it weights by the variance
    # it has before any iteration): only the units of the residuals follow the kernel.
    variance = stamps.difference_variance(basis.kernel_image(single.coeffs[:, : basis.size]))
    # A delta-function basis's residuals come from the pixels: a normal matrix of the
    # statistics' weights would cost about twice a whole Alard-Lupton fit per candidate.
    stats = compute_stats(
        conv,
        stamps.science,
        variance,
        stats_selector=selector,
        fit=moments,
        residual_template=stamps.template if isinstance(conv, ShiftedTemplates) else None,
        **kwargs,
    )
    var_science, var_template = variance_response(stamps, variance, selector)
    return replace(stats, var_science=var_science, var_template=var_template), single


def variance_response(
    stamps: StampBatch, variance: np.ndarray, selector: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The terms that put statistics in units of ``variance`` in another kernel's units.

    Returns
    -------
    var_science : numpy.ndarray
        ``(N,)``: the mean over the statistics' pixels (``selector``'s, or the
        stamp's) of the science variance over ``variance``.
    var_template : numpy.ndarray
        ``(N, K, K)``: per kernel pixel, the mean of the template variance it carries
        into the difference over ``variance``; so the mean ratio of the difference's
        variance under kernels ``K`` to ``variance`` is ``var_science + Σ K² var_template``
        (:meth:`~diffkernel.kernel.candidate.CandidateStats.residual_moments`).
    """
    weight = 1.0 / variance
    if selector is not None:
        weight = weight * selector
    weight /= weight.shape[1] * weight.shape[2] if selector is None else selector.sum()
    # The template variance each window offset puts under the weights (a correlation),
    # then flipped: window offsets run opposite to the kernel's pixels.
    per_offset = valid_convolutions(stamps.template_variance, weight[:, ::-1, ::-1])
    var_template = np.ascontiguousarray(per_offset[:, ::-1, ::-1])
    return np.einsum("nxy,nxy->n", stamps.science_variance, weight), var_template


@dataclass
class SourcePlacement:
    """Every source of a run, placed on the pixel grid and in cells.

    Attributes
    ----------
    ids : numpy.ndarray
        Source identifiers.
    x, y : numpy.ndarray
        Positions as given (0-based pixels).
    xc, yc : numpy.ndarray
        Rounded centres.
    reason : numpy.ndarray of str
        Position-only rejection ('not finite', 'edge') or ''.
    cell : numpy.ndarray
        Cell of each source with ``reason == ''``, else -1.
    """

    ids: np.ndarray
    x: np.ndarray
    y: np.ndarray
    xc: np.ndarray
    yc: np.ndarray
    reason: np.ndarray
    cell: np.ndarray

    @classmethod
    def from_positions(
        cls, ids: np.ndarray, x: np.ndarray, y: np.ndarray, plan: CellPlan
    ) -> SourcePlacement:
        """Place sources for ``plan``."""
        xc, yc, reason, cell = place_sources(x, y, plan)
        return cls(np.asarray(ids), x, y, xc, yc, reason, cell)

    def cells(self) -> list[tuple[int, np.ndarray]]:
        """``(cell, source positions)`` of every non-empty cell, in cell order.

        The positions of a cell are in id order (list order among equal ids).
        """
        placed = np.flatnonzero(self.cell >= 0)
        if placed.size == 0:
            return []
        # Sources of a cell in id order: which of two sources on one pixel is kept (the
        # first), and the order candidates are summed in, do not depend on the list order.
        by_id = placed[np.argsort(self.ids[placed], kind="stable")]
        order = by_id[np.argsort(self.cell[by_id], kind="stable")]
        cells, starts = np.unique(self.cell[order], return_index=True)
        groups = np.split(order, starts[1:])
        return [(int(c), g) for c, g in zip(cells, groups, strict=True)]


def reduce_cells(
    plan: CellPlan, placement: SourcePlacement, results: list[CellResult]
) -> tuple[SolveOutcome, Table, dict]:
    """Kernel-sum clipping, spatial fit and rejection rounds over every cell's candidates.

    Parameters
    ----------
    plan : CellPlan
        Run-wide constants.
    placement : SourcePlacement
        Every source of the run.
    results : list of CellResult
        Covering every non-empty cell once, each result one or several cells
        (:meth:`CellResult.merge`), in any order: candidates are put in cell order
        here, so the outcome does not depend on how cells were grouped.

    Returns
    -------
    outcome : SolveOutcome
    table : astropy.table.Table
        One row per source (see :func:`candidate_table`).
    metadata : dict
        The solve's metadata plus the vetting rejection counts.

    Raises
    ------
    NoCandidatesError
        When no source survived vetting.
    """
    n_src = len(placement.x)
    reason = placement.reason.copy()
    snr_t = np.full(n_src, np.nan)
    snr_s = np.full(n_src, np.nan)
    rating = np.full(n_src, np.nan)
    photometry = StampPhotometry.empty(n_src)
    merged = CellResult.merge(results) if results else None
    if merged is not None:
        reason[merged.index] = merged.reason
        snr_t[merged.index] = merged.snr_template
        snr_s[merged.index] = merged.snr_science
        rating[merged.index] = merged.rating
        for name, values in vars(merged.photometry).items():
            getattr(photometry, name)[merged.index] = values
    names, counts = np.unique(reason.astype(str), return_counts=True)
    vetting = {str(r): int(k) for r, k in zip(names, counts, strict=True) if r}
    if merged is None or merged.stats is None:
        raise NoCandidatesError(
            f"none of the {n_src} sources is a usable kernel candidate ({vetting}); "
            "sources need their whole stamp inside the image, no "
            f"{'/'.join(plan.bad_planes)} pixels and S/N >= {plan.min_snr}"
        )
    is_candidate = merged.reason == ""
    # Cell order (stable: within a cell, the sources' own order, which is id order).
    order = np.argsort(merged.cell[is_candidate], kind="stable")
    cidx = merged.index[is_candidate][order]
    cset = CandidateSet(
        placement.ids[cidx],
        placement.xc[cidx].astype(float),
        placement.yc[cidx].astype(float),
        placement.cell[cidx],
        rating[cidx],
        merged.stats.take(order),
        merged.single.take(order),
    )
    outcome = solve(cset, plan.basis, plan.kernel_config, plan.shape)
    meta = dict(outcome.metadata)
    meta["vetting_rejected"] = vetting
    table = candidate_table(placement, reason, snr_t, snr_s, rating, cidx, outcome, photometry)
    return outcome, table, meta


def candidate_table(
    placement: SourcePlacement,
    reason: np.ndarray,
    snr_t: np.ndarray,
    snr_s: np.ndarray,
    rating: np.ndarray,
    cidx: np.ndarray,
    outcome: SolveOutcome,
    photometry: StampPhotometry | None = None,
) -> Table:
    """One row per source: position, cell, status, reason and fit statistics.

    With ``photometry`` (per source), the columns ``flux_ratio``, ``flux_ratio_err``,
    ``sky_convolved``, ``sky_reference`` and ``sky_noise`` of
    :class:`~diffkernel.kernel.photometry.StampPhotometry` follow (the kernel's frame: the
    convolved image is the template in ``convolveTemplate`` mode, the science image in
    ``convolveScience`` mode).
    """
    n = len(placement.x)
    status = np.full(n, BAD, dtype=object)
    why = reason.astype(object).copy()

    def full(values):
        out = np.full(n, np.nan)
        out[cidx] = values
        return out

    status[cidx] = outcome.status
    why[cidx] = np.where(outcome.reason == "", why[cidx], outcome.reason)
    rounds = np.full(n, -1)
    rounds[cidx] = outcome.rejected_in_round
    extra = vars(photometry) if photometry is not None else {}
    return Table(
        {
            "id": placement.ids,
            "x": placement.x,
            "y": placement.y,
            "x_center": placement.xc,
            "y_center": placement.yc,
            "cell": placement.cell,
            "status": status.astype(str),
            "reason": why.astype(str),
            "rating": rating,
            "snr_template": snr_t,
            "snr_science": snr_s,
            "kernel_sum": full(outcome.kernel_sum),
            "kernel_sum_err": full(outcome.kernel_sum_err),
            "background": full(outcome.background),
            "background_err": full(outcome.background_err),
            "resid_mean": full(outcome.single_mean),
            "resid_std": full(outcome.single_std),
            "spatial_resid_mean": full(outcome.spatial_mean),
            "spatial_resid_std": full(outcome.spatial_std),
            "condition": full(outcome.condition),
            "rejected_round": rounds,
            **extra,
        }
    )
