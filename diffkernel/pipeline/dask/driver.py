"""The Dask service: one image pair from Zarr to a published Zarr result.

Stages, each a set of independent Dask tasks that read what they need from Zarr in
the workers (no image goes through the scheduler):

1. *check*: one task per 1024-px tile of each input validates it (NaN, variance,
   usable pixels left) and hashes its planes, for the provenance's checksums (each
   pixel read once; :mod:`diffkernel.pipeline.dask.checks`). Every later step that
   reads pixels waits for it, except the cells: when nothing else comes first they
   start alongside it, and the driver waits for the check before it uses any cell
   (an invalid input stops the run there);
2. *prepare*: the stages before the fit, shared with :class:`diffkernel.MakeKernelTask`
   (:func:`diffkernel.pipeline.stages.prepare_fit`), whose pixel work (warping the
   template onto the science grid tile by tile, mesh backgrounds, coarse detection,
   star FWHMs) runs as tasks only when needed (:mod:`diffkernel.pipeline.dask.prefit`);
3. *cells*: one task per group of spatial cells vets, ranks and reduces their
   candidates to sufficient statistics (:func:`diffkernel.pipeline.cells.fit_cell`);
4. *reduction*: one task clips on kernel sums, fits the spatial model and runs the
   rejection rounds (:func:`diffkernel.pipeline.cells.reduce_cells`);
5. *tiles*: one task per output tile (a multiple of the store's chunks) convolves,
   subtracts and writes its difference, variance and mask chunks.

Everything is written into a partial store next to the output, which is renamed
onto the output path only once complete (:class:`diffkernel.io.zarr.results.ResultWriter`).
The tasks (:mod:`diffkernel.pipeline.dask.tasks`) call the same functions as
:class:`diffkernel.MakeKernelTask` on the same cells and regions, so the result
equals the in-memory path's.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.table import Table

from ...config import MakeKernelConfig
from ...errors import ConfigError, InputError
from ...io.paths import Output, check_outputs
from ...io.zarr.filters import create_score, write_filters
from ...io.zarr.image import ZarrImage
from ...io.zarr.results import ResultStore, ResultWriter, open_result
from ...io.zarr.workspace import ZarrWorkspace
from ...kernel.spatial import SpatialSolution
from ...kernel.subtract import SubtractionKernels, check_fft_options, merged_mask_planes
from ...quality import assess, footprint_radius, histogram_metrics
from ..cells import SourcePlacement
from ..stages import PreparedFit, check_mode, check_plane_names, prepare_fit
from .cluster import connect, default_tile_size
from .fitting import CellTasks, Reduction, submit_cells
from .postfilter import FilterStage, filters_summary
from .prefit import ClusterWork
from .provenance import provenance as run_provenance
from .runner import TaskRunner
from .tasks import ZarrPair, device_ready, tile_task

__all__ = ["run_pair", "PairRun", "PairDriver"]

log = logging.getLogger("diffkernel")


@dataclass
class PairRun:
    """What :func:`run_pair` returns.

    Attributes
    ----------
    result : ResultStore
        The published result, read back (its ``quality`` is the verdict).
    timings : dict
        Wall seconds per stage.
    summary : dict
        Candidates per stage, kernel-sum range and residual statistics.
    """

    result: ResultStore
    timings: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def quality(self) -> dict[str, Any]:
        """The quality verdict of the result (:func:`diffkernel.quality.assess`)."""
        return self.result.quality


def run_pair(
    science,
    template,
    out: str | os.PathLike,
    *,
    config: MakeKernelConfig | None = None,
    sources: Table | None = None,
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    tile_size: int | None = None,
    cells_per_task: int | None = None,
    mode: str = "convolveTemplate",
    precision: str = "single",
    device: str = "cpu",
    preconvolved: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    provenance: dict[str, Any] | None = None,
    timeout: float | None = None,
    decorrelate: bool = True,
    score: bool = False,
) -> PairRun:
    """Fit the PSF-matching kernel of a pair stored in Zarr and write the difference.

    Parameters
    ----------
    science, template : ZarrImage, path or (path, group)
        Image groups (see :mod:`diffkernel.io.zarr.image`); the template is warped onto the
        science grid when their WCS differ (``warpingConfig.doAlign``).
    out : path
        Result store to publish; refused if it exists unless ``overwrite``.
    config : MakeKernelConfig, optional
        Default: :meth:`MakeKernelConfig.default_subtraction` (Alard-Lupton with a
        fitted differential background), since stored images may hold their sky.
    sources : astropy.table.Table, optional
        Kernel candidates (``x``, ``y`` or ``ra``, ``dec``); detected when None.
    client, scheduler, n_workers
        Where to run (see :func:`diffkernel.pipeline.dask.cluster.connect`).
    tile_size : int, optional
        Side of the subtraction tiles, a multiple of the science chunks (default:
        :func:`diffkernel.pipeline.dask.cluster.default_tile_size`). Results do not
        depend on it.
    cells_per_task : int, optional
        Spatial cells fitted per Dask task. By default a task takes the cells that
        start in one subtraction tile (64 for 128-px cells and 1024-px tiles): a cell
        alone is a few milliseconds of work, less than the scheduler's cost of a
        task, and the scheduler's share of the cores is not free on a small
        machine. 1 gives one task per cell. Results do not depend on it: every cell
        is fitted on its own.
    mode : {"convolveTemplate", "convolveScience", "auto"}
        Which image is convolved (see :meth:`diffkernel.MakeKernelTask.run`); the
        choice is ``metadata["mode"]`` of the result.
    precision : {"single", "double"}
        Precision of the tiles' FFTs (see :func:`diffkernel.subtract_images`); the
        kernel fit is always double precision.
    device : {"cpu", "gpu"}
        Where the tiles' FFTs run (:mod:`diffkernel.kernel.device`). With "gpu" every worker
        must see a CUDA device and have CuPy (checked on each worker before any
        work; an error otherwise). With several GPUs per node, start one worker per
        GPU (e.g. dask-cuda's LocalCUDACluster) so each sees its own.
    preconvolved : bool
        The science image was already convolved with its PSF.
    overwrite : bool
        Replace an existing output.
    progress : bool
        Show dask's progress bar and the dashboard link.
    provenance : dict, optional
        Extra entries for the result's provenance (e.g. a batch's fingerprint).
    timeout : float, optional
        Seconds the run may wait on the cluster; past it the run stops with a
        :class:`~diffkernel.errors.ClusterError` and publishes nothing.
    decorrelate : bool
        Filter the difference so its noise is white (:mod:`diffkernel.kernel.decorrelate`);
        the filters are recorded in the store's group ``filters``.
    score : bool
        Also write the score image (group ``score``: S/N of a point source).

    Returns
    -------
    PairRun
    """
    cfg = MakeKernelConfig.default_subtraction() if config is None else config
    if not isinstance(cfg, MakeKernelConfig):
        raise ConfigError(f"config must be a MakeKernelConfig, got {type(cfg).__name__}")
    cfg.validate()
    sci = open_image(science, "science")
    tmpl = open_image(template, "template")
    # Even with overwrite, the output may never be (or hold) an input.
    check_outputs([Output("out", out)], {"science": sci.path, "template": tmpl.path}, True)
    tile = default_tile_size(sci.chunks, sci.shape) if tile_size is None else int(tile_size)
    if tile <= 0 or tile % sci.chunks[0] or tile % sci.chunks[1]:
        raise ConfigError(
            f"tile_size {tile} must be a positive multiple of the science chunks {sci.chunks} "
            "(tiles write whole chunks)"
        )
    # (prepare_fit checks it too; here a misspelt plane is refused before any cluster.)
    check_plane_names(cfg, tmpl.mask_planes, sci.mask_planes)
    check_mode(mode)
    check_fft_options(precision, device)
    if cells_per_task is not None and int(cells_per_task) < 1:
        raise ConfigError(f"cells_per_task must be at least 1, got {cells_per_task}")
    if sources is not None and not isinstance(sources, Table):
        raise InputError(f"sources must be an astropy Table, got {type(sources).__name__}")
    writer = ResultWriter(out, overwrite=overwrite)
    try:
        with connect(client, scheduler, n_workers, progress) as cl:
            if device != "cpu":
                cl.run(device_ready, device)  # raises the first worker's ConfigError
            run = PairDriver(
                cl, cfg, sci, tmpl, writer, tile, progress, cells_per_task, mode, precision, device
            )
            run.extra_provenance = dict(provenance or {})
            run.runner.limit(timeout)
            run.decorrelate, run.score = bool(decorrelate), bool(score)
            path, timings, summary = run.execute(sources, preconvolved)
    except BaseException:
        writer.abort()
        raise
    return PairRun(open_result(path), timings, summary)


def open_image(image, name: str) -> ZarrImage:
    """A :class:`ZarrImage` from one, a store path or ``(path, group)``."""
    if isinstance(image, ZarrImage):
        return image
    if isinstance(image, tuple):
        return ZarrImage.open(*image)
    if isinstance(image, (str, os.PathLike)):
        return ZarrImage.open(image)
    raise InputError(
        f"{name} must be a ZarrImage, a store path or (path, group), got {type(image).__name__}"
    )


class PairDriver:
    """One pair on one client: the stages of :func:`run_pair`."""

    def __init__(
        self,
        client,
        cfg: MakeKernelConfig,
        science: ZarrImage,
        template: ZarrImage,
        writer: ResultWriter,
        tile: int,
        progress: bool = False,
        cells_per_task: int | None = None,
        mode: str = "convolveTemplate",
        precision: str = "single",
        device: str = "cpu",
    ) -> None:
        self.cells_per_task = cells_per_task
        self.precision = precision
        self.device = device
        self.mode = mode
        self.cfg = cfg
        self.kcfg = cfg.kernel.active
        self.science = science
        self.template = template
        self.writer = writer
        self.workspace = ZarrWorkspace(str(writer.partial_path))
        self.tile = tile
        self.runner = TaskRunner(client, progress)
        self.timings = self.runner.timings
        self.meta: dict[str, Any] = {}
        self.extra_provenance: dict[str, Any] = {}
        self.decorrelate, self.score = True, False
        self.filters = None

    def execute(self, sources: Table | None, preconvolved: bool):
        """Run the stages; the published path, the timings and the summary."""
        started = time.perf_counter()
        work = ClusterWork(self.runner, self.cfg, self.template, self.science, self.workspace)
        prepared = self.prepare(work, sources, preconvolved)
        cells = submit_cells(
            self.runner, prepared, work.reader, self.science, self.tile, self.cells_per_task
        )
        planes = self.create_difference(work.reader)  # while the workers fit the cells
        checksums = work.validated()  # a bad input stops the run here, cells or not
        shape = self.science.shape
        post = FilterStage(self.runner, work.reader, shape, self.decorrelate, self.score)
        self.runner.wait(cells.futures, "cells", cells.started, gather=False)

        reduction, solution = self.reduce(cells, prepared)
        self.filters = post.filters(solution, prepared.mode, self.meta.get("science_fwhm"))

        t0 = time.perf_counter()
        tiles = self.submit_tiles(solution, work.reader, planes, prepared, self.filters)
        outcome, table = self.record_fit(reduction, cells)  # while the tiles run
        histograms = np.sum(self.runner.wait(tiles, "tiles", t0), axis=0)
        return self.publish(table, outcome, histograms, cells, len(tiles), checksums, started)

    def prepare(self, work: ClusterWork, sources: Table | None, preconvolved: bool) -> PreparedFit:
        """The stages before the fit (:func:`~diffkernel.pipeline.stages.prepare_fit`)."""
        t0 = time.perf_counter()
        prepared = prepare_fit(work, self.cfg, sources, preconvolved, self.mode)
        self.meta.update(prepared.metadata)
        self.timings["prepare"] = time.perf_counter() - t0
        return prepared

    def reduce(self, cells: CellTasks, prepared: PreparedFit) -> tuple[Reduction, SpatialSolution]:
        """Submit the reduction; it and its kernel, as soon as that is back (kilobytes)."""
        t0 = time.perf_counter()
        reduction = Reduction(self.runner, cells, prepared.placement)
        log.info("reduce (1 task)")
        solution = reduction.solution()
        self.timings["reduce"] = time.perf_counter() - t0
        return reduction, solution

    def record_fit(self, reduction: Reduction, cells: CellTasks) -> tuple[Any, Table]:
        """The reduction's outcome and candidates, into the metadata and the result store."""
        outcome, table, solve_meta = reduction.outcome()
        self.meta.update(solve_meta)
        cells.futures.clear()  # the cells' results can go now
        self.writer.write_fit(outcome.solution, table)
        return outcome, table

    def create_difference(self, reader: ZarrPair) -> dict[str, int]:
        """Create the result's empty difference arrays, for the tiles; their mask planes."""
        sci = self.science
        # reader.template is the convolved image, reader.science the reference.
        planes = merged_mask_planes(reader.science.mask_planes, reader.template.mask_planes)
        diff = self.writer.create_difference(
            sci.shape, sci.chunks, planes, sci.wcs, sci.origin, sci.meta
        )
        if self.score:
            create_score(self.writer.partial_path, diff)
        return planes

    def submit_tiles(
        self,
        solution: SpatialSolution,
        reader: ZarrPair,
        planes: dict[str, int],
        prepared: PreparedFit,
        filters=None,
    ) -> list:
        """Submit the difference's tiles: convolve, subtract, write, histogram."""
        # The kernels go to every worker: left on the one that made them, the tile
        # tasks would all be scheduled there (data locality).
        kernels = self.runner.scatter(SubtractionKernels(solution, self.precision, self.device))
        if filters is not None:
            filters = self.runner.scatter(filters)
        self.meta["fft_precision"] = self.precision
        self.meta["device"] = self.device
        # Scattered once: a worker then keeps one reader whose arrays stay open (a task
        # shipping its own copy would reopen six Zarr arrays, ~20 ms).
        tile_reader = self.runner.scatter(reader.reading(cached=False))
        sign = -1.0 if prepared.mode == "convolveScience" else 1.0
        near = footprints_near(prepared.placement, prepared.basis.kernel_size)
        ny, nx = self.science.shape
        boxes = [
            (y0, min(y0 + self.tile, ny), x0, min(x0 + self.tile, nx))
            for y0 in range(0, ny, self.tile)
            for x0 in range(0, nx, self.tile)
        ]
        return [
            self.runner.submit(
                tile_task,
                kernels,
                tile_reader,
                planes,
                self.workspace,
                *box,
                sign,
                near(*box),
                filters,
                name=f"tile-{box[0]}-{box[2]}",
            )
            for box in boxes
        ]

    def publish(
        self, table: Table, outcome, histograms, cells: CellTasks, n_tiles, checksums, started
    ):
        """Judge the result, record the run and publish the store."""
        quality = assess(table, self.meta, outcome.solution, self.kcfg, histograms)
        summary = run_summary(table, quality, histograms.sum(axis=0))
        summary["quality"] = {k: quality[k] for k in ("verdict", "reasons")}
        self.meta["residuals"] = summary["residuals"]
        self.meta["n_cells"] = cells.n_cells
        self.meta["n_cell_tasks"] = cells.n_tasks
        self.meta["n_tiles"] = n_tiles
        self.meta["tile_size"] = self.tile
        self.meta["decorrelation"] = filters_summary(self.filters)
        if self.filters is not None:
            write_filters(
                self.writer.partial_path, self.filters.attributes(), self.filters.arrays()
            )
        self.timings["total"] = time.perf_counter() - started
        self.meta["timings"] = dict(self.timings)
        record = run_provenance(self.science, self.template, checksums)
        record.update(self.extra_provenance)
        path = self.writer.finalize(
            None,
            None,
            self.meta,
            self.cfg.to_dict(),
            record,
            quality=quality,
            z_histograms=histograms,
        )
        return path, dict(self.timings), summary


