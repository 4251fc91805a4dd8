"""The specification's debug displays as matplotlib figures.

ip_diffim shows, while it works: the kernel candidates over the image (good and
bad, with why), the kernel basis, the spatial kernel sampled across the image, the
spatial model of each coefficient, the spatial cells, and the template, science and
difference side by side. Each function here draws one of them on a new figure and
returns it; :func:`write_plots` writes them all as PNGs for a result store.

Uses the non-interactive Agg backend unless another one was chosen first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy.table import Table

from .kernel.spatial import SpatialSolution

__all__ = [
    "plot_candidates",
    "plot_basis",
    "plot_kernel_mosaic",
    "plot_spatial_coefficients",
    "plot_cells",
    "plot_images",
    "write_plots",
]


def _pyplot():
    import matplotlib

    if "MPLBACKEND" not in os.environ and matplotlib.get_backend().lower() not in (
        "agg",
        "module://matplotlib_inline.backend_inline",
    ):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _display(image: np.ndarray) -> tuple[float, float]:
    """Robust display limits (0.5 and 99.5 percentiles of finite pixels)."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def plot_candidates(candidates: Table, shape: tuple[int, int], image: np.ndarray | None = None):
    """Candidates over the image: GOOD green circles, BAD red crosses, UNUSED grey.

    The legend counts the rejection reasons.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 7))
    ny, nx = shape
    if image is not None:  # any resolution: it is stretched over the full pixel range
        lo, hi = _display(image)
        ax.imshow(image, origin="lower", cmap="gray", vmin=lo, vmax=hi,
                  extent=(-0.5, nx - 0.5, -0.5, ny - 0.5), interpolation="nearest")  # fmt: skip
    status = np.asarray(candidates["status"])
    reason = np.asarray(candidates["reason"])
    x, y = np.asarray(candidates["x"]), np.asarray(candidates["y"])
    good = status == "GOOD"
    ax.scatter(x[good], y[good], s=40, facecolors="none", edgecolors="lime",
               label=f"GOOD ({good.sum()})")  # fmt: skip
    unused = status == "UNUSED"
    if unused.any():
        ax.scatter(x[unused], y[unused], s=12, c="0.6", marker=".",
                   label=f"UNUSED ({unused.sum()})")  # fmt: skip
    bad = status == "BAD"
    for why in sorted(set(reason[bad])):
        sel = bad & (reason == why)
        ax.scatter(x[sel], y[sel], s=14, marker="x", linewidths=0.8,
                   label=f"BAD: {why or 'rejected'} ({sel.sum()})")  # fmt: skip
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.set_title("Kernel candidates")
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8)
    return fig


def plot_basis(solution: SpatialSolution, max_kernels: int = 64):
    """The basis kernels, one panel each (the first ``max_kernels``)."""
    plt = _pyplot()
    images = solution.basis.images[:max_kernels]
    n = len(images)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.set_axis_off()
        if i < n:
            lim = np.max(np.abs(images[i])) or 1.0
            ax.imshow(images[i], origin="lower", cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(str(i), fontsize=7)
    fig.suptitle(f"{solution.basis.kind} basis: {solution.basis.size} kernels")
    return fig


def plot_kernel_mosaic(solution: SpatialSolution, shape: tuple[int, int], n: int = 5):
    """The spatial kernel evaluated on an ``n x n`` grid across the image, with its sum."""
    plt = _pyplot()
    ny, nx = shape
    xs = np.linspace(0, nx - 1, n)
    ys = np.linspace(0, ny - 1, n)
    fig, axes = plt.subplots(n, n, figsize=(1.8 * n, 1.8 * n), squeeze=False)
    kernels = {}
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            kernels[j, i] = solution.basis.kernel_image(solution.coefficients_at(x, y))
    vmax = max(np.max(k) for k in kernels.values())
    for (j, i), kernel in kernels.items():
        ax = axes[n - 1 - j, i]
        ax.imshow(kernel, origin="lower", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_axis_off()
        ax.set_title(f"({xs[i]:.0f},{ys[j]:.0f}) Σ={kernel.sum():.4f}", fontsize=6)
    fig.suptitle("Spatial kernel across the image")
    return fig


def plot_spatial_coefficients(
    solution: SpatialSolution, shape: tuple[int, int], max_terms: int = 16
):
    """Each kernel coefficient's spatial model over the image, and the background's."""
    plt = _pyplot()
    ny, nx = shape
    xs = np.linspace(0, nx - 1, 64)
    ys = np.linspace(0, ny - 1, 64)
    coeffs = solution.kernel_coeffs[:max_terms]
    panels = [(f"coefficient {i}", solution.kernel_functions, c) for i, c in enumerate(coeffs)]
    if solution.background_functions is not None:
        panels.append(("background", solution.background_functions, solution.background_coeffs))
    cols = int(np.ceil(np.sqrt(len(panels))))
    rows = int(np.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.2 * rows), squeeze=False)
    for ax in axes.ravel()[len(panels) :]:
        ax.set_axis_off()
    for ax, (title, functions, c) in zip(axes.ravel(), panels, strict=False):
        field = functions.grid_sum(c, xs, ys)
        im = ax.imshow(field, origin="lower", cmap="coolwarm",
                       extent=(0, nx - 1, 0, ny - 1))  # fmt: skip
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(
        f"Spatial model ({solution.kernel_functions.model_type}, order "
        f"{solution.kernel_functions.order})"
    )
    return fig


def plot_cells(candidates: Table, shape: tuple[int, int], size_x: int, size_y: int):
    """The spatial cells, shaded by their number of GOOD candidates."""
    plt = _pyplot()
    ny, nx = shape
    ncx, ncy = -(-nx // size_x), -(-ny // size_y)
    good = np.zeros((ncy, ncx), dtype=int)
    status = np.asarray(candidates["status"])
    cell = np.asarray(candidates["cell"])
    for c in cell[(status == "GOOD") & (cell >= 0)]:
        good[c // ncx, c % ncx] += 1
    fig, ax = plt.subplots(figsize=(7, 7))
    im = ax.imshow(good, origin="lower", cmap="Greens", extent=(0, ncx * size_x, 0, ncy * size_y))
    fig.colorbar(im, ax=ax, fraction=0.046, label="GOOD candidates")
    for gx in range(ncx + 1):
        ax.axvline(gx * size_x, color="0.5", lw=0.3)
    for gy in range(ncy + 1):
        ax.axhline(gy * size_y, color="0.5", lw=0.3)
    ax.scatter(candidates["x"], candidates["y"], s=3, c="k")
    ax.set_xlim(0, nx)
    ax.set_ylim(0, ny)
    ax.set_title(f"Spatial cells ({size_x}x{size_y} px): {int((good > 0).sum())} of "
                 f"{ncx * ncy} with a GOOD candidate")  # fmt: skip
    return fig


def plot_images(template: np.ndarray, science: np.ndarray, difference: np.ndarray,
                variance: np.ndarray | None = None):  # fmt: skip
    """Template, science and difference side by side (difference over sigma if given)."""
    plt = _pyplot()
    panels = [("template", template), ("science", science)]
    if variance is not None:
        panels.append(("difference / sigma", difference / np.sqrt(variance)))
    else:
        panels.append(("difference", difference))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.4))
    for ax, (title, image) in zip(axes, panels, strict=True):
        if title.startswith("difference / sigma"):
            lo, hi = -5.0, 5.0
        else:
            lo, hi = _display(image)
        im = ax.imshow(image, origin="lower", cmap="gray", vmin=lo, vmax=hi,
                       interpolation="nearest")  # fmt: skip
        fig.colorbar(im, ax=ax, fraction=0.046)
        ax.set_title(title)
    return fig


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
    """Write every debug display of a result as PNGs into ``out_dir``.

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
    }
    try:
        from .io.zarr.image import ZarrImage

        template = ZarrImage.open(result.path, "aligned_template")
    except Exception:  # no alignment was done: the input template is the one
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
