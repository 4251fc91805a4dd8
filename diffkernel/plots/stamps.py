"""The candidates' own fits: their stamps, residuals and measured coefficients.

ip_diffim's ``displayCandidates`` shows every candidate with its residuals, and its
spatial-model plot shows what each candidate measured against the model. A result
store keeps the candidates' positions and statistics but not their stamps or their
single-kernel coefficients, so :func:`fit_candidates` cuts the stamps again and makes
each candidate's single-kernel fit as the run did (same basis, weights, background
order, regularization and iteration): cheap, a few hundred small least-squares
problems.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from ..kernel.basis import regularization_for
from ..kernel.candidate import StampBatch, convolve_basis, noise_corrected
from ..kernel.fit import fit_single_kernels
from ..kernel.moments import fit_moments, local_background_columns
from .backend import new_figure
from .render import STATUS_COLOURS

__all__ = ["CandidateFits", "fit_candidates", "plot_candidate_stamps"]

#: Memory of one batch's basis convolutions in :func:`fit_candidates`.
_BATCH_BYTES = 64e6
#: Status order of the stamps: the rejected first, they are what a reader looks for.
_ORDER = {"BAD": 0, "GOOD": 1, "UNUSED": 2}


@dataclass
class CandidateFits:
    """Candidates refitted one by one, with their stamps.

    Attributes
    ----------
    table : astropy.table.Table
        Their rows of the candidate table.
    coeffs : numpy.ndarray
        ``(N, n_basis)`` single-kernel coefficients in the solution's basis.
    background : numpy.ndarray
        ``(N,)`` local background at the stamp centre (NaN when none was fitted).
    convolved_name, target_name : str
        Which input is convolved (``"template"`` in ``convolveTemplate`` mode) and
        which is matched.
    target, convolved : numpy.ndarray
        ``(N, S, S)`` stamps of the image matched and of the one convolved.
    own_residual, spatial_residual : numpy.ndarray
        ``(N, S, S)`` residuals in sigma: under the candidate's own kernel, and the
        difference image itself (the spatial model's), with the difference's sign.
    n_fitted : int
        Candidates the run fitted (``N`` is fewer when capped).
    """

    table: Table
    coeffs: np.ndarray
    background: np.ndarray
    convolved_name: str
    target_name: str
    target: np.ndarray
    convolved: np.ndarray
    own_residual: np.ndarray
    spatial_residual: np.ndarray
    n_fitted: int


def _column(table: Table, name: str) -> np.ndarray:
    if name not in table.colnames:
        return np.full(len(table), np.nan)
    return np.ma.filled(np.ma.asarray(table[name], dtype=float), np.nan)


def _spread(index: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``index``, evenly spaced."""
    if len(index) <= n:
        return index
    return index[np.linspace(0, len(index) - 1, n).round().astype(int)]


def fit_candidates(result, template, science, max_candidates: int = 400) -> CandidateFits | None:
    """Refit the candidates of a result one by one, as the run did.

    Parameters
    ----------
    result : ResultStore
        A published result.
    template, science : ZarrImage
        Its inputs on the difference's pixel grid (the aligned template, if any).
    max_candidates : int
        At most this many are refitted, evenly spread over each status.

    Returns
    -------
    CandidateFits or None
        None when nothing can be refitted: no fitted candidate, or a preconvolved run
        (its fit saw the science convolved with its PSF, not the stored pixels).
    """
    from ..config import MakeKernelConfig

    meta = result.metadata or {}
    if meta.get("preconvolved"):
        return None
    table = result.candidates
    fitted = np.flatnonzero(np.isfinite(_column(table, "kernel_sum")))
    if fitted.size == 0:
        return None
    status = np.asarray(table["status"]).astype(str)
    keep = np.sort(np.concatenate([
        _spread(fitted[status[fitted] == s], max(1, max_candidates * np.sum(status[fitted] == s)
                                                 // fitted.size))
        for s in np.unique(status[fitted])
    ]))  # fmt: skip
    kcfg = MakeKernelConfig.from_dict(result.config).kernel.active
    basis = result.solution.basis
    hk = basis.kernel_size // 2
    hs = kcfg.detectionConfig.stamp_half_width(basis.kernel_size)
    convolve_science = meta.get("mode") == "convolveScience"
    convolved_img, target_img = (science, template) if convolve_science else (template, science)
    ny, nx = result.difference.shape
    # Stamps are cut on integer centres; stores older than these columns had them rounded.
    xc = np.asarray(table["x_center" if "x_center" in table.colnames else "x"]).round().astype(int)
    yc = np.asarray(table["y_center" if "y_center" in table.colnames else "y"]).round().astype(int)
    ht = hs + hk
    inside = (xc - ht >= 0) & (yc - ht >= 0) & (xc + ht < nx) & (yc + ht < ny)
    keep = keep[inside[keep]]
    if keep.size == 0:
        return None
    # Batches whose basis convolutions, (N, n_basis, S, S) doubles, stay near 64 MB:
    # a delta-function basis has hundreds of kernels.
    batch = max(1, int(_BATCH_BYTES // (8 * basis.size * (2 * hs + 1) ** 2)))
    parts = [
        _fit_batch(keep[k : k + batch], xc, yc, hs, hk, convolved_img, target_img,
                   result.difference, basis, kcfg)
        for k in range(0, len(keep), batch)
    ]  # fmt: skip
    coeffs, target, convolved, own, spatial = (np.concatenate(p) for p in zip(*parts, strict=True))
    sign = -1.0 if convolve_science else 1.0  # the difference is science - template
    nb = basis.size
    names = ("science", "template") if convolve_science else ("template", "science")
    return CandidateFits(
        table=table[keep],
        coeffs=coeffs[:, :nb],
        background=coeffs[:, nb] if coeffs.shape[1] > nb else np.full(len(keep), np.nan),
        convolved_name=names[0],
        target_name=names[1],
        target=target,
        convolved=convolved,
        own_residual=sign * own,
        spatial_residual=spatial,
        n_fitted=int(fitted.size),
    )


def _fit_batch(rows, xc, yc, hs, hk, convolved_img, target_img, difference, basis, kcfg):
    """Stamps, coefficients and residuals of the candidates ``rows`` of the table."""
    ht = hs + hk
    planes = {"t": [], "tv": [], "s": [], "sv": [], "d": []}
    for i in rows:
        # As stored (the run checked these pixels), through the chunk cache: many small
        # regions of the same chunks.
        conv = convolved_img.read_stored(yc[i] - ht, yc[i] + ht + 1, xc[i] - ht, xc[i] + ht + 1,
                                         cached=True)  # fmt: skip
        box = (yc[i] - hs, yc[i] + hs + 1, xc[i] - hs, xc[i] + hs + 1)
        target = target_img.read_stored(*box, cached=True)
        diff = difference.read_stored(*box, cached=True)
        planes["t"].append(conv.image)
        planes["tv"].append(conv.variance)
        planes["s"].append(target.image)
        planes["sv"].append(target.variance)
        with np.errstate(invalid="ignore", divide="ignore"):
            planes["d"].append(diff.image / np.sqrt(diff.variance))
    stamps = StampBatch(*(np.stack(planes[k]).astype(np.float64) for k in ("t", "tv", "s", "sv")))
    coeffs, model, kernels = _single_fits(stamps, basis, kcfg)
    with np.errstate(invalid="ignore", divide="ignore"):
        own = (stamps.science - model) / np.sqrt(stamps.difference_variance(kernels))
    return coeffs, stamps.science, stamps.template_center()[0], own, np.stack(planes["d"])


def _single_fits(stamps: StampBatch, basis, kcfg):
    """Coefficients, model stamps and kernels of each candidate's own fit.

    The weights follow the run's (:func:`diffkernel.pipeline.cells.candidate_stats`):
    science plus template variance, then, with ``iterateSingleKernel``, the variance
    seen through the first fit's kernels.
    """
    conv = convolve_basis(basis, stamps.template)
    order = int(kcfg.spatialBgOrder) if kcfg.fitForBackground else None
    kwargs = dict(background_order=order,
                  constant_variance_weighting=bool(kcfg.constantVarianceWeighting))  # fmt: skip
    regularization = regularization_for(basis, kcfg)
    variance = stamps.science_variance + stamps.template_center()[1]

    def moments(variance):
        # As the run's: less the convolved image's own noise with correctConvolvedNoise.
        return noise_corrected(
            fit_moments(conv, stamps.science, variance, **kwargs),
            stamps,
            basis,
            variance,
            constant_variance_weighting=kwargs["constant_variance_weighting"],
            correct=bool(kcfg.correctConvolvedNoise),
        )

    if kcfg.iterateSingleKernel:
        first = fit_single_kernels(moments(variance), kcfg, regularization)
        variance = stamps.difference_variance(basis.kernel_image(first.coeffs[:, : basis.size]))
    coeffs = fit_single_kernels(moments(variance), kcfg, regularization).coeffs
    nb = basis.size
    model = np.einsum("nkyx,nk->nyx", conv, coeffs[:, :nb])
    if order is not None:
        s = stamps.stamp_size
        model += (coeffs[:, nb:] @ local_background_columns(s, order)).reshape(-1, s, s)
    return coeffs, model, basis.kernel_image(coeffs[:, :nb])


# ------------------------------------------------------------------------- the figure

_PER_ROW = 3  # candidates per row of the mosaic
_RESID_LIMIT = 5.0  # residual colour range, in sigma


def _grey(stamps: np.ndarray) -> np.ndarray:
    """Each stamp on its own asinh stretch from its median to its peak, in [0, 1]."""
    flat = stamps.reshape(len(stamps), -1)
    med = np.nanmedian(flat, axis=1)[:, None, None]
    peak = np.nanmax(flat, axis=1)[:, None, None]
    scaled = (stamps - med) / np.where(peak > med, peak - med, 1.0)
    return np.clip(np.arcsinh(scaled / 0.05) / np.arcsinh(1 / 0.05), 0.0, 1.0)


def plot_candidate_stamps(fits: CandidateFits | None, max_candidates: int = 30):
    """The candidates' stamps and residuals (the specification's ``displayCandidates``).

    For each candidate, left to right: the image matched, the image convolved, the
    residual under the candidate's own kernel and the difference image (the spatial
    model's residual), both in sigma of the difference on one red-blue scale. A frame
    in the status colour (GOOD green, BAD red, UNUSED blue) and a caption with the
    id, the reason of a rejection and the residual std. The rejected come first.

    Parameters
    ----------
    fits : CandidateFits or None
        :func:`fit_candidates`'s; None draws a page saying there is nothing to show.
    max_candidates : int
        At most this many candidates (ten rows of three).

    Returns
    -------
    matplotlib.figure.Figure
        One set of axes holding one mosaic image; captions and frames drawn over it.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    if fits is None or len(fits.table) == 0:
        fig = new_figure(8, 2)
        fig.text(0.5, 0.5, "No candidate stamps: no fitted candidate, no inputs given, or a "
                 "preconvolved run", ha="center", va="center", fontsize=10)  # fmt: skip
        return fig
    status = np.asarray(fits.table["status"]).astype(str)
    ids = np.asarray(fits.table["id"])
    order = sorted(range(len(status)), key=lambda i: (_ORDER.get(status[i], 3), ids[i]))
    shown = order[:max_candidates]
    n = len(shown)
    s = fits.target.shape[-1]
    gap, tile_gap, caption = 2, max(6, s // 4), max(10, int(0.45 * s))
    tile_w = 4 * s + 3 * gap
    rows = -(-n // _PER_ROW)
    width_px = _PER_ROW * tile_w + (_PER_ROW - 1) * tile_gap
    height_px = rows * (s + caption)
    rgb = np.ones((height_px, width_px, 3), dtype=np.float32)
    cmap = colormaps["RdBu_r"].with_extremes(bad="0.7")
    norm = Normalize(-_RESID_LIMIT, _RESID_LIMIT)
    panels = (
        np.repeat(_grey(fits.target[shown])[..., None], 3, axis=-1),
        np.repeat(_grey(fits.convolved[shown])[..., None], 3, axis=-1),
        cmap(norm(np.ma.masked_invalid(fits.own_residual[shown])))[..., :3],
        cmap(norm(np.ma.masked_invalid(fits.spatial_residual[shown])))[..., :3],
    )
    width_in = 13.0
    px_in = width_in / width_px
    top_in, bottom_in = 0.6, 0.75
    height_in = height_px * px_in + top_in + bottom_in
    fig = new_figure(width_in, height_in)
    ax = fig.add_axes((0, bottom_in / height_in, 1, height_px * px_in / height_in))
    own_std = np.sqrt(np.nanmean(fits.own_residual[shown] ** 2, axis=(1, 2)))
    for k, i in enumerate(shown):
        row, col = divmod(k, _PER_ROW)
        y0 = height_px - (row + 1) * (s + caption)  # origin lower: the first row on top
        x0 = col * (tile_w + tile_gap)
        for p, panel in enumerate(panels):
            xs = x0 + p * (s + gap)
            rgb[y0 : y0 + s, xs : xs + s] = panel[k]
        colour = STATUS_COLOURS.get(status[i], "0.3")
        ax.add_patch(Rectangle((x0 - 1, y0 - 1), tile_w + 1, s + 1, fill=False, ec=colour,
                               lw=1.5))  # fmt: skip
        reason = str(fits.table["reason"][i])
        label = f"{ids[i]} {status[i]}" + (f": {reason}" if reason else "")
        label += f"   own-kernel residual rms {own_std[k]:.2f}σ"
        ax.text(x0, y0 + s + 1.5, label, color=colour, fontsize=7, ha="left", va="bottom",
                clip_on=True)  # fmt: skip
    ax.imshow(rgb, origin="lower", interpolation="nearest", extent=(-0.5, width_px - 0.5,
              -0.5, height_px - 0.5))  # fmt: skip
    ax.set_xlim(-2, width_px + 1)
    ax.set_ylim(-2, height_px + 1)
    ax.set_axis_off()
    heads = (fits.target_name, fits.convolved_name, "own kernel", "spatial model")
    for col in range(min(_PER_ROW, n)):
        for p, head in enumerate(heads):
            x = (col * (tile_w + tile_gap) + p * (s + gap) + s / 2) / width_px
            fig.text(x, 1 - (top_in - 0.05) / height_in, head, ha="center", va="bottom",
                     fontsize=7, color="0.25")  # fmt: skip
    more = f" ({n} of {len(status)} refitted; the run fitted {fits.n_fitted})"
    fig.suptitle(f"Kernel candidates and their residuals{more if n < fits.n_fitted else ''}",
                 y=1 - 0.08 / height_in, va="top", fontsize=10)  # fmt: skip
    cax = fig.add_axes((0.3, 0.45 / height_in, 0.4, 0.1 / height_in))
    cb = fig.colorbar(ScalarMappable(norm, cmap), cax=cax, orientation="horizontal")
    cb.set_label("residual / sigma of the difference (images: asinh, median to peak)", fontsize=7)
    cb.ax.tick_params(labelsize=7)
    return fig
