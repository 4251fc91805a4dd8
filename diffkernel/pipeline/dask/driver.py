"""The Dask service: one image pair from Zarr to a published Zarr result.

Stages, each a set of independent Dask tasks that read what they need from Zarr in
the workers (no image goes through the scheduler):

1. *check*: one task per 1024-px tile of each input validates it (NaN, variance,
   usable pixels left) and hashes its planes, for the provenance's checksums (each
   pixel read once). Every later step that reads pixels waits for it, except the
   cells: when nothing else comes first they start alongside it, and the driver
   waits for the check before it uses any cell (an invalid input stops the run
   there);
2. *prepare* (only when needed): warp the template onto the science grid tile by
   tile, mesh backgrounds, coarse detection, star FWHMs;
3. *cells*: one task per spatial cell vets, ranks and reduces its candidates to
   sufficient statistics (:func:`diffkernel.kernel.cells.fit_cell`);
4. *reduction*: one task clips on kernel sums, fits the spatial model and runs the
   rejection rounds (:func:`diffkernel.kernel.cells.reduce_cells`);
5. *tiles*: one task per output tile (a multiple of the store's chunks) convolves,
   subtracts and writes its difference, variance and mask chunks.

Everything is written into a partial store next to the output, which is renamed
onto the output path only once complete (:class:`diffkernel.io.zarr.results.ResultWriter`).
The tasks call the same functions as :class:`diffkernel.MakeKernelTask` on the
same cells and regions, so the result equals the in-memory path's.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import dask
import numpy as np
from astropy.table import Table

from ... import __version__
from ...config import MakeKernelConfig
from ...errors import ConfigError, InputError, NoCandidatesError
from ...image import (
    MaskedImage,
    pixel_validation_counts,
    plane_bits,
    report_validation,
    unusable_planes,
    with_mask_planes,
)
from ...io.fits import SATURATION_KEYS
from ...io.zarr import ZarrImage, create_image_arrays, write_tile
from ...io.zarr.results import ResultStore, ResultWriter, open_result
from ...kernel.basis import basis_from_config
from ...kernel.cells import CellResult, SourcePlacement, fit_cell, reduce_cells
from ...kernel.device import array_backend
from ...kernel.spatial import SpatialSolution
from ...kernel.subtract import (
    SubtractionKernels,
    check_fft_options,
    difference_tile,
    merged_mask_planes,
    padded_template,
    prepare_science,
    prepare_template,
)
from ...prep.align import WARP_TILE, check_overlap, check_wcs, warp_region, warp_tiles
from ...prep.psf import exposure_fwhm, measure_pair_fwhm
from ...prep.selection import source_positions
from ...quality import assess, difference_histograms, footprint_radius, histogram_metrics
from ..serial import MODES, _needs_alignment, choose_mode, make_cell_plan, require_fwhms
from .taskproc import prepare_task_process

__all__ = ["run_pair", "connect", "ZarrPair", "PairRun", "default_tile_size"]

#: Tile side of the check stage (fixed: the checksums must not depend on tiling).
CHECK_TILE = 1024

#: Environment of LocalCluster workers. It replaces Dask's default, which also sets
#: MALLOC_TRIM_THRESHOLD_=65536 and with it switches off glibc's adaptive mmap
#: threshold (tasks undo that anyway, see :mod:`diffkernel.pipeline.dask.taskproc`).
#: BLAS, OpenMP and Zarr's codec thread pool stay single-threaded: one task per core,
#: and no worker borrowing its neighbour's core.
WORKER_ENVIRON = {
    "OMP_NUM_THREADS": 1,
    "MKL_NUM_THREADS": 1,
    "OPENBLAS_NUM_THREADS": 1,
    "ZARR_THREADING__MAX_WORKERS": 1,
}


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


class ZarrPair:
    """Region reader over a template and a science image in Zarr (picklable).

    Parameters
    ----------
    template, science : ZarrImage
        Aligned images of the same shape.
    template_background, science_background : tuple of (path, array name), optional
        Mesh backgrounds to remove, stored as 2-D arrays.
    cached : bool
        Read through the per-process chunk cache (for many small regions).
    stored : bool
        Give the pixels in their stored dtype, unchecked
        (:meth:`~diffkernel.io.zarr.store.ZarrImage.read_stored`): for the cells, which run
        alongside the check and convert only the stamps they cut to float64.
    """

    def __init__(
        self,
        template: ZarrImage,
        science: ZarrImage,
        template_background: tuple[str, str] | None = None,
        science_background: tuple[str, str] | None = None,
        cached: bool = True,
        stored: bool = False,
    ) -> None:
        self.template = template
        self.science = science
        self.template_background = template_background
        self.science_background = science_background
        self.cached = cached
        self.stored = stored

    def reading(self, *, cached: bool | None = None, stored: bool | None = None) -> ZarrPair:
        """The same images and backgrounds, read another way (None: as this one)."""
        return ZarrPair(
            self.template,
            self.science,
            self.template_background,
            self.science_background,
            self.cached if cached is None else cached,
            self.stored if stored is None else stored,
        )

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> tuple[MaskedImage, MaskedImage]:
        read = "read_stored" if self.stored else "read"
        t = getattr(self.template, read)(y0, y1, x0, x1, cached=self.cached)
        s = getattr(self.science, read)(y0, y1, x0, x1, cached=self.cached)
        if self.template_background is not None:
            t.image = t.image - _read_array(self.template_background, y0, y1, x0, x1)
        if self.science_background is not None:
            s.image = s.image - _read_array(self.science_background, y0, y1, x0, x1)
        return t, s


def _in_task_process(fn, *args):
    """``fn(*args)`` in a process made ready for diffkernel's tasks.

    Every task goes through here (:func:`diffkernel.pipeline.dask.taskproc.prepare_task_process`:
    single-threaded BLAS, and glibc's memory thresholds where Dask's nanny lowered
    them), whatever started the worker.
    """
    prepare_task_process()
    return fn(*args)


def _read_array(ref: tuple[str, str], y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    import zarr

    path, name = ref
    return np.asarray(zarr.open_array(path, path=name, mode="r")[y0:y1, x0:x1], dtype=np.float64)


def default_tile_size(chunks: tuple[int, int], shape: tuple[int, int] | None = None) -> int:
    """Subtraction tile side: a multiple of the chunk side, at most 1024.

    The largest such tile, unless the image would then have fewer than four tiles
    (too few to keep two workers busy), when the largest one that gives four is taken.
    """
    c = max(int(chunks[0]), int(chunks[1]))
    tile = c * max(1, 1024 // c)
    if shape is not None:
        while tile > c and -(-shape[0] // tile) * -(-shape[1] // tile) < 4:
            tile -= c
    return tile


@contextlib.contextmanager
def connect(
    client=None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: bool = False,
) -> Iterator[Any]:
    """A ``distributed.Client``: the one given, one to ``scheduler``, or a LocalCluster.

    Parameters
    ----------
    client : distributed.Client, optional
        Used as is (not closed).
    scheduler : str, optional
        Address such as ``tcp://host:8786`` of a running scheduler.
    n_workers : int, optional
        Worker processes of the LocalCluster started when neither is given
        (default: one per core), each single-threaded.
    progress : bool
        Print the dashboard link.
    """
    from distributed import Client, LocalCluster

    if client is not None:
        yield client
        return
    if scheduler is not None:
        try:
            own = Client(scheduler, timeout="20s")
        except OSError as err:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from err
        try:
            if progress:
                print(f"diffkernel: scheduler {scheduler}, dashboard {own.dashboard_link}")
            yield own
        finally:
            own.close()
        return
    workers = n_workers or os.cpu_count() or 1
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENVIRON}),
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
        ) as cluster,
        Client(cluster) as own,
    ):
        if progress:
            print(f"diffkernel: LocalCluster of {workers} workers, dashboard {own.dashboard_link}")
        yield own


def _open(image, name: str) -> ZarrImage:
    if isinstance(image, ZarrImage):
        return image
    if isinstance(image, tuple):
        return ZarrImage.open(*image)
    if isinstance(image, (str, os.PathLike)):
        return ZarrImage.open(image)
    raise InputError(
        f"{name} must be a ZarrImage, a store path or (path, group), got {type(image).__name__}"
    )


# --- tasks (module-level functions: they run in the workers) ---------------------------------


def _check_tile(
    image: ZarrImage, y0: int, y1: int, x0: int, x1: int, exempt
) -> tuple[dict[str, int], dict[str, str]]:
    """Validation counts of one tile, and the SHA-256 of each of its planes.

    The planes are checked and hashed in their stored dtype: no float64 copy, and the
    digest covers the bytes of the store's values (with their dtype).
    """

    planes = image.read_planes(y0, y1, x0, x1)
    digests = {}
    for name, values in planes.items():
        values = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
        if values.dtype.kind in "iu" and not values.any():  # an empty mask tile: the usual case
            digests[name] = _zeros_digest(values.dtype.str, values.shape)
        else:
            digests[name] = _plane_digest(values)
    counts = pixel_validation_counts(
        planes["image"],
        planes["variance"],
        planes["mask"],
        plane_bits(image.mask_planes, exempt),
        unusable_planes(image.mask_planes, exempt),
    )
    return counts, digests


def _plane_digest(values: np.ndarray) -> str:
    """SHA-256 of a contiguous little-endian tile: its dtype string, then its bytes."""
    import hashlib

    sha = hashlib.sha256(values.dtype.str.encode())
    sha.update(memoryview(values).cast("B"))
    return sha.hexdigest()


@functools.lru_cache(maxsize=8)
def _zeros_digest(dtype: str, shape: tuple[int, int]) -> str:
    """:func:`_plane_digest` of integer zeros (computed once per dtype and shape)."""
    return _plane_digest(np.zeros(shape, dtype=np.dtype(dtype)))


def _check_named_tiles(
    images: dict[str, ZarrImage], names: list[str], y0: int, y1: int, x0: int, x1: int, exempt
) -> list[tuple[dict[str, int], dict[str, str]]]:
    """:func:`_check_tile` of the same tile of the images ``names``, in one task.

    ``images`` is a scattered dict, so each worker keeps their arrays open.
    """
    return [_check_tile(images[name], y0, y1, x0, x1, exempt) for name in names]


def _combine_digests(image: ZarrImage, name: str, tiles: list[dict[str, str]]) -> str:
    """SHA-256 over the shape and the tiles' digests in row-major tile order."""
    import hashlib

    digest = hashlib.sha256(f"{name} {image.shape} tiles {CHECK_TILE}".encode())
    for tile in tiles:
        digest.update(tile[name].encode())
    return digest.hexdigest()


