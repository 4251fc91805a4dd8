"""What the displays share: image reduction for display, stretches, mask overlays, colours.

Images are reduced to at most ``max_side`` pixels a side by block means (not by
taking every k-th pixel, which drops stars narrower than k), masks by OR-ing their
bits over the same blocks, so that a masked pixel stays visible at any reduction.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "STATUS_COLOURS",
    "BAD_MARKERS",
    "MASK_COLOURS",
    "block_factor",
    "block_mean",
    "block_or",
    "sky_norm",
    "mask_rgba",
    "mask_legend",
    "texts_overlap",
    "tick_labels",
]

#: Candidate colours by status: the specification's good in green, bad in red.
STATUS_COLOURS = {"GOOD": "#00c000", "BAD": "#e00000", "UNUSED": "#1f77b4"}
#: Markers of the BAD candidates, one per rejection reason in turn (all red).
BAD_MARKERS = ("x", "+", "s", "^", "D", "v", "P", "*")
#: Overlay colours of the usual mask planes (afw display's where it has one); others
#: take tab10's colours in turn.
MASK_COLOURS = {
    "BAD": "#ff0000",
    "SAT": "#00c000",
    "INTRP": "#8fbc8f",
    "CR": "#ff00ff",
    "EDGE": "#ffd700",
    "DETECTED": "#1e90ff",
    "DETECTED_NEGATIVE": "#00ffff",
    "SUSPECT": "#ff8c00",
    "NO_DATA": "#ffa500",
}


def block_factor(shape: tuple[int, int], max_side: int) -> int:
    """The block side that brings ``shape``'s longer side to at most ``max_side``."""
    return max(1, -(-max(shape) // max(int(max_side), 1)))


def _blocks(array: np.ndarray, factor: int, fill) -> np.ndarray:
    """``array`` padded with ``fill`` to whole blocks, as ``(ny/f, f, nx/f, f)``."""
    ny, nx = array.shape
    py, px = -ny % factor, -nx % factor
    if py or px:
        array = np.pad(array, ((0, py), (0, px)), constant_values=fill)
    return array.reshape(array.shape[0] // factor, factor, array.shape[1] // factor, factor)


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean of the finite pixels of each ``factor x factor`` block (NaN where none are).

    The last row and column of blocks cover the image's edge and the padding past
    it; display them over ``factor * shape`` pixels.
    """
    image = np.asarray(image, dtype=np.float32)
    if factor == 1:
        return image
    blocks = _blocks(image, factor, np.nan)
    finite = np.isfinite(blocks)
    total = np.where(finite, blocks, 0).sum(axis=(1, 3), dtype=np.float64)
    count = finite.sum(axis=(1, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (total / count).astype(np.float32)


def block_or(mask: np.ndarray, factor: int) -> np.ndarray:
    """The bits set anywhere in each ``factor x factor`` block."""
    mask = np.asarray(mask)
    if factor == 1:
        return mask
    return np.bitwise_or.reduce(_blocks(mask, factor, 0), axis=(1, 3))


def sky_norm(image: np.ndarray):
    """An asinh stretch from just below the sky to the bright stars, in units of the sky noise.

    Zero is ``sky - 2 sigma`` (robust sigma); the scale is linear over the first few
    sigma and logarithmic beyond, up to the 99.9th percentile but at most 1000 sigma
    above the sky, so that a few saturated stars cannot push the faint ones into the
    dark: a 10-sigma star is a third of the way up, sky noise a tenth. A
    :class:`matplotlib.colors.FuncNorm` (astropy's visualization module would cost a
    third of a second to import).
    """
    from matplotlib.colors import FuncNorm

    finite = np.asarray(image)[np.isfinite(image)]
    if finite.size == 0:
        vmin, vmax, sigma = 0.0, 1.0, 1.0
    else:
        if finite.size > 250_000:  # a regular sample is as good for percentiles, and quick
            finite = finite[:: finite.size // 250_000]
        lo, sky, hi = np.percentile(finite, [15.87, 50.0, 99.9])
        sigma = max(float(sky - lo), 1e-12 * max(abs(float(sky)), 1.0), 1e-30)
        vmin = float(sky - 2.0 * sigma)
        vmax = float(np.clip(hi, sky + 10.0 * sigma, sky + 1000.0 * sigma))
    scale = 3.0 * sigma

    def forward(x):
        return np.arcsinh((np.asarray(x, dtype=float) - vmin) / scale)

    def inverse(y):
        return vmin + scale * np.sinh(np.asarray(y, dtype=float))

    return FuncNorm((forward, inverse), vmin=vmin, vmax=vmax, clip=True)


def mask_rgba(
    mask: np.ndarray, planes: dict[str, int], transparency: float
) -> tuple[np.ndarray, dict[str, int]]:
    """An RGBA overlay of the mask planes, and the count of pixels of each plane set.

    Parameters
    ----------
    mask : numpy.ndarray
        Integer bit mask.
    planes : dict of str to int
        Plane name to bit.
    transparency : float
        As afw display's ``maskTransparency``: 0 opaque, 100 invisible.

    Returns
    -------
    rgba : numpy.ndarray
        ``(*mask.shape, 4)`` floats; unmasked pixels fully transparent. Where planes
        overlap, the one listed later in ``planes`` shows.
    counts : dict of str to int
        The planes with any pixel set (in the reduced mask), in ``planes``' order.
    """
    from matplotlib.colors import to_rgba

    mask = np.asarray(mask)
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    alpha = float(np.clip(1.0 - transparency / 100.0, 0.0, 1.0))
    counts = {}
    others = iter(f"C{i}" for i in range(100))
    for name, bit in planes.items():
        colour = MASK_COLOURS.get(name) or next(others)
        hit = (mask & (1 << int(bit))) != 0
        n = int(hit.sum())
        if n:
            counts[name] = n
            rgba[hit] = (*to_rgba(colour)[:3], alpha)
    return rgba, counts


def mask_legend(ax, counts: dict[str, int], n_pixels: int, transparency: float) -> None:
    """A legend of the overlaid mask planes, with the fraction of the image each covers."""
    from matplotlib.patches import Patch

    if not counts:
        return
    alpha = float(np.clip(1.0 - transparency / 100.0, 0.0, 1.0))
    handles = [
        Patch(color=MASK_COLOURS.get(name, f"C{i}"), alpha=max(alpha, 0.3),
              label=f"{name} {100 * n / n_pixels:.2g}%")
        for i, (name, n) in enumerate(counts.items())
    ]  # fmt: skip
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.0, -0.06), ncols=3,
              fontsize=7, frameon=False, title="mask", title_fontsize=7)  # fmt: skip


def texts_overlap(fig) -> list[tuple[str, str]]:
    """Pairs of visible, non-empty texts of ``fig`` whose boxes overlap (after a draw).

    Tick labels, titles, axis and colour-bar labels, legends' texts and free texts
    are all compared; for tests and for checking a layout by hand.
    """
    from matplotlib.text import Text

    renderer = fig.canvas.get_renderer()
    ticks, shown = set(), []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            slack = 1e-9 * max(abs(lo), abs(hi), 1.0)
            for major in (True, False):
                locs = axis.get_majorticklocs() if major else axis.get_minorticklocs()
                get = axis.get_major_ticks if major else axis.get_minor_ticks
                found = get(len(locs))
                for tick, loc in zip(found, locs, strict=False):
                    ticks.update((tick.label1, tick.label2))
                    if lo - slack <= loc <= hi + slack:  # ticks past the view are not drawn
                        shown.extend((tick.label1, tick.label2))
    texts = [t for t in fig.findobj(Text) if t not in ticks] + shown
    boxes = []
    for artist in texts:
        if not artist.get_visible() or not str(artist.get_text()).strip():
            continue
        axes = artist.axes
        if axes is not None and not axes.get_visible():
            continue
        box = artist.get_window_extent(renderer)
        if box.width <= 0 or box.height <= 0:
            continue
        boxes.append((artist.get_text(), box))
    clashes = []
    for i, (text_a, a) in enumerate(boxes):
        for text_b, b in boxes[i + 1 :]:
            # Shrunk by half a pixel: texts that only touch do not overlap.
            if (a.x0 + 0.5 < b.x1 - 0.5 and b.x0 + 0.5 < a.x1 - 0.5
                    and a.y0 + 0.5 < b.y1 - 0.5 and b.y0 + 0.5 < a.y1 - 0.5):  # fmt: skip
                clashes.append((text_a, text_b))
    return clashes


def tick_labels(ticks) -> list[str]:
    """Exact, short tick labels: plain decimals from 1e-3 to 1e6 (``10290``, not
    ``1.029e+04``), with the fewest decimals that write every tick exactly; ``%g``
    beyond, with as many digits as tell them apart."""
    values = np.asarray(ticks, dtype=float)
    top = float(np.max(np.abs(values))) if values.size else 0.0
    values = np.where(np.abs(values) < 1e-12 * top, 0.0, values)
    steps = np.diff(np.sort(values))
    step = float(steps[steps > 0].min()) if np.any(steps > 0) else top
    if 1e-3 <= top < 1e6 and step > 0:
        decimals = max(0, int(-np.floor(np.log10(step) + 1e-9)))
        while decimals < 8 and np.any(np.abs(np.round(values, decimals) - values) > 1e-6 * step):
            decimals += 1
        return [f"{v:.{decimals}f}" for v in values]
    for digits in range(3, 9):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels
