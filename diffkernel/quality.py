"""A verdict on every result: is this kernel and difference image to be trusted?

:func:`assess` turns a fit's own diagnostics (the candidate table, the solve's
metadata, the spatial solution) and, once the difference exists, the statistics of
``difference / sqrt(variance)`` into a dict::

    {"verdict": "pass" | "warn" | "fail",
     "reasons": [one sentence per failed check: the cause and the fix],
     "checks": [{"name", "level", "message"}, ...],
     "metrics": {...}}

The checks, each a function below, and what they catch:

* ``background``: no differential background is fitted (``fitForBackground`` off)
  but the stars' local skies show one. The kernel sum then absorbs the ratio of the
  skies instead of the stars' flux ratio (raw frames with their sky still in).
* ``kernel_sum``: the fitted kernel sum at the candidates disagrees with the flux
  ratio the stars themselves show (:mod:`diffkernel.kernel.photometry`), which does not
  depend on the fit.
* ``rejections``: most fitted candidates were rejected by the clipping stages.
* ``candidate_residuals``: the good candidates' residuals (in sigma of the
  difference) are not noise.
* ``spatial``: the spatial orders were lowered for want of candidates, or the spatial
  matrix is ill-conditioned.
* ``sky`` and ``footprints``: the difference image on the sky (unmasked pixels away
  from the candidates) and on the candidates' footprints is not N(0, 1): offsets,
  wrong noise, too many > 5 sigma pixels, stars left behind.

Difference statistics come as histograms of ``z = difference / sqrt(variance)`` in
:data:`Z_BINS` (:func:`difference_histograms`), which add up exactly over tiles, so
the serial and the Dask paths get the same numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from astropy.table import Table

__all__ = [
    "Z_RANGE",
    "Z_NBINS",
    "Z_BINS",
    "LEVELS",
    "assess",
    "describe",
    "difference_histograms",
    "fits_cards",
    "footprint_radius",
    "footprint_centres",
    "histogram_metrics",
    "kernel_sum_grid",
]

#: Histogram of difference / sqrt(variance): range and bins (edges on 0.01 steps).
Z_RANGE = (-10.0, 10.0)
Z_NBINS = 2000
Z_BINS = np.linspace(*Z_RANGE, Z_NBINS + 1)

#: Verdicts from best to worst.
LEVELS = ("pass", "warn", "fail")

# Thresholds: (warn, fail). Chosen from simulated pairs with a known kernel and the real
# pairs in the test data; each check's docstring says what it compares.
BACKGROUND_SIGMA = (0.1, 0.5)
KERNEL_SUM_OFFSET = (0.03, 0.10)
REJECTED_FRACTION = (0.5, 0.8)
RESIDUAL_STD = (1.5, 2.5)
RESIDUAL_MEAN = (0.25, 0.5)
SKY_STD_LOW = (0.8, 0.5)
SKY_STD_HIGH = (1.25, 2.0)
SKY_MEDIAN = (0.2, 0.5)
SKY_OUTLIERS = (5e-3, 2e-2)
FOOTPRINT_STD = (1.5, 3.0)
FOOTPRINT_MEDIAN = (0.5, 1.0)
#: Stars needed for the photometric checks.
MIN_STARS = 3
#: Significance a photometric offset needs before it counts (in its own sigma).
MIN_SIGNIFICANCE = 5.0
#: Systematic error of a stamp flux ratio, added in quadrature to the statistical one:
#: the flux outside the aperture, neighbours, PSF wings (seen as up to 2.4% on a few
#: DECam stars whose statistical error was 0.5%).
FLUX_RATIO_SYSTEMATIC = 0.01
#: The kernel-sum check is informative when it would see a failing offset at this many
#: sigma; a less certain one warns that the photometric scale is unverified.
CHECKABLE_SIGNIFICANCE = 3.0


# --- the difference's statistics ----------------------------------------------------------


def footprint_radius(kernel_size: int) -> float:
    """Radius of a candidate's footprint: a quarter of the kernel (about 1.5 FWHM)."""
    return max(2.0, kernel_size / 4.0)