def _warp_task(
    template: ZarrImage, science_wcs, out: str, y0: int, y1: int, x0: int, x1: int, config
) -> bool:
    tile, covered = warp_region(
        lambda a, b, c, d: template.read(a, b, c, d),
        template.wcs,
        template.shape,
        template.mask_planes,
        science_wcs,
        y0,
        y1,
        x0,
        x1,
        config,
    )
    write_tile(out, "aligned_template", y0, x0, tile.image, tile.variance, tile.mask)
    return covered


def _background_task(image: ZarrImage, config, out: str, name: str, chunks) -> tuple[str, str]:
    import zarr

    from ...prep.background import mesh_background

    ny, nx = image.shape
    background = mesh_background(image.read(0, ny, 0, nx), config)
    root = zarr.open_group(out, mode="r+")
    array = root.create_array(
        f"backgrounds/{name}", shape=background.shape, chunks=chunks, dtype=np.float64
    )
    array[:] = background
    return out, f"backgrounds/{name}"


def _detect_task(reader: ZarrPair, on_template: bool, cfg: MakeKernelConfig, saturation):
    from ...prep.sources import detect_sources

    kcfg = cfg.kernel.active
    ny, nx = reader.science.shape
    template, science = reader(0, ny, 0, nx)
    guess_half = kcfg.detectionConfig.stamp_half_width(kcfg.kernelSize)
    return detect_sources(
        template if on_template else science,
        cfg.selectDetection,
        cfg.selectMeasurement,
        tuple(kcfg.badMaskPlanes),
        guess_half,
        kcfg.detectionConfig,
        saturation,
    )