def footprints_near(placement: SourcePlacement, kernel_size: int):
    """``near(y0, y1, x0, x1)``: the candidates' centres near a tile, and their radius.

    For the footprint histograms of :func:`~diffkernel.quality.difference_histograms`.
    """
    placed = placement.cell >= 0
    xc_all, yc_all = placement.xc[placed], placement.yc[placed]
    radius = footprint_radius(kernel_size)
    r = int(np.ceil(radius))

    def near(y0: int, y1: int, x0: int, x1: int):
        keep = (xc_all >= x0 - r) & (xc_all < x1 + r) & (yc_all >= y0 - r) & (yc_all < y1 + r)
        return xc_all[keep], yc_all[keep], radius

    return near


def run_summary(table: Table, quality: dict, histogram: np.ndarray) -> dict[str, Any]:
    """Candidates per stage, the kernel sum over the field and the difference's residuals."""
    status = np.asarray(table["status"])
    reasons = np.asarray(table["reason"])
    good = status == "GOOD"
    ksum = np.asarray(table["kernel_sum"])[good]
    metrics = histogram_metrics(histogram)
    residuals = {
        k: metrics[k] for k in ("n_pixels", "mean", "median", "robust_std") if k in metrics
    }
    statuses, status_counts = np.unique(status, return_counts=True)
    why, why_counts = np.unique(reasons, return_counts=True)
    return {
        "n_sources": len(table),
        "n_good": int(good.sum()),
        "status": {str(s): int(k) for s, k in zip(statuses, status_counts, strict=True)},
        "rejected": {str(r): int(k) for r, k in zip(why, why_counts, strict=True) if r},
        # The kernel sum the difference used, over the field; the single-candidate
        # sums scatter with each star's noise and are no estimate of it.
        "kernel_sum": {k: quality["metrics"]["kernel_sum"][k] for k in ("mean", "min", "max")},
        "candidate_kernel_sums": [float(ksum.min()), float(ksum.max())] if ksum.size else None,
        "residuals": residuals,
    }
