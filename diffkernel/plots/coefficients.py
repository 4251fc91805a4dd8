"""The spatial model of every kernel coefficient and of the background, with what each
candidate measured on its own overlaid (the specification's ``plotKernelSpatialModel``).

Each panel is the model over the image, with the candidates drawn at their positions
in the colour of the value they measured alone, on the panel's colour scale: a
candidate that agrees with the model disappears into it. Panels and colour bars are
placed on a fixed grid in inches, so that no label can reach the next panel.
"""

from __future__ import annotations

import numpy as np

from ..kernel.spatial import SpatialSolution
from .backend import new_figure
from .render import STATUS_COLOURS, tick_labels

__all__ = ["plot_spatial_coefficients"]

# The grid, in inches: panel side, colour bar width and gap, room for the colour bar's
# tick labels, and room above a panel for its title.
_PANEL, _BAR, _BAR_GAP, _BAR_LABELS, _TITLE = 1.55, 0.09, 0.05, 0.55, 0.3
_MARGIN, _HEADER = 0.15, 0.85
_MAX_PANELS = 64  # more than this and only the first coefficients are drawn


def _range(model: np.ndarray, measured: np.ndarray | None) -> tuple[float, float]:
    """The colour range: the model's, widened to the GOOD candidates' measurements."""
    values = [model[np.isfinite(model)]]
    if measured is not None:
        measured = measured[np.isfinite(measured)]
        # The central 80% where there are enough: a few noisy faint stars would
        # otherwise flatten the model to one colour (they show at the scale's ends).
        values.append(np.percentile(measured, [10, 90]) if measured.size >= 10 else measured)
    both = np.concatenate(values)
    if both.size == 0:
        return -1.0, 1.0
    lo, hi = float(both.min()), float(both.max())
    scale = max(abs(lo), abs(hi))
    pad = 0.0
    # A constant model (the kernel sum, when it is conserved) with nothing around it
    # would be one flat colour with a colour bar of identical labels.
    if hi - lo <= 1e-6 * scale:
        pad = 0.005 * scale or 1e-3
    return lo - pad, hi + pad