def _cells_task(plan, work, reader) -> CellResult:
    return CellResult.merge(
        [fit_cell(plan, cell, index, xc, yc, reader) for cell, index, xc, yc in work]
    )


def _reduce_task(plan, placement, *results):
    return reduce_cells(plan, placement, list(results))


def _device_ready(device: str) -> str:
    """Raise in a worker that cannot run the convolutions on ``device``."""
    return array_backend(device).device


def _solution_of(reduction) -> SpatialSolution:
    """The kernel and background model of a reduction's outcome."""
    return reduction[0].solution


def _tile_task(
    kernels: SubtractionKernels,
    reader: ZarrPair,
    planes: dict[str, int],
    out: str,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    sign: float = 1.0,
    footprints: tuple[np.ndarray, np.ndarray, float] | None = None,
) -> np.ndarray:
    """Write one tile of the difference; its sky and footprint z histograms.

    ``footprints`` is ``(xc, yc, radius)`` of the candidates near the tile
    (:func:`diffkernel.quality.difference_histograms`).
    """
    ny, nx = reader.science.shape
    h = kernels.half
    ty0, ty1, tx0, tx1 = max(y0 - h, 0), min(y1 + h, ny), max(x0 - h, 0), min(x1 + h, nx)
    # The check stage validated every pixel: read them as stored (no float64 copies).
    template = reader.template.read_stored(ty0, ty1, tx0, tx1)
    t_bg = s_bg = None
    if reader.template_background is not None:
        t_bg = _read_array(reader.template_background, ty0, ty1, tx0, tx1)
        s_bg = _read_array(reader.science_background, y0, y1, x0, x1)
    template = prepare_template(template, planes, t_bg)
    science = prepare_science(reader.science.read_stored(y0, y1, x0, x1), planes, s_bg)
    padded = padded_template(template, y0, y1, x0, x1, h, origin=(ty0, tx0))
    diff, var, mask = difference_tile(padded, science, kernels, y0, x0, (ny, nx))
    if sign < 0:  # convolveScience: K * S + b - T, science minus template
        diff = -diff
    write_tile(out, "difference", y0, x0, diff, var, mask)
    xc, yc, radius = footprints if footprints is not None else (np.zeros(0, int),) * 2 + (0.0,)
    return difference_histograms(diff, var, mask, (y0, x0), xc, yc, radius)


