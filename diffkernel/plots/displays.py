"""The specification's debug displays, one figure each.

ip_diffim shows, while it works: the kernel candidates over the image (good in green,
bad in red, with why), the kernel basis, the spatial kernel sampled across the image,
the spatial cells, and the template, science and difference side by side with their
mask planes. The spatial model of each coefficient is in
:mod:`~diffkernel.plots.coefficients`, the candidates' stamps in
:mod:`~diffkernel.plots.stamps`.

Many small images (kernels) are drawn as one mosaic image in one set of axes: a
figure's drawing time grows with its number of axes, not with its pixels.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table

from ..kernel.spatial import SpatialSolution
from .backend import new_figure
from .render import BAD_MARKERS, STATUS_COLOURS, mask_legend, mask_rgba, sky_norm, tick_labels

__all__ = [
    "plot_candidates",
    "plot_basis",
    "plot_kernel_mosaic",
    "plot_cells",
    "plot_images",
]


def _extent(shape: tuple[int, int], extent) -> tuple[float, float, float, float]:
    """Pixel extent of a display image: given, or the whole image's."""
    if extent is not None:
        return tuple(extent)
    ny, nx = shape
    return (-0.5, nx - 0.5, -0.5, ny - 0.5)


def plot_candidates(
    candidates: Table,
    shape: tuple[int, int],
    image: np.ndarray | None = None,
    *,
    extent=None,
    backdrop: str = "science",
):
    """Candidates over the image: GOOD green circles, BAD red markers by reason, UNUSED blue.

    Parameters
    ----------
    candidates : astropy.table.Table
        The candidate table.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    image : numpy.ndarray, optional
        The backdrop (the science image or the template, where the stars are; any
        resolution), drawn on an asinh stretch from below the sky to the stars.
    extent : tuple of float, optional
        Pixel extent ``(x0, x1, y0, y1)`` of ``image`` (default: the whole image).
    backdrop : str
        What ``image`` is, for the title.
    """
    ny, nx = shape
    fig = new_figure(9.6, 7.6)
    ax = fig.add_axes((0.07, 0.07, 0.645, 0.86))
    if image is not None:
        ax.imshow(image, origin="lower", cmap="gray", norm=sky_norm(image),
                  extent=_extent(shape, extent), interpolation="nearest")  # fmt: skip
    status = np.asarray(candidates["status"]).astype(str)
    reason = np.asarray(candidates["reason"]).astype(str)
    x, y = np.asarray(candidates["x"], float), np.asarray(candidates["y"], float)
    good = status == "GOOD"
    ax.scatter(x[good], y[good], s=70, facecolors="none", edgecolors=STATUS_COLOURS["GOOD"],
               linewidths=1.4, label=f"GOOD ({good.sum()})")  # fmt: skip
    unused = status == "UNUSED"
    if unused.any():
        ax.scatter(x[unused], y[unused], s=50, facecolors="none", marker="D", linewidths=1.0,
                   edgecolors=STATUS_COLOURS["UNUSED"],
                   label=f"UNUSED ({unused.sum()})")  # fmt: skip
    bad = status == "BAD"
    for k, why in enumerate(sorted(set(reason[bad]))):
        sel = bad & (reason == why)
        marker = BAD_MARKERS[k % len(BAD_MARKERS)]
        filled = marker in ("x", "+")
        ax.scatter(x[sel], y[sel], s=55, marker=marker, linewidths=1.4,
                   c=STATUS_COLOURS["BAD"] if filled else "none",
                   edgecolors=None if filled else STATUS_COLOURS["BAD"],
                   label=f"BAD: {why or 'rejected'} ({sel.sum()})")  # fmt: skip
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.tick_params(labelsize=8)
    where = f" over the {backdrop}" if image is not None else ""
    ax.set_title(f"Kernel candidates{where}: {len(status)} sources", fontsize=11)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, borderaxespad=0,
              title="status (count)", title_fontsize=8)  # fmt: skip
    return fig