def footprint_centres(table: Table) -> tuple[np.ndarray, np.ndarray]:
    """Integer centres of the sources placed in a cell (every source vetted)."""
    placed = np.asarray(table["cell"]) >= 0
    return (
        np.asarray(table["x_center"])[placed].astype(np.intp),
        np.asarray(table["y_center"])[placed].astype(np.intp),
    )


def _footprint_mask(
    shape: tuple[int, int],
    origin: tuple[int, int],
    xc: np.ndarray,
    yc: np.ndarray,
    radius: float,
) -> np.ndarray:
    """Pixels of a region within ``radius`` of any centre (full-image coordinates)."""
    ny, nx = shape
    y0, x0 = origin
    mask = np.zeros(shape, dtype=bool)
    r = int(np.floor(radius))
    near = (xc >= x0 - r) & (xc < x0 + nx + r) & (yc >= y0 - r) & (yc < y0 + ny + r)
    if not near.any():
        return mask
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    disc = dy**2 + dx**2 <= radius**2
    dy, dx = dy[disc], dx[disc]
    ys = (yc[near, None] - y0 + dy).ravel()
    xs = (xc[near, None] - x0 + dx).ravel()
    inside = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
    mask[ys[inside], xs[inside]] = True
    return mask


def _z_histogram(z: np.ndarray) -> np.ndarray:
    lo, hi = Z_RANGE
    index = np.floor((np.clip(z, lo, hi) - lo) * (Z_NBINS / (hi - lo))).astype(np.intp)
    np.minimum(index, Z_NBINS - 1, out=index)
    return np.bincount(index, minlength=Z_NBINS)


