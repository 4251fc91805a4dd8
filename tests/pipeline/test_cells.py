"""Tests of diffkernel.pipeline.cells: merging cell results does not change the reduction."""

from __future__ import annotations

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from diffkernel import MakeKernelConfig
from diffkernel.kernel.basis import basis_from_config
from diffkernel.pipeline.cells import (
    CellResult,
    InMemoryPair,
    SourcePlacement,
    fit_cell,
    reduce_cells,
)
from diffkernel.pipeline.stages import make_cell_plan
from diffkernel.simulate import make_pair


def _fitted_cells(seed: int, **kernel):
    """A 256^2 simulated pair fitted cell by cell (single-threaded BLAS), as the tasks do.

    Returns the plan, the source placement, the basis, the image shape and the cells'
    results.
    """
    pair = make_pair((256, 256), seed=seed, template_depth=4)
    cfg = MakeKernelConfig()
    cfg.kernel.active.sizeCellX = cfg.kernel.active.sizeCellY = 64
    cfg.kernel.active.spatialKernelOrder = 1
    for name, value in kernel.items():
        setattr(cfg.kernel.active, name, value)
    kcfg = cfg.kernel.active
    basis = basis_from_config(kcfg, pair.template.psf_fwhm, pair.science.psf_fwhm)
    t, s = pair.template.masked_image, pair.science.masked_image
    plan = make_cell_plan(cfg, basis, s.shape)
    sources = pair.truth.sources
    placement = SourcePlacement.from_positions(
        np.asarray(sources["id"]), np.asarray(sources["x"]), np.asarray(sources["y"]), plan
    )
    read = InMemoryPair(t, s)
    with threadpool_limits(1, user_api="blas"):
        per_cell = [
            fit_cell(plan, cell, idx, placement.xc[idx], placement.yc[idx], read)
            for cell, idx in placement.cells()
        ]
    return plan, placement, basis, s.shape, per_cell


def test_reduction_does_not_depend_on_how_cells_are_merged():
    """Cells merged in any groups, in any order, reduce to the same outcome bit for bit."""
    plan, placement, _, _, per_cell = _fitted_cells(7)
    assert len(per_cell) >= 8
    with threadpool_limits(1, user_api="blas"):
        reference, table, _ = reduce_cells(plan, placement, per_cell)
        rng = np.random.default_rng(3)
        shuffled = [per_cell[i] for i in rng.permutation(len(per_cell))]
        groups = [CellResult.merge(shuffled[i : i + 3]) for i in range(0, len(shuffled), 3)]
        merged, merged_table, _ = reduce_cells(plan, placement, groups[::-1])
    np.testing.assert_array_equal(merged.solution.kernel_coeffs, reference.solution.kernel_coeffs)
    np.testing.assert_array_equal(
        merged.solution.background_coeffs, reference.solution.background_coeffs
    )
    for name in ("id", "status", "reason", "kernel_sum", "resid_std", "snr_template"):
        np.testing.assert_array_equal(np.asarray(merged_table[name]), np.asarray(table[name]))


def test_single_fits_made_per_cell_equal_those_of_the_whole_set():
    """The cells' single-kernel fits are those solve makes on all candidates at once."""
    import dataclasses

    from diffkernel.kernel.solve import CandidateSet, solve

    plan, placement, basis, shape, per_cell = _fitted_cells(8, calculateKernelUncertainty=True)
    kcfg = plan.kernel_config
    merged = CellResult.merge(per_cell)
    ok = merged.reason == ""
    assert ok.sum() >= 6 and len(merged.single) == ok.sum()
    base = dict(
        ids=np.arange(int(ok.sum())),
        x=placement.xc[merged.index[ok]].astype(float),
        y=placement.yc[merged.index[ok]].astype(float),
        cell=merged.cell[ok],
        rating=merged.rating[ok],
        stats=merged.stats,
    )
    with threadpool_limits(1, user_api="blas"):
        given = solve(CandidateSet(**base, single=merged.single), basis, kcfg, shape)
        made = solve(CandidateSet(**base), basis, kcfg, shape)
    for field in dataclasses.fields(made):
        a, b = getattr(given, field.name), getattr(made, field.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=field.name)
    np.testing.assert_array_equal(given.solution.kernel_coeffs, made.solution.kernel_coeffs)
    np.testing.assert_array_equal(given.solution.covariance, made.solution.covariance)


