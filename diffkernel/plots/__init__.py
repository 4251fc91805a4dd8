"""The specification's debug displays as matplotlib figures.

ip_diffim shows, while it works: the kernel candidates over the image (good and
bad, with why), each candidate's stamps and residuals, the kernel basis, the spatial
kernel sampled across the image, the spatial model of each coefficient with the
candidates' own measurements, the spatial cells, and the template, science and
difference side by side with their mask planes. Each function here draws one of them
on a new figure and returns it; :func:`write_plots` writes them all as PNGs for a
result store. :func:`plot_quality` draws the quality verdict
(:mod:`diffkernel.quality`) and the evidence behind it on one page, for a person to
see what went wrong.

Figures are drawn by Agg directly (no pyplot, see :mod:`~diffkernel.plots.backend`),
many small images as one mosaic in one set of axes, from images reduced by block means
to about the figure's own pixels: each takes half a second of CPU or less
(``benchmarks/bench_plots.py``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .backend import save_figure
from .coefficients import plot_spatial_coefficients
from .displays import (
    plot_basis,
    plot_candidates,
    plot_cells,
    plot_images,
    plot_kernel_mosaic,
)
from .quality_page import plot_quality
from .render import block_factor, block_mean, block_or
from .stamps import CandidateFits, fit_candidates, plot_candidate_stamps

__all__ = [
    "plot_candidates",
    "plot_candidate_stamps",
    "plot_basis",
    "plot_kernel_mosaic",
    "plot_spatial_coefficients",
    "plot_cells",
    "plot_images",
    "plot_quality",
    "fit_candidates",
    "CandidateFits",
    "figure_makers",
    "write_plots",
]


#: Largest side of the images in the side-by-side figure (about its panels' pixels).
_IMAGES_SIDE = 512


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = _clock()
    return wall - start[0], cpu - start[1]


class _Reduced:
    """An image's planes reduced by block means for display (masks OR-ed)."""

    def __init__(self, zimage, max_side: int, difference: bool = False) -> None:
        ny, nx = zimage.shape
        self.factor = f = block_factor((ny, nx), max_side)
        # Read in bands of whole blocks: memory stays at a band's planes, not the image's.
        band = f * max(1, 256 // f)
        image, variance, mask = [], [], []
        for y0 in range(0, ny, band):
            planes = zimage.read_planes(y0, min(y0 + band, ny), 0, nx)
            image.append(block_mean(planes["image"], f))
            if difference:
                variance.append(block_mean(planes["variance"], f))
            mask.append(block_or(planes["mask"], f))
        self.image = np.concatenate(image)
        # The mean of f^2 independent pixels has 1/f^2 of their variance: the reduced
        # difference over its reduced sigma keeps unit noise.
        self.variance = np.concatenate(variance) / f**2 if difference else None
        self.mask = np.concatenate(mask)
        self.planes = zimage.mask_planes
        self._set_extent()

    def _set_extent(self) -> None:
        by, bx = self.image.shape
        f = self.factor
        self.extent = (-0.5, bx * f - 0.5, -0.5, by * f - 0.5)

    def coarser(self, max_side: int) -> _Reduced:
        """The same, reduced further to at most ``max_side`` pixels a side."""
        g = block_factor(self.image.shape, max_side)
        if g == 1:
            return self
        out = object.__new__(_Reduced)
        out.factor = self.factor * g
        out.image = block_mean(self.image, g)
        out.variance = None if self.variance is None else block_mean(self.variance, g) / g**2
        out.mask = block_or(self.mask, g)
        out.planes = self.planes
        out._set_extent()
        return out


def figure_makers(
    result,
    template=None,
    science=None,
    max_side: int = 1024,
    mask_transparency: float = 60.0,
    timings: dict | None = None,
) -> dict[str, Callable]:
    """What :func:`write_plots` draws: the file name of each figure and a function drawing it.

    The images are read and the candidates refitted here, once for every figure;
    ``timings`` (if given) gets their ``read`` and ``fit candidates`` times. The
    parameters are :func:`write_plots`'s.

    Returns
    -------
    dict of str to callable
        Figure name (``candidates``, ``candidate_stamps``, ``basis``,
        ``kernel_mosaic``, ``spatial_coefficients``, ``cells``, ``quality`` and, with
        the inputs, ``images``) to a function of no argument returning the figure.
    """
    from ..errors import StoreError
    from ..io.zarr.image import ZarrImage

    times = {} if timings is None else timings
    shape = result.difference.shape
    solution = result.solution
    kcfg = result.config.get("kernel", {})
    active = kcfg.get(kcfg.get("name", "AL"), {})
    cells = (int(active.get("sizeCellX", 128)), int(active.get("sizeCellY", 128)))
    try:
        template = ZarrImage.open(result.path, "aligned_template")
    except StoreError:  # no alignment was done: the input template is the one
        pass
    have_inputs = template is not None and science is not None
    t0 = _clock()
    diff = _Reduced(result.difference, max_side, difference=True)
    sci = _Reduced(science, max_side) if have_inputs else None
    tpl = _Reduced(template, max_side) if have_inputs else None
    times["read"] = _since(t0)
    t0 = _clock()
    fits = fit_candidates(result, template, science) if have_inputs else None
    times["fit candidates"] = _since(t0)
    backdrop = sci if have_inputs else diff
    makers = {
        "candidates": lambda: plot_candidates(
            result.candidates, shape, backdrop.image, extent=backdrop.extent,
            backdrop="science image" if have_inputs else "difference (no inputs given)",
        ),  # fmt: skip
        "candidate_stamps": lambda: plot_candidate_stamps(fits),
        "basis": lambda: plot_basis(solution),
        "kernel_mosaic": lambda: plot_kernel_mosaic(solution, shape),
        "spatial_coefficients": lambda: plot_spatial_coefficients(solution, shape, fits=fits),
        "cells": lambda: plot_cells(result.candidates, shape, *cells),
        "quality": lambda: plot_quality(
            result.quality,
            result.candidates,
            solution,
            shape,
            getattr(result, "z_histograms", None),  # None in stores older than them
            cells,
        ),
    }
    if have_inputs:
        # Its panels are 430 px wide: more pixels would only be resampled away, slowly.
        small = [r.coarser(min(max_side, _IMAGES_SIDE)) for r in (tpl, sci, diff)]
        makers["images"] = lambda: plot_images(
            small[0].image, small[1].image, small[2].image, small[2].variance,
            masks=tuple(r.mask for r in small), mask_planes=diff.planes,
            mask_transparency=mask_transparency, extent=small[2].extent,
        )  # fmt: skip
    return makers


def write_plots(
    result,
    out_dir: str | os.PathLike,
    template=None,
    science=None,
    max_side: int = 1024,
    mask_transparency: float = 60.0,
    timings: dict | None = None,
) -> list[Path]:
    """Write every debug display of a result, and its quality page, as PNGs into ``out_dir``.

    The quality page (:func:`plot_quality`) is ``quality.png``; stores written before
    verdicts or difference histograms existed get one too, saying what is missing.
    Without the inputs, the candidates are drawn over the difference, and there are
    no stamps, no side-by-side images and no measured values on the spatial model.

    Parameters
    ----------
    result : ResultStore
        A published result (:func:`diffkernel.io.zarr.results.open_result`).
    out_dir : path
        Folder for the PNGs (created).
    template, science : ZarrImage, optional
        The inputs (the aligned template in the result is used when it has one).
    max_side : int
        Images are reduced by block means to at most this many pixels a side.
    mask_transparency : float
        Of the mask overlay, as afw display's ``maskTransparency``: 0 opaque, 100
        invisible.
    timings : dict, optional
        Filled with the seconds each step took: ``read`` (the images), ``fit
        candidates`` (their own fits) and each figure's name (drawing and writing).
        Each value is ``(wall, cpu)``: the process's CPU seconds tell a step's own cost
        on a busy machine.

    Returns
    -------
    list of Path
        The files written.
    """
    times = {} if timings is None else timings
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = figure_makers(result, template, science, max_side, mask_transparency, times)
    written = []
    for name, make in makers.items():
        t0 = _clock()
        path = out / f"{name}.png"
        save_figure(make(), path)
        times[name] = _since(t0)
        written.append(path)
    return written
