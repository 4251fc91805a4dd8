"""The quality page: the verdict and what it rests on, in four panels."""

from __future__ import annotations

import textwrap

import numpy as np
from astropy.table import Table

from ..kernel.spatial import SpatialSolution
from ..quality import Z_BINS, histogram_metrics
from .backend import new_figure

__all__ = ["VERDICT_COLOURS", "plot_quality"]


VERDICT_COLOURS = {"pass": "tab:green", "warn": "darkorange", "fail": "tab:red"}
_NOT_ASSESSED = "0.4"
# Point sizes of the quality page's text; its header is sized from them in inches.
_VERDICT_PT = 16
_REASON_PT = 8.5
_REASON_WIDTH = 180  # characters per reason line: about the width of a 12 inch page


def _say(ax, text: str) -> None:
    """A panel with nothing to draw says why instead of staying blank."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=10,
            color="0.3", wrap=True)  # fmt: skip
    ax.set_xticks([])
    ax.set_yticks([])


def _number(metrics: dict, key: str) -> float | None:
    """A finite metric, or None: stores keep NaN as null (JSON has no NaN)."""
    value = metrics.get(key)
    if isinstance(value, int | float) and np.isfinite(value):
        return float(value)
    return None


def _column_or_nan(candidates: Table, name: str) -> np.ndarray:
    if name not in candidates.colnames:
        return np.full(len(candidates), np.nan)
    return np.ma.filled(np.ma.asarray(candidates[name], dtype=float), np.nan)


def _kernel_sum_panel(ax, fig, quality: dict, candidates: Table, solution, shape) -> None:
    """The spatial kernel sum on a 64 x 64 grid, the GOOD candidates over it."""
    ny, nx = shape
    metrics = quality.get("metrics") or {}
    photometry = metrics.get("photometric_scale") or {}
    x0, y0, x1, y1 = solution.kernel_functions.bbox
    xs, ys = np.meshgrid(np.linspace(x0, x1, 64), np.linspace(y0, y1, 64))
    ksum = solution.coefficients_at(xs, ys) @ solution.basis.sums
    if not np.isfinite(ksum).any():
        ax.set_title("Kernel sum across the field", fontsize=9)
        _say(ax, "the kernel sum is not finite anywhere: the fit failed")
        return
    mean = float(np.nanmean(ksum))
    lo, hi = float(np.nanmin(ksum)), float(np.nanmax(ksum))
    # A kernel sum that is constant to rounding would show its rounding noise as
    # structure: the colour range spans at least +-0.5% of the mean.
    pad = 0.005 * abs(mean) or 1e-3
    vmin, vmax = min(lo, mean - pad), max(hi, mean + pad)
    stars = _number(photometry, "stars_flux_ratio")
    if stars is not None:
        # The stars' ratio on the same colour scale shows how far the fit is from it;
        # a margin keeps its line on the colour bar off the bar's ends.
        margin = 0.03 * (max(vmax, stars) - min(vmin, stars))
        vmin, vmax = min(vmin, stars - margin), max(vmax, stars + margin)
    im = ax.imshow(ksum, origin="lower", cmap="viridis", vmin=vmin, vmax=vmax,
                   extent=(x0, x1, y0, y1), aspect="auto", interpolation="bilinear")  # fmt: skip
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
    cb.ax.yaxis.set_major_formatter(_plain_formatter())
    cb.ax.tick_params(labelsize=7)
    if stars is not None:
        cb.ax.axhline(stars, color="tab:red", lw=2)
        cb.set_label("kernel sum (red: the stars' flux ratio)", fontsize=8)
    else:
        cb.set_label("kernel sum", fontsize=8)
    status = np.asarray(candidates["status"]).astype(str)
    x, y = np.asarray(candidates["x"], float), np.asarray(candidates["y"], float)
    good = status == "GOOD"
    # White with a black rim: visible on every colour of the map and in the legend.
    ax.scatter(x[good], y[good], s=12, c="white", edgecolors="black", linewidths=0.6,
               label=f"GOOD ({int(good.sum())})")  # fmt: skip
    fitted_bad = (status == "BAD") & np.isfinite(_column_or_nan(candidates, "kernel_sum"))
    if fitted_bad.any():
        ax.scatter(x[fitted_bad], y[fitted_bad], s=18, marker="x", c="tab:red", linewidths=1,
                   label=f"rejected in the fit ({int(fitted_bad.sum())})")  # fmt: skip
    if good.any() or fitted_bad.any():
        ax.legend(loc="upper right", fontsize=7, framealpha=0.7)
    ax.set_xlim(-0.5, nx - 0.5)
    ax.set_ylim(-0.5, ny - 0.5)
    ax.tick_params(labelsize=7)
    title = f"Kernel sum across the field: mean {mean:.4g}, range {lo:.4g} to {hi:.4g}"
    if stars is not None:
        title += f"\nstars' flux ratio {stars:.4g}"
        err = _number(photometry, "stars_flux_ratio_err")
        if err is not None:
            title += f" ± {err:.2g}"
        offset = _number(photometry, "kernel_sum_offset")
        if offset is not None:
            title += f" (kernel sum {100 * offset:+.1f}% off it)"
    else:
        title += "\n(no stars' flux ratio to compare with)"
    ax.set_title(title, fontsize=9)


def _plain_formatter():
    from matplotlib.ticker import FormatStrFormatter

    # Not the default's offset notation (+8.96e-1): a reader compares these values
    # with the numbers in the titles.
    return FormatStrFormatter("%.4g")


def _residual_panel(ax, fig, candidates: Table, shape, cell_size) -> None:
    """Median residual std of the GOOD candidates in each spatial cell."""
    from matplotlib import colormaps
    from matplotlib.colors import LogNorm

    ny, nx = shape
    size_x, size_y = int(cell_size[0]), int(cell_size[1])
    ncx, ncy = -(-nx // size_x), -(-ny // size_y)
    status = np.asarray(candidates["status"]).astype(str)
    cell = np.asarray(candidates["cell"]).astype(int)
    # The spatial model's residual is what the difference shows; the single-kernel
    # one stands in for stores or candidates without it.
    values = _column_or_nan(candidates, "spatial_resid_std")
    values = np.where(np.isfinite(values), values, _column_or_nan(candidates, "resid_std"))
    use = (status == "GOOD") & (cell >= 0) & (cell < ncx * ncy) & np.isfinite(values)
    ax.set_title("Residual std of the GOOD candidates per spatial cell\n"
                 "(median, in sigma of the difference: 1 = noise)", fontsize=9)  # fmt: skip
    if not use.any():
        _say(ax, "no GOOD candidate with a residual")
        return
    grid = np.full((ncy, ncx), np.nan)
    for c in np.unique(cell[use]):
        grid[c // ncx, c % ncx] = np.median(values[use & (cell == c)])
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.85")
    extent = (0, ncx * size_x, 0, ncy * size_y)
    # A log scale puts 1 (noise) in the middle, and half and twice the noise equally far.
    im = ax.imshow(grid, origin="lower", cmap=cmap, norm=LogNorm(0.5, 2.0), extent=extent,
                   aspect="auto", interpolation="nearest")  # fmt: skip
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02, extend="both")
    cb.set_ticks([0.5, 0.7, 1.0, 1.4, 2.0])
    cb.ax.yaxis.set_major_formatter(_plain_formatter())
    cb.ax.minorticks_off()
    cb.ax.tick_params(labelsize=7)
    if ncx * ncy <= 144:  # values readable in the cells
        for j, i in zip(*np.nonzero(np.isfinite(grid)), strict=True):
            ax.text((i + 0.5) * size_x, (j + 0.5) * size_y, f"{grid[j, i]:.2f}", fontsize=6.5,
                    ha="center", va="center")  # fmt: skip
    for gx in range(ncx + 1):
        ax.axvline(gx * size_x, color="0.5", lw=0.3)
    for gy in range(ncy + 1):
        ax.axhline(gy * size_y, color="0.5", lw=0.3)
    ax.set_xlim(0, nx)
    ax.set_ylim(0, ny)
    ax.tick_params(labelsize=7)
    empty = int((~np.isfinite(grid)).sum())
    if empty:
        ax.set_xlabel(f"grey: {empty} of {ncx * ncy} cells without a GOOD candidate", fontsize=8)


def _histogram_panel(ax, quality: dict, z_histograms) -> None:
    """Difference / sigma on the sky and on the footprints against N(0, 1)."""
    ax.set_title("Difference / sigma against N(0, 1)", fontsize=9)
    stored = (quality.get("metrics") or {}).get("difference") or {}
    if z_histograms is None:
        # Stores between verdicts and histograms kept the statistics alone.
        lines = ["no difference statistics"]
        for where in ("sky", "footprints"):
            stats = stored.get(where) or {}
            if stats:
                lines.append("\n" + _describe_z(where, stats))
        _say(ax, "\n".join(lines))
        return
    hist = np.asarray(z_histograms, dtype=float)
    step = 20  # 0.01-wide bins summed to 0.2: smooth enough to see a tail
    nbins = (hist.shape[-1] // step) * step
    counts = hist[:, :nbins].reshape(hist.shape[0], -1, step).sum(axis=-1)
    edges = Z_BINS[: nbins + 1 : step]
    width = edges[1] - edges[0]
    floor = np.inf
    for row, where, colour in zip(counts, ("sky", "footprints"), ("tab:blue", "tab:orange"),
                                  strict=False):  # fmt: skip
        n = row.sum()
        if n == 0:
            continue
        stats = stored.get(where) or histogram_metrics(hist[("sky", "footprints").index(where)])
        density = np.where(row > 0, row / (n * width), np.nan)
        ax.stairs(density, edges, color=colour, lw=1.3, label=_describe_z(where, stats))
        floor = min(floor, 0.5 / (n * width))
    z = np.linspace(-8, 8, 401)
    ax.plot(z, np.exp(-0.5 * z**2) / np.sqrt(2 * np.pi), "k--", lw=1,
            label="N(0, 1): std 1,\n6e-5% beyond 5σ")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlim(-8, 8)
    # Room above the peak (0.4) for the legend; down to half a pixel per bin.
    ax.set_ylim(floor if np.isfinite(floor) else 1e-7, 100)
    # Pixels beyond the panel's range still count: say how many there are.
    below, above = int(counts[:, edges[1:] <= -8].sum()), int(counts[:, edges[:-1] >= 8].sum())
    outside = [f"{n:,} px {side}" for n, side in ((below, "< -8"), (above, "> 8")) if n]
    if outside:  # top left: the legend holds the top right, the tails the bottom
        ax.text(0.01, 0.98, "off the panel: " + ", ".join(outside), transform=ax.transAxes,
                ha="left", va="top", fontsize=7, color="0.3")  # fmt: skip
    ax.set_xlabel("difference / sigma (0.2-wide bins)", fontsize=8)
    ax.set_ylabel("density", fontsize=8)
    ax.tick_params(labelsize=7)
    # One column in a corner: a legend wider than the panel would shrink it.
    ax.legend(loc="upper right", fontsize=7, framealpha=0.8)


def _describe_z(where: str, stats: dict) -> str:
    keys = ("median", "robust_std", "fraction_beyond_5sigma")
    if any(_number(stats, k) is None for k in keys):
        return f"{where}: {stats.get('n_pixels', 0):,} px"
    return (
        f"{where}: {stats['n_pixels']:,} px\nmedian {stats['median']:.2f}, robust std "
        f"{stats['robust_std']:.2f}\n{100 * stats['fraction_beyond_5sigma']:.2g}% beyond 5σ"
    )


def _rejection_panel(ax, quality: dict, candidates: Table) -> None:
    """Counts of the BAD sources by reason: the fit's rejections, then vetting's."""
    metrics = (quality.get("metrics") or {}).get("candidates") or {}
    status = np.asarray(candidates["status"]).astype(str)
    reason = np.asarray(candidates["reason"]).astype(str)
    bad = status == "BAD"
    # Vetting rejects sources before any fit; the table holds them as BAD too. Their
    # reasons are the keys of the vetting counts, or (older stores) the unfitted rows.
    vetting = set(metrics.get("vetting_rejected") or {})
    unfitted = ~np.isfinite(_column_or_nan(candidates, "kernel_sum"))
    bars = []  # (label, count, is_vetting)
    for why in sorted(set(reason[bad])):
        rows = bad & (reason == why)
        at_vetting = why in vetting if vetting else bool(unfitted[rows].all())
        label = f"vetting: {why}" if at_vetting else f"fit: {why or 'rejected'}"
        bars.append((label, int(rows.sum()), at_vetting))
    bars.sort(key=lambda b: (b[2], -b[1]))  # the fit's rejections first, they matter more
    n_fit = sum(b[1] for b in bars if not b[2])
    n_vet = sum(b[1] for b in bars if b[2])
    fitted = metrics.get("fitted")
    title = f"Rejected: {n_fit} " + (f"of {fitted} " if fitted is not None else "")
    title += f"fitted candidates,\n{n_vet} sources rejected at vetting"
    ax.set_title(title, fontsize=9)
    if not bars:
        _say(ax, "no candidate was rejected")
        return
    pos = np.arange(len(bars))
    counts = np.array([b[1] for b in bars])
    colours = ["0.6" if b[2] else "tab:red" for b in bars]
    ax.barh(pos, counts, color=colours, height=0.6)
    ax.set_yticks(pos, [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    for p, c in zip(pos, counts, strict=True):
        ax.text(c, p, f" {c}", va="center", fontsize=8)
    ax.set_xlim(0, counts.max() * 1.15)
    ax.set_xlabel("sources", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)


def plot_quality(
    quality: dict,
    candidates: Table,
    solution: SpatialSolution,
    shape: tuple[int, int],
    z_histograms: np.ndarray | None = None,
    cell_size: tuple[int, int] = (128, 128),
):
    """The quality verdict and the evidence behind it, on one page.

    The title gives the verdict (green pass, orange warn, red fail) and its reasons.
    Four panels: the kernel sum across the field with the GOOD candidates (and the
    stars' flux ratio on its colour bar), the GOOD candidates' residual std per
    spatial cell, the histograms of difference / sigma on the sky and on the
    candidates' footprints against N(0, 1), and the rejected sources by reason.

    Parameters
    ----------
    quality : dict
        The verdict (:func:`diffkernel.quality.assess`); empty for stores written
        before verdicts existed (the page then says "not assessed").
    candidates : astropy.table.Table
        The candidate table.
    solution : SpatialSolution
        The fitted kernel and background.
    shape : tuple of int
        ``(ny, nx)`` of the difference image.
    z_histograms : numpy.ndarray, optional
        ``(2, n_bins)`` counts of difference / sigma in :data:`diffkernel.quality.Z_BINS`
        on the sky and on the footprints (``ResultStore.z_histograms``,
        ``MakeKernelResult.differenceHistograms``). Without them the histogram panel
        says so.
    cell_size : tuple of int
        ``(sizeCellX, sizeCellY)`` of the fit's spatial cells.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    After :func:`diffkernel.subtract_images` (``kcfg = result.config.kernel.active``)::

        plot_quality(result.quality, result.candidates, result.spatialSolution,
                     difference.shape, result.differenceHistograms,
                     (kcfg.sizeCellX, kcfg.sizeCellY))
    """
    quality = quality or {}
    verdict = quality.get("verdict")
    if verdict:
        heading = f"Quality: {verdict.upper()}"
        colour = VERDICT_COLOURS.get(verdict, _NOT_ASSESSED)
        reasons = list(quality.get("reasons") or [])
        if not reasons:
            reasons = ["every check passed"]
    else:
        heading, colour = "Quality: NOT ASSESSED", _NOT_ASSESSED
        reasons = ["a store written before verdicts existed: the panels show what it holds"]
    wrapped = [textwrap.fill(r, _REASON_WIDTH, subsequent_indent="    ") for r in reasons]
    # The header grows with the reasons so that none of them is cut off or overlaps.
    line_in = 1.3 * _REASON_PT / 72
    header_in = 0.2 + 1.5 * _VERDICT_PT / 72 + sum(w.count("\n") + 1 for w in wrapped) * line_in
    body_in = 8.5
    height = body_in + header_in
    fig = new_figure(12, height)
    # Fixed places in inches (a layout engine would double the drawing time): room on
    # the left of the rejections for their reasons, above the top panels for titles
    # of two lines, right of the top ones for colour bars (which take their share of
    # the panel's width).
    places = ((0.65, 4.95, 5.3, 3.0), (7.0, 4.95, 4.75, 3.0),
              (0.65, 0.55, 5.0, 3.3), (8.3, 0.55, 3.45, 3.3))  # fmt: skip
    axes = [[None, None], [None, None]]
    for k, (x, y, w, h) in enumerate(places):
        axes[k // 2][k % 2] = fig.add_axes((x / 12, y / height, w / 12, h / height))
    top = 1 - 0.1 / height
    fig.suptitle(heading, x=0.01, y=top, ha="left", va="top", color=colour,
                 fontsize=_VERDICT_PT, fontweight="bold")  # fmt: skip
    y = top - 1.5 * _VERDICT_PT / 72 / height
    for text in wrapped:
        level = text.split(":", 1)[0]
        fig.text(0.015, y, text, ha="left", va="top", fontsize=_REASON_PT,
                 color=VERDICT_COLOURS.get(level, "0.2"))  # fmt: skip
        y -= (text.count("\n") + 1) * line_in / height
    (ax_sum, ax_res), (ax_hist, ax_rej) = axes
    _kernel_sum_panel(ax_sum, fig, quality, candidates, solution, shape)
    _residual_panel(ax_res, fig, candidates, shape, cell_size)
    _histogram_panel(ax_hist, quality, z_histograms)
    _rejection_panel(ax_rej, quality, candidates)
    return fig