def test_candidates_are_rated_by_the_mean_snr_of_the_science_core():
    """A candidate's rating (its rank in its cell) is the mean S/N per pixel of the
    science image in the 2r x 2r core of candidateCoreRadius r, local sky (median of the
    stamp's outer ring) subtracted, as ip_diffim rates candidates; the radius matters."""
    science = make_pair((256, 256), seed=7, template_depth=4).science.masked_image
    ratings = {}
    for r in (2, 6):
        plan, placement, _, _, per_cell = _fitted_cells(7, candidateCoreRadius=r)
        merged = CellResult.merge(per_cell)
        rated = np.flatnonzero(np.isfinite(merged.rating))
        assert rated.size >= 8
        h = plan.half_stamp
        yy, xx = np.mgrid[-h : h + 1, -h : h + 1]
        ring = np.hypot(xx, yy) >= 0.8 * h
        for i in rated[:5]:
            src = merged.index[i]
            x, y = placement.xc[src], placement.yc[src]
            stamp = science.image[y - h : y + h + 1, x - h : x + h + 1]
            core = np.s_[y - r : y + r, x - r : x + r]
            snr = (science.image[core] - np.median(stamp[ring])) / np.sqrt(science.variance[core])
            assert merged.rating[i] == pytest.approx(snr.mean(), rel=1e-12)
        ratings[r] = merged.rating[rated]
    assert not np.allclose(ratings[2], ratings[6])


def _bright_stamps(kcfg_fields: dict, n: int = 8):
    """Stamps of the ``n`` brightest stars of a pair whose template is as deep as the
    science image (its variance matters), with the basis and the kernel config."""
    from diffkernel.kernel.candidate import cut_stamps

    pair = make_pair((256, 256), seed=9, template_depth=1)
    cfg = MakeKernelConfig()
    for name, value in {"fitForBackground": True, **kcfg_fields}.items():
        setattr(cfg.kernel.active, name, value)
    kcfg = cfg.kernel.active
    basis = basis_from_config(kcfg, pair.template.psf_fwhm, pair.science.psf_fwhm)
    t, s = pair.template.masked_image, pair.science.masked_image
    plan = make_cell_plan(cfg, basis, s.shape)
    src = pair.truth.sources
    xc, yc = np.rint(src["x"]).astype(int), np.rint(src["y"]).astype(int)
    inside = (np.minimum(xc, yc) >= plan.margin) & (np.maximum(xc, yc) < 256 - plan.margin)
    pick = np.flatnonzero(inside)[np.argsort(-np.asarray(src["flux_template"])[inside])[:n]]
    stamps = cut_stamps(t, s, xc[pick], yc[pick], plan.half_stamp, plan.half_kernel)
    return stamps, basis, kcfg, plan.regularization