def _mosaic(images: np.ndarray, cols: int, gap: int) -> np.ndarray:
    """``(n, k, k)`` images on a grid of ``cols`` columns, NaN between them; the first
    image top left."""
    n, k, _ = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (k + gap) - gap, cols * (k + gap) - gap), np.nan)
    for i in range(n):
        r, c = divmod(i, cols)
        y0 = (rows - 1 - r) * (k + gap)
        out[y0 : y0 + k, c * (k + gap) : c * (k + gap) + k] = images[i]
    return out


def plot_basis(solution: SpatialSolution, max_kernels: int | None = None):
    """Every basis kernel (or the first ``max_kernels``), each scaled to its own peak.

    One mosaic: kernel ``i`` divided by its largest absolute value, on one diverging
    colour scale, labelled with its index (and sum) where there is room.
    """
    from matplotlib import colormaps

    images = solution.basis.images
    total = len(images)
    if max_kernels is not None:
        images = images[:max_kernels]
    n, k, _ = images.shape
    peak = np.abs(images).reshape(n, -1).max(axis=1)
    scaled = images / np.where(peak > 0, peak, 1.0)[:, None, None]
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    gap = max(2, k // 3)  # room for a label above each kernel
    mosaic = _mosaic(scaled, cols, gap)
    side = min(11.0, max(4.0, 1.3 * cols))
    height = side * mosaic.shape[0] / mosaic.shape[1] + 1.0
    fig = new_figure(side + 1.0, height)
    ax = fig.add_axes((0.02, 0.3 / height, side / (side + 1.0), (height - 0.8) / height))
    cmap = colormaps["RdBu_r"].with_extremes(bad="white")
    im = ax.imshow(mosaic, origin="lower", interpolation="nearest", cmap=cmap, vmin=-1, vmax=1)
    ax.set_axis_off()
    sums = solution.basis.sums
    sums = np.where(np.abs(sums) < 1e-9, 0.0, sums)  # rounding noise of zero-sum kernels
    if n <= 100:
        for i in range(n):
            r, c = divmod(i, cols)
            y = (rows - 1 - r) * (k + gap) + k - 0.5
            ax.text(c * (k + gap) + k / 2 - 0.5, y + 0.3, f"{i}  Σ={sums[i]:.2g}", ha="center",
                    va="bottom", fontsize=6.5 if n <= 49 else 5)  # fmt: skip
    cax = fig.add_axes((1 - 0.75 / (side + 1.0), 0.3 / height, 0.12 / (side + 1.0),
                        (height - 0.8) / height))  # fmt: skip
    cb = fig.colorbar(im, cax=cax)
    cb.set_label("kernel / its peak |value|", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    shown = f"{n} of {total}" if n < total else f"{total}"
    fig.suptitle(f"{solution.basis.kind} basis: {shown} kernels of {k} x {k} px", fontsize=11,
                 y=1 - 0.1 / height, va="top")  # fmt: skip
    return fig


def plot_kernel_mosaic(solution: SpatialSolution, shape: tuple[int, int], n: int = 5):
    """The spatial kernel on an ``n x n`` grid across the image, with its sum.

    One mosaic on a symmetric diverging scale (asinh, so that the negative lobes, a
    percent of the peak, show) with a colour bar; the image's bottom left kernel is
    at the bottom left.
    """
    from matplotlib import colormaps
    from matplotlib.colors import AsinhNorm

    ny, nx = shape
    xs = np.linspace(0, nx - 1, n)
    ys = np.linspace(0, ny - 1, n)
    gx, gy = np.meshgrid(xs, ys)  # row j: y = ys[j]
    kernels = solution.basis.kernel_image(solution.coefficients_at(gx.ravel(), gy.ravel()))
    k = kernels.shape[-1]
    # _mosaic puts the first image top left: order the rows from the top of the image.
    top_first = kernels.reshape(n, n, k, k)[::-1].reshape(n * n, k, k)
    gap = max(3, k // 3)
    mosaic = _mosaic(top_first, n, gap)
    vmax = float(np.max(np.abs(kernels))) or 1.0
    side = 8.0
    fig = new_figure(side + 1.3, side * mosaic.shape[0] / mosaic.shape[1] + 1.0)
    width, height = fig.get_size_inches()
    ax = fig.add_axes((0.02, 0.2 / height, side / width, (height - 0.7) / height))
    norm = AsinhNorm(linear_width=0.02 * vmax, vmin=-vmax, vmax=vmax)
    im = ax.imshow(mosaic, origin="lower", interpolation="nearest", norm=norm,
                   cmap=colormaps["RdBu_r"].with_extremes(bad="white"))  # fmt: skip
    ax.set_axis_off()
    sums = kernels.sum(axis=(1, 2)).reshape(n, n)
    for j in range(n):
        for i in range(n):
            ax.text(i * (k + gap) + k / 2 - 0.5, j * (k + gap) + k - 0.2,
                    f"({xs[i]:.0f}, {ys[j]:.0f}) Σ={sums[j, i]:.4f}", ha="center", va="bottom",
                    fontsize=6.5)  # fmt: skip
    cax = fig.add_axes(((side + 0.25) / width, 0.2 / height, 0.15 / width,
                        (height - 0.7) / height))  # fmt: skip
    cb = fig.colorbar(im, cax=cax)
    ticks = np.array([-1, -0.1, -0.01, 0, 0.01, 0.1, 1]) * vmax
    cb.set_ticks(ticks, labels=[f"{t:.2g}" for t in ticks])
    cb.ax.tick_params(labelsize=7)
    cb.set_label("kernel value (asinh scale, symmetric about 0)", fontsize=8)
    fig.suptitle(f"Spatial kernel across the image ({n} x {n} positions, x, y in px)",
                 fontsize=11, y=1 - 0.08 / height, va="top")  # fmt: skip
    return fig


def plot_cells(candidates: Table, shape: tuple[int, int], size_x: int, size_y: int):
    """The spatial cells, shaded by their number of GOOD candidates."""
    from matplotlib.ticker import MaxNLocator

    ny, nx = shape
    ncx, ncy = -(-nx // size_x), -(-ny // size_y)
    status = np.asarray(candidates["status"]).astype(str)
    cell = np.asarray(candidates["cell"]).astype(int)
    use = (status == "GOOD") & (cell >= 0) & (cell < ncx * ncy)
    good = np.bincount(cell[use], minlength=ncx * ncy).reshape(ncy, ncx)
    fig = new_figure(8.0, 7.0)
    ax = fig.add_axes((0.08, 0.07, 0.74, 0.85))
    cax = fig.add_axes((0.85, 0.07, 0.025, 0.85))
    im = ax.imshow(good, origin="lower", cmap="Blues", extent=(0, ncx * size_x, 0, ncy * size_y),
                   vmin=0, vmax=max(int(good.max()), 1), aspect="auto")  # fmt: skip
    cb = fig.colorbar(im, cax=cax)
    cb.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    cb.set_label("GOOD candidates in the cell")
    ax.vlines(np.arange(ncx + 1) * size_x, 0, ny, color="0.5", lw=0.3)
    ax.hlines(np.arange(ncy + 1) * size_y, 0, nx, color="0.5", lw=0.3)
    for name in ("GOOD", "BAD", "UNUSED"):
        sel = status == name
        if sel.any():
            ax.scatter(np.asarray(candidates["x"])[sel], np.asarray(candidates["y"])[sel], s=30,
                       c=STATUS_COLOURS[name], edgecolors="black", linewidths=0.4,
                       label=f"{name} ({sel.sum()})")  # fmt: skip
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.04), ncols=3, fontsize=8, frameon=False)
    ax.set_xlim(0, nx)
    ax.set_ylim(0, ny)
    ax.set_title(f"Spatial cells ({size_x}x{size_y} px): {int((good > 0).sum())} of "
                 f"{ncx * ncy} with a GOOD candidate")  # fmt: skip
    return fig


def plot_images(
    template: np.ndarray,
    science: np.ndarray,
    difference: np.ndarray,
    variance: np.ndarray | None = None,
    *,
    masks: tuple | None = None,
    mask_planes: dict[str, int] | None = None,
    mask_transparency: float = 60.0,
    extent=None,
):
    """Template, science and difference side by side, with their mask planes.

    Parameters
    ----------
    template, science, difference : numpy.ndarray
        The images (any one resolution).
    variance : numpy.ndarray, optional
        The difference's variance: the difference is then shown over its sigma, from
        -5 to 5.
    masks : tuple of numpy.ndarray, optional
        The three images' bit masks, overlaid in colour per plane with a legend.
    mask_planes : dict of str to int, optional
        Plane name to bit (default: :data:`diffkernel.image.DEFAULT_MASK_PLANES`).
    mask_transparency : float
        As afw display's ``maskTransparency``: 0 opaque, 100 invisible.
    extent : tuple of float, optional
        Pixel extent ``(x0, x1, y0, y1)`` of the images (default: their own pixels).
    """
    from ..image import DEFAULT_MASK_PLANES

    planes = dict(DEFAULT_MASK_PLANES if mask_planes is None else mask_planes)
    panels = [("template", template), ("science", science)]
    if variance is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            panels.append(("difference / sigma", difference / np.sqrt(variance)))
    else:
        panels.append(("difference", difference))
    panel, bar, gap, labels = 4.3, 0.12, 0.06, 0.75
    bottom = 0.95 if masks is not None else 0.4
    width = 0.55 + 3 * (panel + gap + bar + labels)
    height = panel + bottom + 0.45
    fig = new_figure(width, height)
    for p, (title, image) in enumerate(panels):
        left = 0.55 + p * (panel + gap + bar + labels)
        ax = fig.add_axes((left / width, bottom / height, panel / width, panel / height))
        cax = fig.add_axes(((left + panel + gap) / width, bottom / height, bar / width,
                            panel / height))  # fmt: skip
        box = _extent(image.shape, extent)
        if title.startswith("difference / sigma"):
            im = ax.imshow(image, origin="lower", cmap="gray", vmin=-5, vmax=5, extent=box,
                           interpolation="nearest")  # fmt: skip
        else:
            im = ax.imshow(image, origin="lower", cmap="gray", norm=sky_norm(image), extent=box,
                           interpolation="nearest")  # fmt: skip
        if masks is not None and masks[p] is not None:
            rgba, counts = mask_rgba(masks[p], planes, mask_transparency)
            if counts:
                ax.imshow(rgba, origin="lower", extent=box, interpolation="nearest")
                mask_legend(ax, counts, masks[p].size, mask_transparency)
            else:
                ax.set_xlabel("no mask plane set", fontsize=7)
        ax.set_xlim(box[0], box[1])
        ax.set_ylim(box[2], box[3])
        ax.tick_params(labelsize=7)
        cb = fig.colorbar(im, cax=cax)
        if not title.startswith("difference / sigma"):
            # Evenly spaced on the stretched scale: the default ones crowd at its top.
            ticks = np.atleast_1d(im.norm.inverse(np.linspace(0, 1, 6))).ravel()
            # Rounded to two digits of the spacing, and kept inside the scale.
            spacing = max(float(np.min(np.diff(ticks))), 1e-12)
            ticks = np.unique(np.round(ticks, int(1 - np.floor(np.log10(spacing)))))
            ticks = ticks[(ticks >= im.norm.vmin) & (ticks <= im.norm.vmax)]
            cb.set_ticks(ticks, labels=tick_labels(ticks))
        cb.ax.tick_params(labelsize=7)
        ax.set_title(title, fontsize=10)
    return fig
