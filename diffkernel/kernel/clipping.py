"""Rejection rules for kernel candidates.

Three stages, as in ip_diffim: single-kernel residuals, the ensemble of kernel
sums, and residuals under the spatial model. The residual tests share one rule.
"""

from __future__ import annotations

import numpy as np

__all__ = ["clipped_mean_std", "residual_failures", "kernel_sum_outliers"]


def clipped_mean_std(
    values: np.ndarray, nsigma: float = 3.0, n_iter: int = 3
) -> tuple[float, float]:
    """Sigma-clipped mean and standard deviation.

    The first pass centres on the median with a width from the interquartile
    range (``0.741 IQR``), which a few wild outliers cannot drag; later passes use
    the mean and sample standard deviation of the values within ``nsigma``.

    Parameters
    ----------
    values : numpy.ndarray
        Finite values.
    nsigma : float
        Clipping half-width in standard deviations.
    n_iter : int
        Number of mean/std passes after the robust start.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), 0.0
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    center, width = q50, 0.741 * (q75 - q25)
    if width <= 0:
        width = np.std(v)
    for _ in range(max(int(n_iter), 1)):
        # A zero width (all kept values equal) keeps exactly those values, never
        # letting clipped outliers back in.
        keep = np.abs(v - center) <= nsigma * width
        if keep.sum() < 2:
            break
        center = float(np.mean(v[keep]))
        width = float(np.std(v[keep], ddof=1))
    return float(center), float(width)


def residual_failures(
    mean: np.ndarray, std: np.ndarray, mean_max: float, std_max: float
) -> np.ndarray:
    """True where ``|mean| > mean_max`` or ``std > std_max`` (or either is not finite)."""
    mean = np.asarray(mean)
    std = np.asarray(std)
    bad = ~(np.isfinite(mean) & np.isfinite(std))
    return bad | (np.abs(mean) > mean_max) | (std > std_max)


def kernel_sum_outliers(ksums: np.ndarray, max_sigma: float) -> tuple[np.ndarray, float, float]:
    """Candidates whose kernel sum lies more than ``max_sigma`` clipped sigmas out.

    Returns
    -------
    outliers : numpy.ndarray
        Boolean, True for rejected candidates.
    mean, std : float
        The clipped statistics of the ensemble.
    """
    mean, std = clipped_mean_std(ksums)
    ksums = np.asarray(ksums)
    if not np.isfinite(std):
        return np.zeros(ksums.shape, dtype=bool), mean, std
    return np.abs(ksums - mean) > max_sigma * std, mean, std
