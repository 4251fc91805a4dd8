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
