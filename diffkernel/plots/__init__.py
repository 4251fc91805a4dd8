"""The specification's debug displays as matplotlib figures.

ip_diffim shows, while it works: the kernel candidates over the image (good and
bad, with why), the kernel basis, the spatial kernel sampled across the image, the
spatial model of each coefficient, the spatial cells, and the template, science and
difference side by side. Each function here draws one of them on a new figure and
returns it; :func:`write_plots` writes them all as PNGs for a result store.
:func:`plot_quality` draws the quality verdict (:mod:`diffkernel.quality`) and the
evidence behind it on one page, for a person to see what went wrong.

Uses the non-interactive Agg backend unless another one was chosen first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .backend import pyplot as _pyplot
from .displays import (
    plot_basis,
    plot_candidates,
    plot_cells,
    plot_images,
    plot_kernel_mosaic,
    plot_spatial_coefficients,
)
from .quality_page import plot_quality

__all__ = [
    "plot_candidates",
    "plot_basis",
    "plot_kernel_mosaic",
    "plot_spatial_coefficients",
    "plot_cells",
    "plot_images",
    "plot_quality",
    "write_plots",
]


def _thumbnail(zimage, name: str, max_side: int) -> np.ndarray:
    """A whole image plane, every k-th pixel so its longer side is at most ``max_side``."""
    ny, nx = zimage.shape
    step = max(1, -(-max(ny, nx) // max_side))
    full = zimage.read(0, ny, 0, nx)
    return getattr(full, name)[::step, ::step]


def write_plots(
    result,
    out_dir: str | os.PathLike,
    template=None,
    science=None,
    max_side: int = 1024,
) -> list[Path]:
    """Write every debug display of a result, and its quality page, as PNGs into ``out_dir``.

    The quality page (:func:`plot_quality`) is ``quality.png``; stores written before
    verdicts or difference histograms existed get one too, saying what is missing.

    Parameters
    ----------
    result : ResultStore
        A published result (:func:`diffkernel.io.zarr.results.open_result`).
    out_dir : path
        Folder for the PNGs (created).
    template, science : ZarrImage, optional
        The inputs, for the side-by-side panel (the aligned template is used when
        the result has one).
    max_side : int
        Images are subsampled to at most this many pixels per side for display.

    Returns
    -------
    list of Path
        The files written.
    """
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shape = result.difference.shape
    solution = result.solution
    kcfg = result.config.get("kernel", {})
    active = kcfg.get(kcfg.get("name", "AL"), {})
    diff_img = _thumbnail(result.difference, "image", max_side)
    figures = {
        "candidates": plot_candidates(result.candidates, shape, diff_img),
        "basis": plot_basis(solution),
        "kernel_mosaic": plot_kernel_mosaic(solution, shape),
        "spatial_coefficients": plot_spatial_coefficients(solution, shape),
        "cells": plot_cells(
            result.candidates,
            shape,
            int(active.get("sizeCellX", 128)),
            int(active.get("sizeCellY", 128)),
        ),  # fmt: skip
        "quality": plot_quality(
            result.quality,
            result.candidates,
            solution,
            shape,
            getattr(result, "z_histograms", None),  # None in stores older than them
            (int(active.get("sizeCellX", 128)), int(active.get("sizeCellY", 128))),
        ),
    }
    from ..errors import StoreError
    from ..io.zarr.image import ZarrImage

    try:
        template = ZarrImage.open(result.path, "aligned_template")
    except StoreError:  # no alignment was done: the input template is the one
        pass
    if template is not None and science is not None:
        figures["images"] = plot_images(
            _thumbnail(template, "image", max_side),
            _thumbnail(science, "image", max_side),
            diff_img,
            _thumbnail(result.difference, "variance", max_side),
        )
    written = []
    for name, fig in figures.items():
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