def _pixel_moments(stamps, basis, kcfg, coeffs, kernels):
    """Residual mean and std over the statistics' pixels of (s - model) / sigma, sigma
    the difference's own under ``kernels``, all made pixel by pixel with scipy."""
    from scipy.signal import convolve2d

    from diffkernel.kernel.moments import core_selector, local_background_columns

    size = stamps.stamp_size
    n_k = basis.size
    cols = local_background_columns(size, int(kcfg.spatialBgOrder))
    sel = (
        core_selector(size, kcfg.candidateCoreRadius).ravel()
        if kcfg.useCoreStats
        else np.ones(size * size, dtype=bool)
    )
    means, stds = [], []
    for i, k in enumerate(kernels):
        model = convolve2d(stamps.template[i], k, mode="valid").ravel()
        model += coeffs[i, n_k:] @ cols
        var = stamps.science_variance[i].ravel()
        var = var + convolve2d(stamps.template_variance[i], k**2, mode="valid").ravel()
        z = ((stamps.science[i].ravel() - model) / np.sqrt(var))[sel]
        means.append(z.mean())
        stds.append(z.std(ddof=1))
    return np.array(means), np.array(stds)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"useCoreStats": True},
        {"constantVarianceWeighting": False},
        {"iterateSingleKernel": True},
    ],
    ids=["default", "core", "per-pixel-weights", "iterated"],
)
def test_candidate_residuals_are_in_units_of_the_difference_sigma(fields):
    """The single-kernel residual moments are those of the difference over its own sigma,
    sqrt(V_s + K² ⊛ V_t) with K the candidate's kernel; so for a good fit ~N(0, 1)."""
    from diffkernel.pipeline.cells import candidate_stats

    stamps, basis, kcfg, reg = _bright_stamps(fields)
    stats, single = candidate_stats(stamps, basis, kcfg, reg)
    kernels = basis.kernel_image(single.coeffs[:, : basis.size])
    mean, std, _ = stats.residual_moments(single.coeffs)
    e_mean, e_std = _pixel_moments(stamps, basis, kcfg, single.coeffs, kernels)
    np.testing.assert_allclose(mean, e_mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(std, e_std, rtol=1e-8)
    assert 0.8 < np.median(std) < 1.2
    # Under its own kernels, the variance response changes nothing.
    same = stats.residual_moments(single.coeffs, kernels)
    np.testing.assert_allclose(same[1], std, rtol=1e-10)


def test_candidate_fit_weights_are_those_before_the_kernel():
    """Only the units of the residuals follow the kernel: the fits are weighted by the
    science variance plus the template's under the stamp, as before any iteration."""
    from diffkernel.kernel.candidate import convolve_basis
    from diffkernel.kernel.fit import fit_single_kernels
    from diffkernel.kernel.moments import compute_stats
    from diffkernel.pipeline.cells import candidate_stats

    stamps, basis, kcfg, reg = _bright_stamps({})
    stats, single = candidate_stats(stamps, basis, kcfg, reg)
    _, tvar = stamps.template_center()
    plain = compute_stats(
        convolve_basis(basis, stamps.template),
        stamps.science,
        stamps.science_variance + tvar,
        background_order=int(kcfg.spatialBgOrder),
        constant_variance_weighting=True,
    )
    np.testing.assert_array_equal(stats.m_fit, plain.m_fit)
    np.testing.assert_array_equal(stats.b_fit, plain.b_fit)
    np.testing.assert_array_equal(single.coeffs, fit_single_kernels(plain, kcfg, reg).coeffs)


@pytest.mark.parametrize("use_core", [False, True])
def test_residuals_under_another_kernel_are_in_its_difference_sigma(use_core):
    """Given other kernels (the spatial model's at the candidates), the moments are
    those of the difference over its sigma under them, to within half a percent (the
    statistics are rescaled by the stamp's mean ratio of the two variances), where
    those in the units of the candidates' own kernels are off by up to 2%."""
    from diffkernel.pipeline.cells import candidate_stats

    stamps, basis, kcfg, reg = _bright_stamps({"useCoreStats": use_core})
    stats, single = candidate_stats(stamps, basis, kcfg, reg)
    # The candidates' mean kernel (smooth, as a spatial model's), and a noisier one
    # (as a single delta-function fit's); each candidate keeps its own background.
    mean_kernel = single.coeffs[:, : basis.size].mean(axis=0)
    noise = np.random.default_rng(1).standard_normal((len(stats), basis.size))
    for coeffs in (mean_kernel, mean_kernel + 0.05 * np.abs(mean_kernel).max() * noise):
        other = single.coeffs.copy()
        other[:, : basis.size] = coeffs
        kernels = basis.kernel_image(other[:, : basis.size])
        mean, std, _ = stats.residual_moments(other, kernels)
        e_mean, e_std = _pixel_moments(stamps, basis, kcfg, other, kernels)
        error = np.abs(std / e_std - 1).max()
        assert error < 0.005
        np.testing.assert_allclose(mean, e_mean, rtol=0.005, atol=0.005)
        assert error < np.abs(stats.residual_moments(other)[1] / e_std - 1).max()