def plot_spatial_coefficients(
    solution: SpatialSolution,
    shape: tuple[int, int],
    max_terms: int | None = None,
    fits=None,
    columns: int | None = None,
):
    """Every kernel coefficient's spatial model, and the background's, one panel each.

    Parameters
    ----------
    solution : SpatialSolution
        The fitted spatial kernel.
    shape : tuple of int
        ``(ny, nx)`` of the image.
    max_terms : int, optional
        Draw only the first coefficients (default: all of them when the basis has at
        most 64 kernels, else the first 63).
    fits : CandidateFits, optional
        The candidates' own fits (:func:`~diffkernel.plots.stamps.fit_candidates`),
        drawn over each panel: GOOD as circles, BAD as red-rimmed crosses, UNUSED as
        blue-rimmed diamonds, each filled with its measured value's colour.
    columns : int, optional
        Panels per row (default: about as many as rows, at most 7).

    Returns
    -------
    matplotlib.figure.Figure
        One set of axes in inches spanning the figure: the panels and their colour
        bars are one image, their labels texts (a figure's drawing time grows with its
        number of axes; fifty would take seconds).
    """
    from matplotlib import colormaps
    from matplotlib.collections import LineCollection
    from matplotlib.ticker import MaxNLocator

    from .backend import DPI

    ny, nx = shape
    nb = solution.basis.size
    if max_terms is None:
        # Every coefficient, up to a page: a delta-function basis has one per kernel
        # pixel (hundreds), and its spatial model is better seen in the kernel mosaic.
        max_terms = nb if nb <= _MAX_PANELS else _MAX_PANELS - 1
    n_kernel = min(nb, int(max_terms))
    side = int(round(_PANEL * DPI))
    # The models are low-order polynomials: sampled at the panel's own pixels (its
    # separable factors make that as cheap as a coarse grid), they need no resampling.
    xs = (np.arange(side) + 0.5) * nx / side - 0.5
    ys = (np.arange(side) + 0.5) * ny / side - 0.5
    panels = []  # (title, model, measured values or None)
    for j in range(n_kernel):
        title = f"coefficient {j}"
        if j == 0 and solution.basis.conserves_sum:
            title += " = kernel sum"
        measured = fits.coeffs[:, j] if fits is not None else None
        model = solution.kernel_functions.grid_sum(solution.kernel_coeffs[j], xs, ys)
        panels.append((title, model, measured))
    if solution.background_functions is not None:
        measured = fits.background if fits is not None else None
        model = solution.background_functions.grid_sum(solution.background_coeffs, xs, ys)
        panels.append(("background", model, measured))
    n = len(panels)
    cols = columns or min(7, max(1, int(np.ceil(np.sqrt(n * 1.2)))))
    rows = -(-n // cols)
    cell_w = _PANEL + _BAR_GAP + _BAR + _BAR_LABELS
    cell_h = _PANEL + _TITLE
    width = 2 * _MARGIN + cols * cell_w
    height = _HEADER + rows * cell_h + _MARGIN
    fig = new_figure(width, height)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    canvas = np.ones((int(round(height * DPI)), int(round(width * DPI)), 3), dtype=np.float32)
    cmap = colormaps["coolwarm"]
    bar_px = max(int(round(_BAR * DPI)), 1)
    ramp = cmap(np.linspace(0, 1, side))[:, None, :3]
    status = x = y = None
    if fits is not None:
        status = np.asarray(fits.table["status"]).astype(str)
        x = np.asarray(fits.table["x"], dtype=float)
        y = np.asarray(fits.table["y"], dtype=float)
    points = {name: ([], [], []) for name in _STYLE}  # x, y (inches), colours
    frames, tick_marks = [], []
    for k, (title, model, measured) in enumerate(panels):
        row, col = divmod(k, cols)
        left = _MARGIN + col * cell_w
        bottom = height - _HEADER - (row + 1) * cell_h
        good = measured[status == "GOOD"] if measured is not None else None
        vmin, vmax = _range(model, good)
        px0, py0 = int(round(left * DPI)), int(round(bottom * DPI))
        canvas[py0 : py0 + side, px0 : px0 + side] = cmap((model - vmin) / (vmax - vmin))[..., :3]
        bx0 = int(round((left + _PANEL + _BAR_GAP) * DPI))
        canvas[py0 : py0 + side, bx0 : bx0 + bar_px] = ramp
        bar_right = (bx0 + bar_px) / DPI
        frames.append(_box(left, bottom, _PANEL, _PANEL))
        frames.append(_box(bx0 / DPI, bottom, bar_px / DPI, _PANEL))
        ticks = [t for t in MaxNLocator(4).tick_values(vmin, vmax) if vmin <= t <= vmax]
        for tick, label in zip(ticks, tick_labels(ticks), strict=True):
            ty = bottom + (tick - vmin) / (vmax - vmin) * _PANEL
            tick_marks.append([(bar_right, ty), (bar_right + 0.03, ty)])
            ax.text(bar_right + 0.05, ty, label, fontsize=6, va="center", ha="left")
        ax.text(left, bottom + _PANEL + 0.05, title, fontsize=7, ha="left", va="bottom")
        if measured is not None:
            for name, (px, py, colours) in points.items():
                sel = (status == name) & np.isfinite(measured)
                px.extend(left + (x[sel] + 0.5) / nx * _PANEL)
                py.extend(bottom + (y[sel] + 0.5) / ny * _PANEL)
                colours.extend(cmap(np.clip((measured[sel] - vmin) / (vmax - vmin), 0, 1)))
    # The canvas is the figure at its own resolution: as bytes with an alpha plane and
    # no interpolation, Agg copies it instead of resampling it (the costliest step).
    rgba = np.empty((*canvas.shape[:2], 4), dtype=np.uint8)
    rgba[..., :3] = (canvas * 255).round()
    rgba[..., 3] = 255
    ax.imshow(rgba, origin="lower", extent=(0, width, 0, height), interpolation="none",
              zorder=0)  # fmt: skip
    ax.add_collection(LineCollection(frames + tick_marks, colors="0.3", linewidths=0.6))
    for name, (px, py, colours) in points.items():
        if px:
            ax.scatter(px, py, c=colours, **_STYLE[name])
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    functions = solution.kernel_functions
    shown = f"{n_kernel} of {nb}" if n_kernel < nb else f"all {nb}"
    ax.text(_MARGIN, height - 0.1,
            f"Spatial model of the kernel coefficients ({shown}; {functions.model_type}, "
            f"order {functions.order}) and the background, over the {nx} x {ny} px image",
            ha="left", va="top", fontsize=10)  # fmt: skip
    ax.text(_MARGIN, height - 0.42, _legend_text(fits), ha="left", va="top", fontsize=7.5,
            color="0.25")  # fmt: skip
    return fig


def _box(x0: float, y0: float, w: float, h: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x0 + w, y0), (x0 + w, y0 + h), (x0, y0 + h), (x0, y0)]


#: Markers of the candidates' measurements, by status.
_STYLE = {
    "GOOD": dict(marker="o", s=16, edgecolors="black", linewidths=0.6),
    "BAD": dict(marker="X", s=26, edgecolors=STATUS_COLOURS["BAD"], linewidths=0.8),
    "UNUSED": dict(marker="D", s=12, edgecolors=STATUS_COLOURS["UNUSED"], linewidths=0.6),
}


def _legend_text(fits) -> str:
    if fits is None:
        return ("Candidates' own measurements: not drawn (the inputs were not given, or "
                "nothing could be refitted).")  # fmt: skip
    status = np.asarray(fits.table["status"]).astype(str)
    counts = ", ".join(f"{np.sum(status == s)} {s}" for s in ("GOOD", "BAD", "UNUSED")
                       if np.any(status == s))  # fmt: skip
    return (f"Points: each candidate's own single-kernel fit ({counts}), filled with its value "
            "on the panel's colour scale: GOOD black-rimmed circles, BAD red-rimmed crosses, "
            "UNUSED blue-rimmed diamonds.\nColour ranges span the model and the central 80% of "
            "the GOOD candidates' values (beyond: the ends' colours); a point that matches the "
            "model blends into it.")  # fmt: skip