# --- the driver --------------------------------------------------------------------------------


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
) -> PairRun:
    """Fit the PSF-matching kernel of a pair stored in Zarr and write the difference.

    Parameters
    ----------
    science, template : ZarrImage, path or (path, group)
        Image groups (see :mod:`diffkernel.io.zarr.store`); the template is warped onto the
        science grid when their WCS differ (``warpingConfig.doAlign``).
    out : path
        Result store to publish; refused if it exists unless ``overwrite``.
    config : MakeKernelConfig, optional
        Default: :meth:`MakeKernelConfig.default_subtraction` (Alard-Lupton with a
        fitted differential background), since stored images may hold their sky.
    sources : astropy.table.Table, optional
        Kernel candidates (``x``, ``y`` or ``ra``, ``dec``); detected when None.
    client, scheduler, n_workers
        Where to run (see :func:`connect`).
    tile_size : int, optional
        Side of the subtraction tiles, a multiple of the science chunks (default:
        :func:`default_tile_size`). Results do not depend on it.
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

    Returns
    -------
    PairRun
    """
    cfg = MakeKernelConfig.default_subtraction() if config is None else config
    if not isinstance(cfg, MakeKernelConfig):
        raise ConfigError(f"config must be a MakeKernelConfig, got {type(cfg).__name__}")
    cfg.validate()
    sci = _open(science, "science")
    tmpl = _open(template, "template")
    tile = default_tile_size(sci.chunks, sci.shape) if tile_size is None else int(tile_size)
    if tile <= 0 or tile % sci.chunks[0] or tile % sci.chunks[1]:
        raise ConfigError(
            f"tile_size {tile} must be a positive multiple of the science chunks {sci.chunks} "
            "(tiles write whole chunks)"
        )
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    check_fft_options(precision, device)
    if cells_per_task is not None and int(cells_per_task) < 1:
        raise ConfigError(f"cells_per_task must be at least 1, got {cells_per_task}")
    if sources is not None and not isinstance(sources, Table):
        raise InputError(f"sources must be an astropy Table, got {type(sources).__name__}")
    writer = ResultWriter(out, overwrite=overwrite)
    try:
        with connect(client, scheduler, n_workers, progress) as cl:
            if device != "cpu":
                cl.run(_device_ready, device)  # raises the first worker's ConfigError
            run = _Run(
                cl, cfg, sci, tmpl, writer, tile, progress, cells_per_task, mode, precision, device
            )
            run.extra_provenance = dict(provenance or {})
            path, timings, summary = run.execute(sources, preconvolved)
    except BaseException:
        writer.abort()
        raise
    return PairRun(open_result(path), timings, summary)