def difference_histograms(
    diff: np.ndarray,
    var: np.ndarray,
    mask: np.ndarray,
    origin: tuple[int, int],
    xc: np.ndarray,
    yc: np.ndarray,
    radius: float,
) -> np.ndarray:
    """``(2, Z_NBINS)`` counts of difference / sigma: on the sky, and on footprints.

    Only unmasked pixels with a finite ``z`` count. Values beyond :data:`Z_RANGE`
    fall in the end bins; bin ``i`` holds ``Z_BINS[i] <= z < Z_BINS[i + 1]``.

    Parameters
    ----------
    diff, var, mask : numpy.ndarray
        A region of the difference image, its variance and mask.
    origin : tuple of int
        ``(y0, x0)`` of the region in the full image.
    xc, yc : numpy.ndarray
        Integer centres of the candidates (full-image pixels).
    radius : float
        Footprint radius (:func:`footprint_radius`).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / np.sqrt(var)
    usable = np.isfinite(z) & (mask == 0)
    on_star = _footprint_mask(diff.shape, origin, np.asarray(xc), np.asarray(yc), radius)
    return np.stack([_z_histogram(z[usable & ~on_star]), _z_histogram(z[usable & on_star])])


def histogram_metrics(histogram: np.ndarray) -> dict[str, Any]:
    """Mean, median, robust std (1.4826 MAD) and fraction beyond 5 sigma of a z histogram.

    ``n_pixels`` alone when the histogram is empty. The mean uses the bin centres,
    with values beyond :data:`Z_RANGE` at the range's ends.
    """
    histogram = np.asarray(histogram)
    n = int(histogram.sum())
    out: dict[str, Any] = {"n_pixels": n}
    if n == 0:
        return out
    centres = 0.5 * (Z_BINS[1:] + Z_BINS[:-1])
    cdf = np.cumsum(histogram) / n
    median = float(np.interp(0.5, cdf, centres))
    dev = np.abs(centres - median)
    order = np.argsort(dev, kind="stable")
    mad = float(dev[order][np.searchsorted(np.cumsum(histogram[order]) / n, 0.5)])
    beyond = int(histogram[centres <= -5.0].sum() + histogram[centres >= 5.0].sum())
    out.update(
        mean=float(np.sum(histogram * centres) / n),
        median=median,
        robust_std=1.4826 * mad,
        fraction_beyond_5sigma=beyond / n,
    )
    return out


# --- the fit's diagnostics -------------------------------------------------------------------


def kernel_sum_grid(solution, n: int = 16) -> np.ndarray:
    """Kernel sums of ``solution`` on an ``n x n`` grid spanning the image."""
    x0, y0, x1, y1 = solution.kernel_functions.bbox
    xs, ys = np.meshgrid(np.linspace(x0, x1, n), np.linspace(y0, y1, n))
    return solution.coefficients_at(xs, ys) @ solution.basis.sums


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _column(table: Table, name: str, rows: np.ndarray) -> np.ndarray:
    if name not in table.colnames:
        return np.full(int(rows.sum()), np.nan)
    return np.asarray(table[name], dtype=float)[rows]


def _photometric_scale(table: Table, good: np.ndarray, ksum_at: np.ndarray) -> dict[str, Any]:
    """The stars' flux ratio and the fitted kernel sum's offset from it."""
    ratio = _column(table, "flux_ratio", good)
    err = _column(table, "flux_ratio_err", good)
    ok = np.isfinite(ratio) & np.isfinite(err) & (err > 0) & (ratio > 0)
    out: dict[str, Any] = {"n_stars": int(ok.sum())}
    if ok.sum() < MIN_STARS:
        return out
    w = 1.0 / err[ok] ** 2
    offset = ksum_at[ok] / ratio[ok] - 1.0
    offset_w = 1.0 / (err[ok] / ratio[ok]) ** 2
    # The error of a weighted median: sqrt(pi / 2) times that of the weighted mean.
    out.update(
        stars_flux_ratio=_weighted_median(ratio[ok], w),
        stars_flux_ratio_err=float(np.sqrt(np.pi / 2 / w.sum())),
        kernel_sum_offset=_weighted_median(offset, offset_w),
        kernel_sum_offset_err=float(np.sqrt(np.pi / 2 / offset_w.sum())),
    )
    return out


def _differential_background(
    table: Table, good: np.ndarray, scale: float, scale_err: float
) -> dict[str, Any]:
    """What the candidates' local skies show: ``sky_reference - scale * sky_convolved``.

    Its error holds the scatter over the stars and the error of ``scale`` (the stars'
    flux ratio) times the convolved image's sky, which dominates on a bright sky.
    """
    sky_ref = _column(table, "sky_reference", good)
    sky_conv = _column(table, "sky_convolved", good)
    noise = _column(table, "sky_noise", good)
    b = sky_ref - scale * sky_conv
    ok = np.isfinite(b) & np.isfinite(noise)
    if ok.sum() < MIN_STARS:
        return {"n_stars": int(ok.sum())}
    level = float(np.median(b[ok]))
    sigma = float(np.median(noise[ok]))
    sky = float(np.median(sky_conv[ok]))
    scatter = 1.2533 * 1.4826 * float(np.median(np.abs(b[ok] - level))) / float(np.sqrt(ok.sum()))
    return {
        "n_stars": int(ok.sum()),
        "level": level,
        "level_err": float(np.hypot(scatter, scale_err * sky)),
        "sky_noise": sigma,
        "level_in_sigma": level / sigma if sigma > 0 else float("nan"),
        "sky_convolved": sky,
        "sky_reference": float(np.median(sky_ref[ok])),
    }


def fit_metrics(table: Table, metadata: dict, solution) -> dict[str, Any]:
    """Metrics of the fit alone (no difference image needed)."""
    status = np.asarray(table["status"]).astype(str)
    good = status == "GOOD"
    rejected = dict(metadata.get("rejected") or {})
    n_fitted = int(metadata.get("n_candidates", int((np.asarray(table["cell"]) >= 0).sum())))
    n_rejected = int(sum(rejected.values()))
    grid = kernel_sum_grid(solution)
    xs, ys = _column(table, "x_center", good), _column(table, "y_center", good)
    ksum_at = solution.coefficients_at(xs, ys) @ solution.basis.sums
    photometry = _photometric_scale(table, good, ksum_at)
    # The stars' own scale when they give one; else the fit's (then a background the
    # kernel sum absorbed does not show).
    scale = photometry.get("stars_flux_ratio", float(np.mean(grid)))
    scale_err = photometry.get("stars_flux_ratio_err", 0.0)
    return {
        "candidates": {
            "sources": len(table),
            "vetting_rejected": dict(metadata.get("vetting_rejected") or {}),
            "fitted": n_fitted,
            "good": int(good.sum()),
            "rejected": rejected,
            "rejected_fraction": n_rejected / n_fitted if n_fitted else float("nan"),
        },
        "kernel_sum": {
            "mean": float(grid.mean()),
            "std": float(grid.std()),
            "min": float(grid.min()),
            "max": float(grid.max()),
        },
        "photometric_scale": photometry,
        "candidate_residuals": {
            "mean": float(np.median(_column(table, "spatial_resid_mean", good))),
            "std": float(np.median(_column(table, "spatial_resid_std", good))),
        }
        if good.any()
        else {},
        "background": {
            "fitted": solution.background_functions is not None,
            **_differential_background(table, good, scale, scale_err),
        },
        "spatial_condition": float(solution.condition),
        "spatial_orders_used": [
            metadata.get("spatial_kernel_order_used"),
            metadata.get("spatial_bg_order_used"),
        ],
        "notes": list(metadata.get("notes") or []),
    }


# --- the checks --------------------------------------------------------------------------------


def _level(value: float, limits: tuple[float, float]) -> str:
    """ "fail" beyond the second limit, "warn" beyond the first, else "pass"."""
    if value > limits[1]:
        return "fail"
    if value > limits[0]:
        return "warn"
    return "pass"


def _check_background(m: dict, kcfg) -> tuple[str, str]:
    bg = m["background"]
    if bg["fitted"] or "level" not in bg:
        return "pass", ""
    significant = abs(bg["level"]) > MIN_SIGNIFICANCE * bg["level_err"]
    level = _level(abs(bg["level_in_sigma"]), BACKGROUND_SIGMA) if significant else "pass"
    return level, (
        f"science and template backgrounds differ by {bg['level']:.4g} counts "
        f"({bg['level_in_sigma']:.2g} sigma per pixel) and fitForBackground is off: the kernel "
        "sum absorbs the ratio of the skies; set fitForBackground = true"
    )


def _check_kernel_sum(m: dict, kcfg) -> tuple[str, str]:
    """The kernel sum against the stars' flux ratio, or a warning that it cannot be checked.

    A check too uncertain to see a failing offset (``KERNEL_SUM_OFFSET[1]``) at
    ``CHECKABLE_SIGNIFICANCE`` is no check: too few or too faint stars leave the photometric
    scale of the difference unverified, which the user must hear.
    """
    ph = m["photometric_scale"]
    if "kernel_sum_offset" not in ph:
        if m["candidates"]["good"] == 0:
            return "pass", ""
        return "warn", (
            f"the kernel sum cannot be checked: {ph['n_stars']} good stars have a flux ratio "
            f"(at least {MIN_STARS} needed); add candidates (a source list, a larger field)"
        )
    offset, err = ph["kernel_sum_offset"], ph["kernel_sum_offset_err"]
    sigma = np.hypot(err, FLUX_RATIO_SYSTEMATIC)
    if abs(offset) <= MIN_SIGNIFICANCE * sigma:
        if CHECKABLE_SIGNIFICANCE * sigma <= KERNEL_SUM_OFFSET[1]:
            return "pass", ""
        return "warn", (
            f"the kernel sum cannot be checked: the {ph['n_stars']} good stars give the flux "
            f"ratio to only +-{100 * err:.1f}%, too uncertain to see a "
            f"{100 * KERNEL_SUM_OFFSET[1]:.0f}% offset; add candidates (a source list, a larger "
            "field, a lower "
            "detection threshold)"
        )
    return _level(abs(offset), KERNEL_SUM_OFFSET), (
        f"the kernel sum ({m['kernel_sum']['mean']:.4g} on average) is {100 * offset:+.1f}% off "
        f"the flux ratio of the {ph['n_stars']} good stars ({ph['stars_flux_ratio']:.4g}); "
        "check the background model (fitForBackground) and the candidates"
    )


def _check_rejections(m: dict, kcfg) -> tuple[str, str]:
    c = m["candidates"]
    frac = c["rejected_fraction"]
    if not np.isfinite(frac):
        return "pass", ""
    return _level(frac, REJECTED_FRACTION), (
        f"{100 * frac:.0f}% of the {c['fitted']} fitted candidates were rejected "
        f"({c['rejected']}): the kernel model does not fit most stars; check the background "
        "model, the kernel size and the inputs' alignment"
    )


def _check_candidate_residuals(m: dict, kcfg) -> tuple[str, str]:
    r = m["candidate_residuals"]
    if not r:
        return "pass", ""
    level = max(
        _level(r["std"], RESIDUAL_STD),
        _level(abs(r["mean"]), RESIDUAL_MEAN),
        key=LEVELS.index,
    )
    return level, (
        f"the good candidates' residuals have median mean {r['mean']:.2f} and std "
        f"{r['std']:.2f} sigma (noise: 0 and 1): the kernel does not match the stars or the "
        "variance planes are wrong; check the kernel size, the background model and the "
        "variance planes"
    )


def _check_spatial(m: dict, kcfg) -> tuple[str, str]:
    # Orders lowered for want of candidates are a metric, not a warning: a small
    # field holds too few stars for a varying kernel, and a constant one is right.
    messages = []
    if m["spatial_condition"] > kcfg.maxSpatialConditionNumber:
        messages.append(
            f"spatial matrix condition number {m['spatial_condition']:.3g} exceeds "
            f"maxSpatialConditionNumber={kcfg.maxSpatialConditionNumber:.3g}; lower the "
            "spatial orders or add candidates"
        )
    if m["kernel_sum"]["min"] <= 0:
        return "fail", (
            f"the kernel sum reaches {m['kernel_sum']['min']:.3g} in the field: the spatial "
            "model is unconstrained there; lower spatialKernelOrder or add candidates"
        )
    return ("warn" if messages else "pass"), "; ".join(messages)


def _check_sky(m: dict, kcfg) -> tuple[str, str]:
    sky = m.get("difference", {}).get("sky", {})
    if "robust_std" not in sky:
        return "pass", ""
    std, med, out = sky["robust_std"], sky["median"], sky["fraction_beyond_5sigma"]
    level = max(
        _level(std, SKY_STD_HIGH),
        _level(-std, (-SKY_STD_LOW[0], -SKY_STD_LOW[1])),
        _level(abs(med), SKY_MEDIAN),
        _level(out, SKY_OUTLIERS),
        key=LEVELS.index,
    )
    return level, (
        f"difference/sigma on the sky has median {med:.2f}, robust std {std:.2f} and "
        f"{100 * out:.2g}% of pixels beyond 5 sigma (noise: 0, 1 and 6e-5%); check the "
        "variance planes, the background model and unmasked artefacts"
    )


def _check_footprints(m: dict, kcfg) -> tuple[str, str]:
    fp = m.get("difference", {}).get("footprints", {})
    if "robust_std" not in fp:
        return "pass", ""
    level = max(
        _level(fp["robust_std"], FOOTPRINT_STD),
        _level(abs(fp["median"]), FOOTPRINT_MEDIAN),
        key=LEVELS.index,
    )
    return level, (
        f"difference/sigma on the candidates' footprints has median {fp['median']:.2f} and "
        f"robust std {fp['robust_std']:.2f} (noise: 0 and 1): stars are left in the difference; "
        "check the kernel size, the background model and the flux scale"
    )


CHECKS = {
    "background": _check_background,
    "kernel_sum": _check_kernel_sum,
    "rejections": _check_rejections,
    "candidate_residuals": _check_candidate_residuals,
    "spatial": _check_spatial,
    "sky": _check_sky,
    "footprints": _check_footprints,
}


def assess(
    table: Table,
    metadata: dict,
    solution,
    kernel_config,
    histograms: np.ndarray | None = None,
) -> dict[str, Any]:
    """The quality verdict of a fit, and of its difference image when given.

    Parameters
    ----------
    table : astropy.table.Table
        The candidate table (:func:`diffkernel.pipeline.cells.candidate_table`).
    metadata : dict
        The solve's metadata (rejections per stage, notes, orders used).
    solution : SpatialSolution
        The fitted kernel and background.
    kernel_config : PsfMatchConfig
        The active kernel configuration the fit used.
    histograms : numpy.ndarray, optional
        ``(2, Z_NBINS)`` sky and footprint histograms of the difference
        (:func:`difference_histograms`, summed over tiles).

    Returns
    -------
    dict
        ``verdict``, ``reasons``, ``checks`` and ``metrics`` (see the module docstring).
    """
    metrics = fit_metrics(table, metadata, solution)
    if histograms is not None:
        sky, footprints = np.asarray(histograms)
        metrics["difference"] = {
            "sky": histogram_metrics(sky),
            "footprints": histogram_metrics(footprints),
        }
    checks = []
    for name, check in CHECKS.items():
        level, message = check(metrics, kernel_config)
        checks.append({"name": name, "level": level, "message": message if level != "pass" else ""})
    verdict = max((c["level"] for c in checks), key=LEVELS.index, default="pass")
    reasons = [f"{c['level']}: {c['message']}" for c in checks if c["level"] != "pass"]
    return {"verdict": verdict, "reasons": reasons, "checks": checks, "metrics": metrics}


def fits_cards(quality: dict[str, Any]) -> dict[str, tuple[Any, str]]:
    """The verdict and key metrics as FITS header cards ``{key: (value, comment)}``.

    ``DKVERDCT`` is the verdict, ``DKREAS<n>`` the reasons (long strings continue),
    then the kernel sum, the stars' flux ratio and the difference's statistics.
    """
    if not quality:
        return {}
    m = quality.get("metrics", {})
    cards: dict[str, tuple[Any, str]] = {
        "DKVERDCT": (quality["verdict"], "diffkernel quality verdict: pass, warn or fail"),
        "DKNREAS": (len(quality["reasons"]), "number of DKREASn reasons"),
    }
    for i, reason in enumerate(quality["reasons"], start=1):
        cards[f"DKREAS{i}"] = (reason, "why the verdict is not pass")

    def add(key: str, value: Any, comment: str) -> None:
        if isinstance(value, int | float) and np.isfinite(value):
            cards[key] = (value, comment)

    cand = m.get("candidates", {})
    add("DKNGOOD", cand.get("good"), "kernel candidates used")
    add("DKREJFR", cand.get("rejected_fraction"), "fraction of fitted candidates rejected")
    ksum = m.get("kernel_sum", {})
    add("DKKSUM", ksum.get("mean"), "mean kernel sum over the field")
    add("DKKSUMSD", ksum.get("std"), "std of the kernel sum over the field")
    add("DKSTARK", m.get("photometric_scale", {}).get("stars_flux_ratio"), "stars flux ratio")
    diff = m.get("difference", {})
    for prefix, where in (("DKSKY", "sky"), ("DKFP", "footprints")):
        stats = diff.get(where, {})
        add(f"{prefix}MED", stats.get("median"), f"median diff/sigma on {where}")
        add(f"{prefix}STD", stats.get("robust_std"), f"robust std diff/sigma on {where}")
    add("DKSKY5SG", diff.get("sky", {}).get("fraction_beyond_5sigma"), "sky fraction >5 sigma")
    return cards


def describe(quality: dict[str, Any]) -> str:
    """One line a verdict, then one a reason: what a person reads after a run."""
    if not quality:
        return "quality: not assessed (a store written before verdicts existed)"
    lines = [f"quality: {quality['verdict'].upper()}"]
    lines.extend(f"  {reason}" for reason in quality["reasons"])
    return "\n".join(lines)
