"""Tests of diffkernel.kernel.clipping: robust statistics and the candidate rejection rules."""

from __future__ import annotations

import numpy as np
import pytest

from diffkernel.kernel.clipping import clipped_mean_std, kernel_sum_outliers, residual_failures


def test_clipped_mean_std_clean_data():
    """Without outliers the result is the plain mean and sample standard deviation."""
    mean, std = clipped_mean_std(np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(np.sqrt(2.5))


def test_clipped_mean_std_rejects_wild_outlier():
    """A wild value cannot drag the robust start: it is clipped from the first pass."""
    mean, std = clipped_mean_std(np.array([1.0, 2.0, 3.0, 4.0, 5.0, 100.0]))
    assert mean == pytest.approx(3.0)
    assert std == pytest.approx(np.sqrt(2.5))


def test_clipped_mean_std_gaussian_sample():
    """On a Gaussian sample with 5% outliers, mean and sigma are close to the truth."""
    rng = np.random.default_rng(40)
    v = np.concatenate([rng.normal(10.0, 2.0, 2000), rng.uniform(50, 100, 100)])
    mean, std = clipped_mean_std(v)
    assert mean == pytest.approx(10.0, abs=0.15)
    assert std == pytest.approx(2.0, rel=0.05)


def test_clipped_mean_std_degenerate_inputs():
    """Empty or all-NaN gives NaN; one value gives (value, 0); NaNs are ignored."""
    assert all(np.isnan(clipped_mean_std(np.array([]))))
    assert all(np.isnan(clipped_mean_std(np.array([np.nan, np.inf]))))
    assert clipped_mean_std(np.array([4.2])) == (4.2, 0.0)
    assert clipped_mean_std(np.array([1.0, np.nan, 3.0])) == pytest.approx((2.0, np.sqrt(2.0)))
    assert clipped_mean_std(np.array([7.0, 7.0, 7.0])) == (7.0, 0.0)


def test_clipped_mean_std_nsigma():
    """A tighter nsigma clips more: the clipped width of a Gaussian shrinks with nsigma."""
    v = np.random.default_rng(41).normal(0.0, 1.0, 5000)
    wide_mean, wide_std = clipped_mean_std(v, nsigma=10.0)
    assert wide_mean == pytest.approx(v.mean())
    assert wide_std == pytest.approx(v.std(ddof=1))
    stds = [clipped_mean_std(v, nsigma=ns)[1] for ns in (3.0, 2.0, 1.5)]
    assert 0.93 < stds[0] < 0.99
    assert 0.7 < stds[1] < 0.85
    assert stds[0] > stds[1] > stds[2]


def test_clipped_mean_std_zero_width_keeps_outlier_out():
    """Tied values plus an outlier: the outlier stays clipped once it has been."""
    mean, std = clipped_mean_std(np.array([1.0, 1, 1, 1, 1, 1, 1.001, 50.0]))
    assert mean == pytest.approx(1.0, abs=1e-3)
    assert std < 1e-3


def test_kernel_sum_outliers_with_tied_sums():
    """Six equal kernel sums, one close and one at 50: only 50 is an outlier."""
    ksums = np.array([1.0, 1, 1, 1, 1, 1, 1.001, 50.0])
    out, _, _ = kernel_sum_outliers(ksums, 3.0)
    assert out[7]


def test_kernel_sum_outliers_rejects_only_outlier():
    """Sums [1,1,1,1,2,3,4] plus 50: only 50 is rejected (ip_diffim's test)."""
    ksums = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 50.0])
    out, mean, std = kernel_sum_outliers(ksums, 3.0)
    np.testing.assert_array_equal(out, [False] * 7 + [True])
    good = ksums[:7]
    assert mean == pytest.approx(good.mean())
    assert std == pytest.approx(good.std(ddof=1))


def test_kernel_sum_outliers_order_independent():
    """The outlier is found wherever it sits in the list."""
    ksums = np.array([50.0, 1.0, 2.0, 1.0, 4.0, 1.0, 3.0, 1.0])
    out, _, _ = kernel_sum_outliers(ksums, 3.0)
    np.testing.assert_array_equal(np.flatnonzero(out), [0])


def test_kernel_sum_outliers_threshold():
    """max_sigma sets the cut: 4 is kept at 3 sigma but rejected at 1 sigma."""
    ksums = np.array([1.0, 1.0, 1.0, 1.0, 2.0, 3.0, 4.0, 50.0])
    out, mean, std = kernel_sum_outliers(ksums, 1.0)
    expected = np.abs(ksums - mean) > std
    np.testing.assert_array_equal(out, expected)
    assert out[6] and out[7] and not out[0]


def test_kernel_sum_outliers_no_spread():
    """Identical sums reject nothing; non-finite statistics reject nothing."""
    out, mean, std = kernel_sum_outliers(np.full(5, 2.0), 3.0)
    assert not out.any() and mean == 2.0 and std == 0.0
    out, mean, std = kernel_sum_outliers(np.array([]), 3.0)
    assert out.shape == (0,) and np.isnan(mean) and np.isnan(std)


def test_residual_failures_thresholds():
    """Fail when |mean| > mean_max or std > std_max (strict), or either is not finite."""
    mean = np.array([0.0, 0.25, 0.2501, -0.3, 0.0, 0.0, np.nan, 0.0, 0.0, -0.25])
    std = np.array([1.0, 1.5, 1.0, 1.0, 1.51, np.inf, 1.0, np.nan, 0.0, 1.49])
    fails = residual_failures(mean, std, 0.25, 1.5)
    np.testing.assert_array_equal(
        fails, [False, False, True, True, True, True, True, True, False, False]
    )


def test_residual_failures_scalar_and_shape():
    """Scalars and arrays broadcast; the result is boolean."""
    assert not residual_failures(0.1, 1.0, 0.25, 1.5)
    assert residual_failures(0.1, 2.0, 0.25, 1.5)
    out = residual_failures(np.zeros((2, 3)), np.ones((2, 3)), 0.25, 1.5)
    assert out.dtype == bool and out.shape == (2, 3) and not out.any()