class _Run:
    """One pair on one client: the stages of :func:`run_pair`."""

    def __init__(
        self,
        client,
        cfg,
        science,
        template,
        writer,
        tile,
        progress,
        cells_per_task=None,
        mode="convolveTemplate",
        precision="single",
        device="cpu",
    ) -> None:
        self.cells_per_task = cells_per_task
        self.precision = precision
        self.device = device
        self.mode = mode
        self.client = client
        self.cfg = cfg
        self.kcfg = cfg.kernel.active
        self.science = science
        self.template = template
        self.writer = writer
        self.partial = str(writer.partial_path)
        self.tile = tile
        self.progress = progress
        self.token = uuid.uuid4().hex[:8]
        self.timings: dict[str, float] = {}
        self.meta: dict[str, Any] = {}

    def _wait(self, futures, stage: str, started: float, gather: bool = True) -> list | None:
        """Wait for a stage's tasks; their results, or None when ``gather`` is False.

        Results the driver does not need (the cells' statistics, which the reduction
        task fetches from the workers) stay on the workers: gathering them would
        ship and unpickle tens of MB through this process for nothing.
        """
        from distributed import progress, wait

        if self.progress:
            print(f"diffkernel: {stage} ({len(futures)} tasks)")
            progress(futures)
            print()
        values = None
        if gather:
            values = self.client.gather(futures)
        else:
            wait(futures)
            for future in futures:
                if future.status == "error":
                    future.result()  # raises the task's exception here
        self.timings[stage] = time.perf_counter() - started
        return values

    def _submit(self, fn, *args, name: str, **kwargs):
        return self.client.submit(
            _in_task_process, fn, *args, key=f"{name}-{self.token}", pure=False, **kwargs
        )

    def execute(self, sources: Table | None, preconvolved: bool):
        cl = self.client
        kcfg = self.kcfg
        sci, tmpl = self.science, self.template
        started = time.perf_counter()
        aligned = _needs_alignment(tmpl, sci, kcfg)
        if not aligned and tmpl.shape != sci.shape:
            raise InputError(
                f"template shape {tmpl.shape} differs from science shape {sci.shape}; "
                "give both a WCS (alignment) or warp the template first"
            )
        # The check runs alongside what follows; every step that reads pixels before
        # the cells (alignment, backgrounds, detection, FWHMs) first waits for it
        # (_validated), and the cells are submitted before it is waited for.
        self._submit_check(tmpl, sci)
        if aligned:
            t0 = time.perf_counter()
            tmpl = self._align(tmpl, sci)
            self.meta["aligned"] = True
        else:
            self.meta["aligned"] = False
        self.meta["preconvolved"] = bool(preconvolved)

        t0 = time.perf_counter()
        reader = ZarrPair(tmpl, sci)
        if kcfg.useAfwBackground:
            self._validated()
            refs = [
                self._submit(
                    _background_task,
                    img,
                    kcfg.afwBackgroundConfig,
                    self.partial,
                    who,
                    img.chunks,
                    name=f"background-{who}",
                )
                for who, img in (("template", tmpl), ("science", sci))
            ]
            t_ref, s_ref = self._wait(refs, "background", t0)
            reader = ZarrPair(tmpl, sci, tuple(t_ref), tuple(s_ref))
        if sources is None:
            self._validated()
            det_exp = tmpl if kcfg.detectionConfig.detOnTemplate else sci
            saturation = next(
                (float(det_exp.meta[k]) for k in SATURATION_KEYS if k in det_exp.meta), None
            )
            fut = self._submit(
                _detect_task,
                reader,
                bool(kcfg.detectionConfig.detOnTemplate),
                self.cfg,
                saturation,
                name="detect",
            )
            sources = self._wait([fut], "detect", time.perf_counter())[0]
            self.meta["detected_sources"] = len(sources)
        if len(sources) == 0:
            raise NoCandidatesError("kernelSources is empty: no stars to fit a kernel on")
        x, y = source_positions(sources, sci)
        ids = np.asarray(sources["id"]) if "id" in sources.colnames else np.arange(len(sources))
        by_id = np.argsort(ids, kind="stable")  # as MakeKernelTask: order-independent
        fwhm_t, fwhm_s = self._fwhms(reader, x[by_id], y[by_id])
        if preconvolved and fwhm_s is not None:
            fwhm_s *= np.sqrt(2.0)
        self.meta["template_fwhm"], self.meta["science_fwhm"] = fwhm_t, fwhm_s
        require_fwhms(kcfg, fwhm_t, fwhm_s)
        mode = choose_mode(self.mode, fwhm_t, fwhm_s)
        self.meta["mode"] = mode
        if mode == "convolveScience":
            # The kernel matches the science image to the template: swap the roles.
            reader = ZarrPair(sci, tmpl, reader.science_background, reader.template_background)
            fwhm_t, fwhm_s = fwhm_s, fwhm_t
        basis = basis_from_config(kcfg, fwhm_t, fwhm_s)
        self.meta["basis"] = {
            "kind": basis.kind,
            "size": basis.size,
            "kernel_size": basis.kernel_size,
            **basis.description,
        }
        self.timings["prepare"] = time.perf_counter() - t0

        plan = make_cell_plan(self.cfg, basis, sci.shape)
        placement = SourcePlacement.from_positions(ids, x, y, plan)
        # hash=False: a content-hashed key would be shared by concurrent identical
        # runs on one client (a batch), and one run releasing it loses the other's.
        plan_f = cl.scatter(plan, broadcast=True, hash=False)
        cell_reader_f = cl.scatter(reader.reading(stored=True), broadcast=True, hash=False)
        t0 = time.perf_counter()
        cells = self._cell_order(placement.cells(), sci.chunks)
        t_submit = time.perf_counter()
        groups = self._cell_groups(cells, (self.tile, self.tile))
        # Largest groups first (by sources to measure), so that no worker is left with
        # a big one at the end while the others wait; the reduction restores cell order.
        sizes = [sum(len(idx) for _, idx in group) for group in groups]
        groups = [groups[i] for i in sorted(range(len(groups)), key=lambda i: -sizes[i])]
        cell_futures = [
            self._submit(
                _cells_task,
                plan_f,
                [(cell, idx, placement.xc[idx], placement.yc[idx]) for cell, idx in group],
                cell_reader_f,
                name=f"cell-{group[0][0]}",
            )
            for group in groups
        ]
        self.timings["cells_submit"] = time.perf_counter() - t_submit
        if not cell_futures:
            raise NoCandidatesError(
                f"none of the {len(x)} sources has its stamp inside the image; no kernel candidates"
            )
        # reader.template is the convolved image, reader.science the reference. The
        # output arrays are made while the workers fit the cells.
        planes = merged_mask_planes(reader.science.mask_planes, reader.template.mask_planes)
        self.writer.create_difference(sci.shape, sci.chunks, planes, sci.wcs, sci.origin, sci.meta)
        checksums = self._validated()  # a bad input stops the run here, cells or not
        self._wait(cell_futures, "cells", t0, gather=False)

        t0 = time.perf_counter()
        reductions = [self._submit(_reduce_task, plan_f, placement, *cell_futures, name="reduce")]

        def reduce_again(attempt: int):
            reductions.append(
                self._submit(
                    _reduce_task, plan_f, placement, *cell_futures, name=f"reduce-again{attempt}"
                )
            )
            return reductions[-1]

        # Only the kernels come back before the tiles start (kilobytes); the candidate
        # table follows while the tiles run.
        if self.progress:
            print("diffkernel: reduce (1 task)")
        solution = self._gather_redoing(
            self._submit(_solution_of, reductions[-1], name="solution"),
            lambda attempt: self._submit(
                _solution_of, reduce_again(attempt), name=f"solution-again{attempt}"
            ),
        )
        self.timings["reduce"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        # The kernels go to every worker: left on the one that made them, the tile
        # tasks would all be scheduled there (data locality).
        kernels = cl.scatter(
            SubtractionKernels(solution, self.precision, self.device), broadcast=True, hash=False
        )
        self.meta["fft_precision"] = self.precision
        self.meta["device"] = self.device
        # Scattered once: a worker then keeps one reader whose arrays stay open (a task
        # shipping its own copy would reopen six Zarr arrays, ~20 ms).
        tile_reader = cl.scatter(reader.reading(cached=False), broadcast=True, hash=False)
        sign = -1.0 if mode == "convolveScience" else 1.0
        ny, nx = sci.shape
        placed = placement.cell >= 0
        xc_all, yc_all = placement.xc[placed], placement.yc[placed]
        radius = footprint_radius(basis.kernel_size)

        def near(y0: int, y1: int, x0: int, x1: int):
            r = int(np.ceil(radius))
            keep = (xc_all >= x0 - r) & (xc_all < x1 + r) & (yc_all >= y0 - r) & (yc_all < y1 + r)
            return xc_all[keep], yc_all[keep], radius

        tiles = [
            self._submit(
                _tile_task,
                kernels,
                tile_reader,
                planes,
                self.partial,
                y0,
                min(y0 + self.tile, ny),
                x0,
                min(x0 + self.tile, nx),
                sign,
                near(y0, min(y0 + self.tile, ny), x0, min(x0 + self.tile, nx)),
                name=f"tile-{y0}-{x0}",
            )
            for y0 in range(0, ny, self.tile)
            for x0 in range(0, nx, self.tile)
        ]
        outcome, table, solve_meta = self._gather_redoing(reductions[-1], reduce_again)
        self.meta.update(solve_meta)
        reductions.clear()  # the cells' results can go now
        cell_futures.clear()
        self.writer.write_fit(outcome.solution, table)  # while the tiles run
        histograms = np.sum(self._wait(tiles, "tiles", t0), axis=0)

        summary = _summary(table, outcome, histograms.sum(axis=0))
        quality = assess(table, self.meta, outcome.solution, kcfg, histograms)
        summary["quality"] = {k: quality[k] for k in ("verdict", "reasons")}
        self.meta["residuals"] = summary["residuals"]
        self.meta["n_cells"] = len(cells)
        self.meta["n_cell_tasks"] = len(groups)
        self.meta["n_tiles"] = len(tiles)
        self.meta["tile_size"] = self.tile
        self.timings["total"] = time.perf_counter() - started
        self.meta["timings"] = dict(self.timings)
        provenance = _provenance(self.science, self.template, checksums)
        provenance.update(getattr(self, "extra_provenance", {}))
        path = self.writer.finalize(
            None,
            None,
            self.meta,
            self.cfg.to_dict(),
            provenance,
            quality=quality,
            z_histograms=histograms,
        )
        return path, dict(self.timings), summary

    def _submit_check(self, tmpl: ZarrImage, sci: ZarrImage) -> None:
        """Submit the validation and hashing of both inputs, tile by tile (read once).

        The checksum of a plane is a SHA-256 over its fixed 1024-px tiles' digests.
        :meth:`_validated` waits for the outcome.
        """
        self._check_started = time.perf_counter()
        self._exempt = tuple(dict.fromkeys(("NO_DATA",) + tuple(self.kcfg.badMaskPlanes)))
        self._checked_images = {"template": tmpl, "science": sci}
        self._check_grids = {
            who: [
                (y0, min(y0 + CHECK_TILE, image.shape[0]), x0, min(x0 + CHECK_TILE, image.shape[1]))
                for y0 in range(0, image.shape[0], CHECK_TILE)
                for x0 in range(0, image.shape[1], CHECK_TILE)
            ]
            for who, image in self._checked_images.items()
        }
        # One task per tile checks it in both images when they share the grid.
        self._check_owners: dict[tuple[int, int, int, int], list[str]] = {}
        for who, boxes in self._check_grids.items():
            for box in boxes:
                self._check_owners.setdefault(box, []).append(who)
        # The images go to every worker once, so each keeps its arrays open. (In a list:
        # a scattered dict would name its futures by its keys, shared by concurrent runs.)
        self._check_images_f = self.client.scatter(
            [self._checked_images], broadcast=True, hash=False
        )[0]
        self._check_futures = {box: self._submit_check_tile(box) for box in self._check_owners}
        self._checksums: dict[tuple[str, str], str] | None = None

    def _submit_check_tile(self, box: tuple[int, int, int, int], attempt: int = 0):
        suffix = f"-again{attempt}" if attempt else ""
        return self._submit(
            _check_named_tiles,
            self._check_images_f,
            self._check_owners[box],
            *box,
            self._exempt,
            name=f"check-{box[0]}-{box[2]}{suffix}",
        )

    def _gather_redoing(self, future, redo, attempts: int = 3):
        """The result of ``future``; ``redo(attempt)`` makes a new one if it is cancelled.

        A worker lost while a result is being fetched from it can leave the future
        cancelled ("already forgotten") instead of computed again (seen in
        distributed 2026.8 when a worker is killed during the driver's gather).
        """
        from distributed.client import FutureCancelledError

        for attempt in range(1, attempts + 1):
            try:
                return self.client.gather(future)
            except FutureCancelledError:
                if attempt == attempts:
                    raise
                future = redo(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def _gather_checks(self) -> dict[tuple[int, int, int, int], Any]:
        """The check tasks' results by tile.

        The cells run meanwhile, so a worker may be lost while a check result is
        being fetched from it; distributed can then cancel that future ("already
        forgotten") instead of computing it again. Such a tile is checked again
        (:meth:`_gather_redoing`).
        """
        return {
            box: self._gather_redoing(
                future, lambda attempt, box=box: self._submit_check_tile(box, attempt)
            )
            for box, future in self._check_futures.items()
        }

    def _validated(self) -> dict[tuple[str, str], str]:
        """Wait for the check (once): raise on invalid inputs, else their checksums."""
        if self._checksums is not None:
            return self._checksums
        done = self._gather_checks()
        checksums = {}
        for who, image in self._checked_images.items():
            owners = self._check_owners
            results = [done[box][owners[box].index(who)] for box in self._check_grids[who]]
            counts = [r[0] for r in results]
            total = {k: sum(c[k] for c in counts) for k in counts[0]}
            report_validation(who, total, self._exempt)
            for name in ("image", "variance", "mask"):
                checksums[(who, name)] = _combine_digests(image, name, [r[1] for r in results])
        self.timings["check"] = time.perf_counter() - self._check_started
        self._checksums = checksums
        return checksums

    def _align(self, tmpl: ZarrImage, sci: ZarrImage) -> ZarrImage:
        check_wcs(tmpl.wcs, sci.wcs)
        self._validated()
        planes = with_mask_planes(tmpl.mask_planes, ("NO_DATA", "EDGE"))
        chunk = sci.chunks[0] if WARP_TILE % sci.chunks[0] == 0 else 256
        import zarr

        root = zarr.open_group(self.partial, mode="r+")
        create_image_arrays(
            root,
            "aligned_template",
            sci.shape,
            (chunk, chunk),
            planes,
            wcs_header=sci.wcs,
            origin=sci.origin,
            dtype=np.float64,
            meta=tmpl.meta,
        )
        wcs = sci.wcs
        t0 = time.perf_counter()
        futures = [
            self._submit(
                _warp_task,
                tmpl,
                wcs,
                self.partial,
                y0,
                y1,
                x0,
                x1,
                self.kcfg.warpingConfig,
                name=f"warp-{y0}-{x0}",
            )
            for y0, y1, x0, x1 in warp_tiles(sci.shape)
        ]
        check_overlap(self._wait(futures, "align", t0))
        return ZarrImage.open(self.partial, "aligned_template")

    def _fwhms(self, reader, x, y) -> tuple[float | None, float | None]:
        kcfg = self.kcfg
        fwhm_t = exposure_fwhm(self.template, kcfg.fwhmExposureGrid, kcfg.fwhmExposureBuffer)
        fwhm_s = exposure_fwhm(self.science, kcfg.fwhmExposureGrid, kcfg.fwhmExposureBuffer)
        if not kcfg.scaleByFwhm or (fwhm_t is not None and fwhm_s is not None):
            return fwhm_t, fwhm_s
        self._validated()
        fut = self._submit(
            measure_pair_fwhm,
            reader,
            x,
            y,
            self.science.shape,
            tuple(kcfg.badMaskPlanes),
            (fwhm_t is None, fwhm_s is None),
            name="fwhm",
        )
        mt, ms = self._wait([fut], "fwhm", time.perf_counter())[0]
        return (mt if fwhm_t is None else fwhm_t), (ms if fwhm_s is None else fwhm_s)

    def _chunk_of(self, cell: int, chunks) -> tuple[int, int]:
        kcfg = self.kcfg
        n_cells_x = -(-self.science.shape[1] // int(kcfg.sizeCellX))
        cy, cx = divmod(cell, n_cells_x)
        return cy * int(kcfg.sizeCellY) // chunks[0], cx * int(kcfg.sizeCellX) // chunks[1]

    def _cell_order(self, cells, chunks) -> list[tuple[int, np.ndarray]]:
        """Cells sorted by the chunk they start in, so a worker's cache stays warm."""
        return sorted(cells, key=lambda item: (self._chunk_of(item[0], chunks), item[0]))

    def _cell_groups(self, cells, block) -> list[list[tuple[int, np.ndarray]]]:
        """Cells per task: ``cells_per_task`` of them, or (default) those of one block."""
        if self.cells_per_task is not None:
            n = self.cells_per_task
            return [cells[i : i + n] for i in range(0, len(cells), n)]
        groups: dict[tuple[int, int], list] = {}
        for item in cells:
            groups.setdefault(self._chunk_of(item[0], block), []).append(item)
        return list(groups.values())


def _summary(table: Table, outcome, histogram: np.ndarray) -> dict[str, Any]:
    """Candidates per stage, kernel-sum range and residual statistics of the difference."""
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
        "kernel_sum": [float(ksum.min()), float(ksum.max())] if ksum.size else None,
        "residuals": residuals,
    }


def _provenance(science: ZarrImage, template: ZarrImage, checksums: dict) -> dict[str, Any]:
    import dask
    import distributed
    import scipy
    import zarr

    def describe(who: str, image: ZarrImage) -> dict[str, Any]:
        return {
            "path": str(image.path),
            "group": image.group,
            "uid": image.uid,
            "shape": list(image.shape),
            "sha256": {name: checksums[(who, name)] for name in ("image", "variance", "mask")},
        }

    return {
        "diffkernel": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "zarr": zarr.__version__,
        "host": platform.node(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": {
            "science": describe("science", science),
            "template": describe("template", template),
        },
    }
