"""The Dask tasks of a pair: module-level functions that run in the workers.

Each reads what it needs from Zarr itself (no image goes through the scheduler) and
calls the same function as :class:`diffkernel.MakeKernelTask` on the same region,
so the result equals the in-memory path's. The validation and hashing tasks are in
:mod:`diffkernel.pipeline.dask.checks`.
"""

from __future__ import annotations

import numpy as np

from ...config import MakeKernelConfig
from ...image import MaskedImage
from ...io.zarr.image import ZarrImage
from ...kernel.decorrelate import DifferenceFilters, block_noise
from ...kernel.device import array_backend
from ...kernel.spatial import SpatialSolution
from ...kernel.subtract import (
    SubtractionKernels,
    difference_box,
    prepare_science,
    prepare_template,
)
from ...prep.align import warp_region
from ...quality import difference_histograms
from ..cells import CellResult, fit_cell, reduce_cells
from ..stages import detect_kernel_sources
from .storage import Plane, Workspace
from .taskproc import prepare_task_process

__all__ = [
    "ZarrPair",
    "in_task_process",
    "warp_task",
    "background_task",
    "detect_task",
    "cells_task",
    "reduce_task",
    "device_ready",
    "solution_of",
    "tile_task",
    "noise_task",
]


class ZarrPair:
    """Region reader over a template and a science image in Zarr (picklable).

    Parameters
    ----------
    template, science : ZarrImage
        Aligned images of the same shape.
    template_background, science_background : Plane, optional
        Mesh backgrounds to remove, stored as 2-D arrays.
    cached : bool
        Read through the per-process chunk cache (for many small regions).
    stored : bool
        Give the pixels in their stored dtype, unchecked
        (:meth:`~diffkernel.io.zarr.image.ZarrImage.read_stored`): for the cells, which run
        alongside the check and convert only the stamps they cut to float64.
    """

    def __init__(
        self,
        template: ZarrImage,
        science: ZarrImage,
        template_background: Plane | None = None,
        science_background: Plane | None = None,
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

    def swapped(self) -> ZarrPair:
        """The science image (and its background) as the template, and the other way."""
        return ZarrPair(
            self.science,
            self.template,
            self.science_background,
            self.template_background,
            self.cached,
            self.stored,
        )

    def __call__(self, y0: int, y1: int, x0: int, x1: int) -> tuple[MaskedImage, MaskedImage]:
        return self.one(True, y0, y1, x0, x1), self.one(False, y0, y1, x0, x1)

    def one(self, template: bool, y0: int, y1: int, x0: int, x1: int) -> MaskedImage:
        """A region of the template (``template`` True) or of the science image alone."""
        image, background = (
            (self.template, self.template_background)
            if template
            else (self.science, self.science_background)
        )
        read = "read_stored" if self.stored else "read"
        region = getattr(image, read)(y0, y1, x0, x1, cached=self.cached)
        if background is not None:
            region.image = region.image - background.read(y0, y1, x0, x1)
        return region


def in_task_process(fn, *args):
    """``fn(*args)`` in a process made ready for diffkernel's tasks.

    Every task goes through here (:func:`diffkernel.pipeline.dask.taskproc.prepare_task_process`:
    single-threaded BLAS, and glibc's memory thresholds where Dask's nanny lowered
    them), whatever started the worker.
    """
    prepare_task_process()
    return fn(*args)


def warp_task(
    template: ZarrImage,
    science_wcs,
    workspace: Workspace,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    config,
) -> bool:
    """Warp one tile of the template onto the science grid and write it; whether it is covered."""
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
    workspace.write_image_tile(
        "aligned_template", y0, x0, tile.image, tile.variance, tile.mask
    )
    return covered


def background_task(
    image: ZarrImage, config, workspace: Workspace, name: str, chunks
) -> Plane:
    """Write the mesh background of an image into the workspace; a reference to it."""
    from ...prep.background import mesh_background

    ny, nx = image.shape
    background = mesh_background(image.read(0, ny, 0, nx), config)
    return workspace.write_plane(f"backgrounds/{name}", background, chunks)


def detect_task(reader: ZarrPair, on_template: bool, cfg: MakeKernelConfig, saturation):
    """:func:`~diffkernel.pipeline.stages.detect_kernel_sources` on one whole image."""
    ny, nx = reader.science.shape
    # Only the image detected on, read once, as stored (checked by now; detection
    # makes the one float64 copy it needs): through the chunk cache it would evict
    # what the cells read next, and the other image would double the task's memory.
    image = reader.reading(cached=False, stored=True).one(on_template, 0, ny, 0, nx)
    return detect_kernel_sources(image, cfg, saturation)


def cells_task(plan, work, reader) -> CellResult:
    """The sufficient statistics of a group of cells, ``work`` = (cell, index, xc, yc)."""
    return CellResult.merge(
        [fit_cell(plan, cell, index, xc, yc, reader) for cell, index, xc, yc in work]
    )


def reduce_task(plan, placement, *results):
    """:func:`~diffkernel.pipeline.cells.reduce_cells` of every group's statistics."""
    return reduce_cells(plan, placement, list(results))


def device_ready(device: str) -> str:
    """Raise in a worker that cannot run the convolutions on ``device``."""
    return array_backend(device).device


def solution_of(reduction) -> SpatialSolution:
    """The kernel and background model of a reduction's outcome."""
    return reduction[0].solution


def noise_task(reader: ZarrPair, y0: int, y1: int, x0: int, x1: int) -> tuple[float, float]:
    """:func:`~diffkernel.kernel.decorrelate.block_noise` of one block (convolved, reference)."""
    convolved, reference = reader(y0, y1, x0, x1)
    return block_noise(convolved, reference)


def tile_task(
    kernels: SubtractionKernels,
    reader: ZarrPair,
    planes: dict[str, int],
    workspace: Workspace,
    y0: int,
    y1: int,
    x0: int,
    x1: int,
    sign: float = 1.0,
    footprints: tuple[np.ndarray, np.ndarray, float] | None = None,
    filters: DifferenceFilters | None = None,
) -> np.ndarray:
    """Write one tile of the difference (and score); its sky and footprint z histograms.

    ``footprints`` is ``(xc, yc, radius)`` of the candidates near the tile
    (:func:`diffkernel.quality.difference_histograms`); ``filters`` decorrelate the
    difference and make the score image (:func:`diffkernel.kernel.subtract.difference_box`).
    """
    ny, nx = reader.science.shape
    h = kernels.half
    g = filters.margin if filters is not None else 0
    # The reference over the tile grown by the filters' margin, the convolved image
    # grown by the kernel's half-width more (both clipped to the image).
    sy0, sy1, sx0, sx1 = max(y0 - g, 0), min(y1 + g, ny), max(x0 - g, 0), min(x1 + g, nx)
    ty0, ty1 = max(y0 - g - h, 0), min(y1 + g + h, ny)
    tx0, tx1 = max(x0 - g - h, 0), min(x1 + g + h, nx)
    # The check stage validated every pixel: read them as stored (no float64 copies).
    template = reader.template.read_stored(ty0, ty1, tx0, tx1)
    t_bg = s_bg = None
    if reader.template_background is not None:
        t_bg = reader.template_background.read(ty0, ty1, tx0, tx1)
        s_bg = reader.science_background.read(sy0, sy1, sx0, sx1)
    template = prepare_template(template, planes, t_bg)
    science = prepare_science(reader.science.read_stored(sy0, sy1, sx0, sx1), planes, s_bg)
    diff, var, mask, score = difference_box(
        template, (ty0, tx0), science, (sy0, sx0), kernels, (y0, y1, x0, x1), (ny, nx), sign,
        filters,
    )  # fmt: skip
    workspace.write_image_tile("difference", y0, x0, diff, var, mask)
    if score is not None:
        ones = np.where(np.isfinite(score), 1.0, np.nan)
        workspace.write_image_tile("score", y0, x0, score, ones, mask)
    xc, yc, radius = footprints if footprints is not None else (np.zeros(0, int),) * 2 + (0.0,)
    return difference_histograms(diff, var, mask, (y0, x0), xc, yc, radius)
